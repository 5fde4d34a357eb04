"""The console script's basics: version and help."""

import subprocess
import sys

from agent import __version__
from agent.cli import main


def test_version_flag(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"ferry {__version__}"


def test_help_lists_usage():
    out = subprocess.run([sys.executable, "-m", "agent", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "usage: ferry" in out


def test_the_command_table_names_what_each_module_registers():
    import argparse
    import importlib

    from agent.cli import SUBCOMMANDS, build_parser
    for module, names in SUBCOMMANDS:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(module).add_parser(sub)
        assert tuple(sub.choices) == names, module
    # Every command parses with its own module only.
    for _, names in SUBCOMMANDS:
        for name in names:
            assert name in build_parser(name)._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def test_migrate_starts_without_qemu_or_key_code():
    """`ferry migrate` only talks to the local agent: the modules that run QEMU or handle
    keys stay unloaded (each start of the CLI would pay for them)."""
    code = ("import sys; from agent.cli import main\n"
            "rc = main(['migrate', '--home', sys.argv[1], '--to', 'b', 'vm'])\n"
            "heavy = [m for m in ('agent.qemu.vm', 'agent.identity', 'agent.net.channel',"
            " 'cryptography', 'agent.importer.argv') if m in sys.modules]\n"
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code, "/nonexistent-ferry-home"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1 []", out


def test_the_agent_loads_the_importers_numpy_only_for_an_import():
    """numpy starts OpenBLAS threads that spin for a while: an agent that only migrates
    must not pay for them at every start."""
    code = ("import sys; import agent.service.daemon\n"
            "print('numpy' in sys.modules, 'agent.importer.remote_sink' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False False", out

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

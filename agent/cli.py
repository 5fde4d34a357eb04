"""The `ferry` command line: parses arguments and hands each subcommand to its module."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from agent import __version__
from agent.errors import FerryError

log = logging.getLogger("ferry")

# Each subcommand module exposes `add_parser(subparsers)` which registers its parser and
# sets `func` (args -> exit code). Listed here so `ferry --help` shows them in this order,
# with the commands each registers: a command's run loads its own module only (a module's
# imports cost CPU at every start; `ferry migrate` needs no QEMU or key code).
SUBCOMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("agent.commands.agent_cmd", ("agent",)),
    ("agent.commands.vm_cmds", ("vm",)),
    ("agent.commands.migrate", ("migrate",)),
    ("agent.commands.disk_cmds", ("disk",)),
    ("agent.commands.jobs_cmds", ("status", "jobs", "job", "cancel", "limit", "history",
                                  "report")),
    ("agent.commands.identity_cmds", ("id", "trust", "untrust", "peers")),
    ("agent.commands.import_cmd", ("import",)),
    ("agent.commands.export_cmd", ("export",)),
)
SUBCOMMAND_MODULES: tuple[str, ...] = tuple(module for module, _ in SUBCOMMANDS)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: with `command`, only the module registering it (when one does);
    else every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ferry",
        description="Live-migrate QEMU/KVM virtual machines between hosts.",
    )
    parser.add_argument("--version", action="version", version=f"ferry {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    chosen = [module for module, names in SUBCOMMANDS if command in names]
    for name in chosen or SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand argv names: its first word that is not an option (ferry's own
    options take no values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


class JournalFormatter(logging.Formatter):
    """Lines for journald: a syslog priority prefix (<3> error ... <7> debug) so the journal
    keeps each line's level, and no time (the journal stamps lines itself)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{super().format(record)}"


def syslog_priority(level: int) -> int:
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    return 6 if level >= logging.INFO else 7


def setup_logging(verbosity: int) -> None:
    """One line per message on stderr; -v and -vv lower the threshold. On the journal
    (run by systemd) each line carries its syslog priority instead of a level name."""
    from agent.service.systemd import stderr_is_journal
    level = logging.WARNING - 10 * min(verbosity, 2)
    handler = logging.StreamHandler()
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("ferry: %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ferry` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` goes to QEMU untouched (argparse mangles it inside subcommands).
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    args.passthrough = passthrough
    if passthrough and not getattr(args, "takes_passthrough", False):
        parser.error("arguments after -- are only taken by `ferry vm start`")
    setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return guarded("ferry", lambda: func(args))


def guarded(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body: a FerryError becomes one clear line and exit code 1, Ctrl-C
    exit code 130 (tracebacks only at -vv)."""
    try:
        return body()
    except FerryError as exc:
        log.debug("command failed", exc_info=True)
        from agent.service.systemd import stderr_is_journal
        priority = "<3>" if stderr_is_journal() else ""    # e.g. a bad agent.toml at start
        print(f"{priority}{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

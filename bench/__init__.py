"""ferry's benchmark harness: `python -m bench SUBCOMMAND`, ratios measured in the same run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line of `python -m bench NAME`: the module's docstring as its help."""
    return argparse.ArgumentParser(prog=f"python -m bench {name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def sized_args(name: str, doc: str | None, argv: Sequence[str], *, size_mib: int,
               size_help: str) -> argparse.Namespace:
    """`--json`, `--size-mib N` and `--repeat N` of a bench over one buffer, checked."""
    command = parser(name, doc)
    command.add_argument("--json", action="store_true", help="print one JSON object")
    command.add_argument("--size-mib", type=int, default=size_mib,
                         help=f"{size_help} in MiB (default {size_mib})")
    command.add_argument("--repeat", type=int, default=3, help="timed runs per figure (best)")
    args = command.parse_args(argv)
    if args.size_mib < 1 or args.repeat < 1:
        command.error("--size-mib and --repeat must be at least 1")
    return args

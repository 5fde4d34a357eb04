"""Dispatches `python -m bench SUBCOMMAND [options]` to the module that runs that benchmark."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# Subcommand -> module with `main(argv) -> int`; add a line here for each new benchmark.
SUBCOMMANDS: dict[str, str] = {
    "codec": "bench.codec",
    "migrate": "bench.migrate",
    "channel": "bench.channel",
    "disk": "bench.disk",
    "fuzz": "bench.fuzz",
    "import": "bench.importer",
    "linux": "bench.linux",
}


def usage() -> str:
    return ("usage: python -m bench SUBCOMMAND [options]\n"
            f"subcommands: {', '.join(SUBCOMMANDS)} (each takes --help)")


def main(argv: Sequence[str]) -> int:
    """Run the benchmark named by argv[0] with the rest of argv; its exit code."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    module_name = SUBCOMMANDS.get(argv[0])
    if module_name is None:
        print(f"bench: unknown subcommand {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    code: int = importlib.import_module(module_name).main(list(argv[1:]))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Sections of the docs drawn from the code's own tables (the protocol's, the settings'):
splicing one into its document between its markers, and the command that prints or
rewrites it (`python -m agent.state.config --write`); a test per section keeps them equal."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path


def splice(doc: str, begin: str, end: str, section: str) -> str:
    """doc with everything from the begin marker to the end marker replaced by section
    (which carries both markers)."""
    start, stop = doc.index(begin), doc.index(end) + len(end)
    return doc[:start] + section + doc[stop:]


def main(argv: Iterable[str] | None, *, description: str, default_doc: Path,
         render: Callable[[], str], rewrite: Callable[[str], str]) -> int:
    """Print the section, or with --write [DOC] rewrite it in place in DOC."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--write", type=Path, nargs="?", const=default_doc,
                        help="replace the section in this document (default %(const)s)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.write is None:
        print(render())
        return 0
    args.write.write_text(rewrite(args.write.read_text()))
    return 0

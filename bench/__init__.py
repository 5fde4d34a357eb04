"""ferry's benchmark harness: `python -m bench SUBCOMMAND`, ratios measured in the same run.

Subcommands: codec, channel, migrate, disk, import, linux (benchmarks; linux migrates a
real Linux guest, bench.linux), and fuzz: the wire, migration message, page-batch and
QEMU-stream decoders on 1,000,000 seeded, mutated inputs each
(`python -m bench fuzz [--target T] [--count N] [--seed S] [--json] [--replay FILE]`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from agent.errors import FerryError

T = TypeVar("T")


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


_cancel_running: list[Callable[[], object]] = []
"""How to stop the asyncio work under way, if any (see run_async)."""


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM: the same clean-up as Ctrl-C."""
    if _cancel_running:
        _cancel_running[-1]()
        return
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside: SIGTERM interrupts like Ctrl-C (KeyboardInterrupt, or a cancellation of the
    work run_async runs), so every clean-up on the way out runs."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_async(work: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(work), stopped by SIGTERM through a cancellation, so its `finally`
    blocks (QMP clean-up) run: an exception raised into the event loop from a signal handler
    can leave asyncio.run waiting forever. An interrupted run raises KeyboardInterrupt."""
    async def guarded() -> T:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        _cancel_running.append(lambda: loop.call_soon_threadsafe(task.cancel))
        try:
            return await work
        finally:
            _cancel_running.pop()

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


def met_text(met: bool) -> str:
    """How every bench prints a target's outcome."""
    return "met" if met else "NOT met"


def run_measurement(name: str, measure: Callable[[Callable[[str], None]], dict[str, Any]],
                    readable: Callable[[dict[str, Any]], str], as_json: bool,
                    interrupted: str) -> int:
    """What `python -m bench NAME` does around its measurement: notes on stderr, SIGTERM
    as Ctrl-C (130, `interrupted` said), a failure said in one line (1), the result as JSON
    or readable, and 0 only when it met its target."""
    def note(text: str) -> None:
        print(f"bench {name}: {text}", file=sys.stderr, flush=True)

    try:
        with sigterm_as_interrupt():
            result = measure(note)
    except KeyboardInterrupt:
        note(interrupted)
        return 130
    except (FerryError, OSError, subprocess.SubprocessError) as exc:
        note(f"failed: {exc}")
        return 1
    print(json.dumps(result) if as_json else readable(result))
    return 0 if result["met"] else 1

"""Dirty-rate demo (`python -m agent.demo_dirty`): the tracker's dirty rate against the guest's own.

The guest reports in its mailbox how many pages it wrote; the tracker finds the changed
pages by itself each second. With a working set larger than a second of writes every
write lands on a distinct page, so the two rates agree (the tracker also counts the
mailbox page, +1 per round).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.cli import guarded
from agent.errors import UserError
from agent.guest import FREE_BASE_PAGE, PAGE_SIZE, GuestConfig, RunningGuest, boot_guest
from agent.memory import scan
from agent.memory.tracker import DirtyTracker, choose_tracker
from agent.qemu import qmp, vm

MIB = 1 << 20
PAGES_PER_MIB = MIB // PAGE_SIZE
DEFAULT_SECONDS = 5
DEFAULT_RAM_MIB = 1024
DEFAULT_FILL_MIB = 512
DEFAULT_RATE = 5000                 # pages per second (~20 MB/s)
# The working set holds this many seconds of writes, so one-second rounds see distinct pages.
WORKING_SET_SECONDS = 2
WS_START_PAGE = 0x400               # 4 MiB, above the guest's own pages
# SeaBIOS keeps tables at the top of RAM; leave them alone.
TOP_RESERVE_PAGES = PAGES_PER_MIB
ROUND_SECONDS = 1.0
QUIT_TIMEOUT = 5.0


def guest_config(ram_mib: int, fill_mib: int, rate: int) -> GuestConfig:
    """Working set first (two seconds of writes), then the fill, all inside guest RAM."""
    ws_pages = max(1, rate * WORKING_SET_SECONDS)
    fill_start = -(-(WS_START_PAGE + ws_pages) // PAGES_PER_MIB) * PAGES_PER_MIB
    usable_end = ram_mib * PAGES_PER_MIB - TOP_RESERVE_PAGES
    if fill_start > usable_end:
        raise UserError(f"{ram_mib} MiB of RAM cannot hold a working set of {ws_pages} pages")
    fill_pages = min(fill_mib * PAGES_PER_MIB, usable_end - fill_start)
    config = GuestConfig(ws_start_page=WS_START_PAGE, ws_pages=ws_pages, rate=rate,
                         fill_start_page=fill_start, fill_pages=fill_pages)
    config.check(ram_pages=usable_end)
    assert config.ws_start_page >= FREE_BASE_PAGE
    return config


def collect_round(tracker: DirtyTracker) -> tuple[int, float]:
    """One tracker round (collect, then take it as sent): pages found and seconds taken."""
    start = time.perf_counter()
    dirty = tracker.collect()
    acknowledge = getattr(tracker, "acknowledge", None)
    if acknowledge is not None:
        acknowledge(dirty)
    return len(dirty), time.perf_counter() - start


async def watch(guest: RunningGuest, tracker: DirtyTracker, seconds: int,
                out: Callable[[str], None]) -> None:
    """Print, once per round, the tracker's dirty rate beside the guest's own."""
    # Both rates cover the same span: from just before one round's scan to the next's.
    start = prev_t = time.monotonic()
    prev = guest.mailbox()
    found, took = await asyncio.to_thread(collect_round, tracker)
    out(f"round 0: {found} non-zero pages ({found * PAGE_SIZE / MIB:.0f} MiB), "
        f"scanned in {took * 1000:.0f} ms")
    out(f"{'t/s':>5} {'tracker dirty/s':>16} {'scan ms':>8} {'guest wrote/s':>14} "
        f"{'passes':>7} {'errors':>7}")
    for n in range(1, seconds + 1):
        await asyncio.sleep(max(0.0, start + n * ROUND_SECONDS - time.monotonic()))
        now, state = time.monotonic(), guest.mailbox()
        found, took = await asyncio.to_thread(collect_round, tracker)
        span = now - prev_t
        out(f"{now - start:5.1f} {found / span:16.0f} {took * 1000:8.0f} "
            f"{(state.pages_written - prev.pages_written) / span:14.0f} "
            f"{state.passes:7d} {state.errors:7d}")
        prev_t, prev = now, state


async def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Boot, watch, shut down; the exit status (1 if the guest saw a corrupted page)."""
    accel = vm.choose_accel()
    out(f"accelerator: {accel.accel.value} ({accel.reason})")
    config = guest_config(args.ram_mib, args.fill_mib, args.rate)
    with tempfile.TemporaryDirectory(prefix="ferry-demo-") as tmp:
        out(f"booting the test guest: {args.ram_mib} MiB RAM, "
            f"{config.fill_pages // PAGES_PER_MIB} MiB filled at boot, working set "
            f"{config.ws_pages} pages at {config.rate} pages/s")
        started = time.monotonic()
        guest = await boot_guest(Path(tmp), config=config, ram_size=args.ram_mib * MIB,
                                 accel=accel, name="ferry-demo")
        try:
            state = guest.mailbox()
            out(f"guest running after {time.monotonic() - started:.1f} s "
                f"(pid {guest.pid}, RAM {guest.ram_path}, TSC {state.tsc_per_ms / 1000:.0f} MHz)")
            fd = os.open(guest.ram_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                with choose_tracker(guest.ram, pid=guest.pid, ram_path=guest.ram_path,
                                    fd=fd) as tracker:
                    threads = getattr(tracker, "threads", None)
                    out(f"dirty tracker: {tracker.name} (scanner backend {scan.BACKEND}"
                        + (f", {threads} threads)" if threads else ")"))
                    await watch(guest, tracker, args.seconds, out)
            finally:
                os.close(fd)
            errors = guest.mailbox().errors
            async with qmp.connect(guest.qmp_path) as monitor:
                await monitor.quit()
            status = await guest.process.wait(QUIT_TIMEOUT)
            out(f"guest shut down (QEMU exit status {status}); "
                f"pages the guest found corrupted: {errors}")
        finally:
            guest.close()
    return 1 if errors else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agent.demo_dirty", description=__doc__)
    parser.add_argument("--seconds", type=int, default=DEFAULT_SECONDS)
    parser.add_argument("--ram-mib", type=int, default=DEFAULT_RAM_MIB)
    parser.add_argument("--fill-mib", type=int, default=DEFAULT_FILL_MIB)
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE, help="pages per second")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded("ferry demo", lambda: asyncio.run(run(args)))


if __name__ == "__main__":
    sys.exit(main())

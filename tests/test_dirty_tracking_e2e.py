"""The hash-scan tracker on a running guest: dirty are exactly the pages the guest writes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os

import pytest

from agent.guest import KERNEL_ADDR, MAILBOX_PAGE, PAGE_SIZE, GuestConfig, guest_pages
from agent.memory.tracker import HashScanTracker
from agent.qemu import qmp

KERNEL_PAGE = KERNEL_ADDR // PAGE_SIZE
# Small set, brisk rate: a pass takes ~15 ms, so rounds are quick and every page changes.
CONFIG = GuestConfig(ws_start_page=0x800, ws_pages=300, rate=20_000,
                     fill_start_page=0x1000, fill_pages=256)
ROUNDS = 3


def wait_passes(guest, count: int):
    target = guest.mailbox().passes + count
    guest.wait_until(lambda s: s.passes >= target, timeout=5.0, what=f"{count} more passes")


@contextlib.contextmanager
def tracker_for(guest, use_fd: bool):
    fd = os.open(guest.ram_path, os.O_RDONLY | os.O_CLOEXEC) if use_fd else None
    try:
        with HashScanTracker(guest.ram, fd=fd) as tracker:
            yield tracker
    finally:
        if fd is not None:
            os.close(fd)


def round_of(tracker) -> set[int]:
    """One pre-copy round as the migration will do it: collect, then take it as sent."""
    dirty = tracker.collect()
    tracker.acknowledge(dirty)
    return set(dirty)


@pytest.mark.qemu
@pytest.mark.parametrize("use_fd", [False, True], ids=["full-scan", "skip-holes"])
def test_rounds_report_exactly_the_pages_the_guest_writes(start_guest, use_fd):
    guest = start_guest(config=CONFIG)
    wait_passes(guest, 1)   # every page of the working set written once
    with tracker_for(guest, use_fd) as tracker:
        first = round_of(tracker)
        # Round 0: every page that is not zero, and no page that is.
        assert set(CONFIG.ws_pages_range) | {MAILBOX_PAGE, KERNEL_PAGE} <= first
        fill = set(CONFIG.fill_pages_range)
        nonzero_fill = {p for p in fill
                        if guest.ram[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] != bytes(PAGE_SIZE)}
        assert 0 < len(nonzero_fill) < len(fill)
        assert first & fill == nonzero_fill

        expected = guest_pages(CONFIG)
        for _ in range(ROUNDS):
            wait_passes(guest, 2)
            dirty = round_of(tracker)
            assert dirty == expected, (
                f"missed {sorted(expected - dirty)[:10]}, spurious {sorted(dirty - expected)[:10]}")
    assert guest.mailbox().errors == 0


@pytest.mark.qemu
def test_rounds_follow_a_moved_working_set(start_guest):
    guest = start_guest(config=CONFIG)
    moved = dataclasses.replace(CONFIG, ws_start_page=0x2000, ws_pages=100)
    with tracker_for(guest, use_fd=True) as tracker:
        round_of(tracker)
        guest.set_config(moved)
        guest.wait_until(lambda s: s.active_start_page == moved.ws_start_page,
                         timeout=2.0, what="the moved working set")
        wait_passes(guest, 1)
        round_of(tracker)   # the round that saw the move
        wait_passes(guest, 2)
        assert round_of(tracker) == guest_pages(moved)


@pytest.mark.qemu
def test_a_stopped_guest_leaves_nothing_dirty(start_guest):
    """The final round runs with the guest stopped: then nothing at all may change."""
    guest = start_guest(config=CONFIG)

    async def stop():
        async with qmp.connect(guest.qmp_path) as q:
            await q.execute("stop")

    with tracker_for(guest, use_fd=True) as tracker:
        round_of(tracker)
        asyncio.run(stop())
        round_of(tracker)   # what changed up to the stop
        assert round_of(tracker) == set()

"""Faults a test can inject into a running migration, named in FERRY_TEST_FAULTS.

The end-to-end tests need failures at exact points (the source paused in pre-switchover,
QEMU's stream cut mid-way) and a negative control that proves the guest's own checks can
fail (one late page dropped). Agents read the variable once per job; with it unset (as
always outside tests) every check here is False and nothing changes.
"""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

ENV = "FERRY_TEST_FAULTS"
HOLD_ENV = "FERRY_TEST_HOLD"
"""A protocol step (agent.migration.conversation.steps) at which the agent stops, once:
it creates HOME/hold-STEP and goes on when the test removes that file."""
HOLD_POLL_S = 0.02


class Fault(enum.StrEnum):
    """Where a test wants the source job to go wrong."""

    PRE_SWITCHOVER = "fail-in-pre-switchover"   # raise once QEMU paused in pre-switchover
    CUT_STREAM = "cut-qemu-stream"              # close QEMU's socket after 16 MiB of stream
    DROP_LATE_PAGE = "drop-late-page"           # drop one page rewritten late, every copy


CUT_STREAM_AFTER = 16 << 20
# The page dropped is the first data page at or above this index (4 MiB: the test guest's
# working set, not its code or mailbox) that QEMU sends from its second dirty sync on (a
# page the guest rewrote while pre-copy ran), or in RAM's last section, whichever is first.
DROP_PAGE_FROM = 1024
DROP_FROM_ITERATION = 2


def active() -> frozenset[Fault]:
    """The faults the environment asks for (unknown names are ignored)."""
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    return frozenset(f for f in Fault if f.value in names)


_held: set[str] = set()   # steps this agent process has already stopped at


def hold(home: Path) -> Callable[[str], Awaitable[None]] | None:
    """The hold hook for this agent's links (None outside tests): it stops at the step
    once per agent process, whichever link (a resumed one too) gets there."""
    wanted = os.environ.get(HOLD_ENV, "").strip()
    if not wanted:
        return None

    async def at(step: str) -> None:
        if step != wanted or step in _held:
            return
        _held.add(step)
        marker = home / f"hold-{step.replace(':', '-')}"
        marker.touch()
        while marker.exists():   # the test injects its fault, then removes the file
            await asyncio.sleep(HOLD_POLL_S)
    return at

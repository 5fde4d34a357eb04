"""Faults a test can inject into a running migration, named in FERRY_TEST_FAULTS.

The end-to-end tests need failures at exact points (the source paused in pre-switchover,
QEMU's stream cut mid-way) and a negative control that proves the guest's own checks can
fail (one late page dropped). Agents read the variable once per job; with it unset (as
always outside tests) every check here is False and nothing changes.
"""

from __future__ import annotations

import enum
import os

ENV = "FERRY_TEST_FAULTS"


class Fault(enum.StrEnum):
    """Where a test wants the source job to go wrong."""

    PRE_SWITCHOVER = "fail-in-pre-switchover"   # raise once QEMU paused in pre-switchover
    CUT_STREAM = "cut-qemu-stream"              # close QEMU's socket after 16 MiB of stream
    DROP_LATE_PAGE = "drop-late-page"           # drop one data page of RAM's last section


CUT_STREAM_AFTER = 16 << 20
# The page dropped is the first data page of the last section at or above this index
# (4 MiB): the test guest's working set, not its code or mailbox.
DROP_PAGE_FROM = 1024


def active() -> frozenset[Fault]:
    """The faults the environment asks for (unknown names are ignored)."""
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    return frozenset(f for f in Fault if f.value in names)

"""QEMU's own migration as ferry drives it: capabilities, parameters, and its outcome.

The source QEMU runs an ordinary pre-copy into a socket of the source agent: its dirty
log picks each iteration's pages and it decides when to stop the guest (DESIGN §2). The
destination QEMU runs x-ignore-shared over its own shared RAM file, so the stream it is
fed carries everything but that block's pages, which the destination agent writes into
the file. Both run with `events`, so MIGRATION status changes arrive as events.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from agent.errors import QemuError
from agent.qemu import qmp as qmp_mod

SOURCE_CAPABILITIES = ("events", "auto-converge")
"""auto-converge: QEMU throttles the guest's vCPUs when it dirties pages faster than the
link takes them (cpu-throttle-* parameters)."""
PAUSE_BEFORE_SWITCHOVER = "pause-before-switchover"
"""The guest stops, then QEMU waits in `pre-switchover` before its last RAM section and
the device state: ferry starts the disks' final round there (DESIGN §2b)."""
DESTINATION_CAPABILITIES = ("x-ignore-shared", "events")
# Whatever ferry's own pace: QEMU's default max-bandwidth (128 MiB/s in 7.2) would cap
# the stream below the link, and the agent reads only as fast as it ships anyway.
MAX_BANDWIDTH = 1 << 40
# auto-converge steps: QEMU's defaults (20 %, +10 % every other dirty-log sync that finds
# the guest dirtying faster than half the link) take minutes to bite on a slow link;
# these reach 90 % in four steps.
CPU_THROTTLE_INITIAL = 30
CPU_THROTTLE_INCREMENT = 20
SOURCE_PARAMETERS = {"max-bandwidth": MAX_BANDWIDTH,
                     "cpu-throttle-initial": CPU_THROTTLE_INITIAL,
                     "cpu-throttle-increment": CPU_THROTTLE_INCREMENT}
# QEMU's bounds for downtime-limit (ms); MAX_DOWNTIME_MS stands for "switch over now".
MIN_DOWNTIME_MS = 1
MAX_DOWNTIME_MS = 2_000_000
# Statuses of query-migrate in which QEMU's migration still runs.
ACTIVE_STATUSES = frozenset({"setup", "active", "pre-switchover", "device", "cancelling",
                             "postcopy-active", "wait-unplug"})


def capabilities(names: tuple[str, ...], off: tuple[str, ...] = ()) -> dict[str, Any]:
    """Arguments of migrate-set-capabilities turning `names` on and `off` off."""
    return {"capabilities": [{"capability": n, "state": True} for n in names]
            + [{"capability": n, "state": False} for n in off]}


def source_capabilities(*, pause: bool) -> dict[str, Any]:
    """The source's: x-ignore-shared off (QEMU sends all RAM), events, auto-converge, and
    pause-before-switchover when disks need a final round in the pause."""
    on = SOURCE_CAPABILITIES + ((PAUSE_BEFORE_SWITCHOVER,) if pause else ())
    off = ("x-ignore-shared",) + (() if pause else (PAUSE_BEFORE_SWITCHOVER,))
    return capabilities(on, off)


def destination_capabilities() -> dict[str, Any]:
    return capabilities(DESTINATION_CAPABILITIES)


def downtime_limit_ms(seconds: float) -> int:
    """QEMU's downtime-limit for a pause of `seconds`, inside QEMU's bounds."""
    return max(MIN_DOWNTIME_MS, min(MAX_DOWNTIME_MS, round(seconds * 1000)))


async def wait_migration_done(qmp: qmp_mod.Qmp, after: int, timeout: float) -> None:
    """Wait until QEMU's migration reaches `completed`; raise if it fails or stalls."""
    deadline = time.monotonic() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status", "none")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise QemuError(f"QEMU migration {status}: {info.get('error-desc', 'no detail')}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QemuError(f"QEMU migration still {status} after {timeout:g} s")
        with contextlib.suppress(QemuError):
            await qmp.wait_event("MIGRATION", timeout=min(remaining, 0.5), after=after)
        after = qmp.event_mark()


async def cancel_migration(qmp: qmp_mod.Qmp, timeout: float = 5.0) -> str:
    """migrate_cancel, then wait until QEMU's migration no longer runs; its last status.

    A cancelled pre-copy resumes a guest QEMU stopped for it; the caller checks the run
    state afterwards (a completed migration leaves the guest in postmigrate).
    """
    with contextlib.suppress(QemuError):
        await qmp.execute("migrate_cancel")
    deadline = time.monotonic() + timeout
    while True:
        status = str((await qmp.execute("query-migrate")).get("status", "none"))
        if status not in ACTIVE_STATUSES or time.monotonic() > deadline:
            return status
        mark = qmp.event_mark()
        with contextlib.suppress(QemuError):
            await qmp.wait_event("MIGRATION", timeout=0.1, after=mark)

"""QEMU's side of a ferry migration: capabilities and waiting for its migration stream.

Both QEMUs run with x-ignore-shared, so their own migration stream carries only device
state (RAM is the shared file ferry copies), and with `events` so MIGRATION status
changes arrive as events instead of being polled for.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from agent.errors import QemuError
from agent.qemu import qmp as qmp_mod

MIGRATION_CAPABILITIES = ("x-ignore-shared", "events")


def enable_capabilities(names: tuple[str, ...] = MIGRATION_CAPABILITIES) -> dict[str, Any]:
    """Arguments of migrate-set-capabilities turning the named capabilities on."""
    return {"capabilities": [{"capability": n, "state": True} for n in names]}


async def wait_migration_done(qmp: qmp_mod.Qmp, after: int, timeout: float) -> None:
    """Wait until QEMU's migration reaches `completed`; raise if it fails or stalls."""
    deadline = time.monotonic() + timeout
    while True:
        status = (await qmp.execute("query-migrate")).get("status", "none")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            info = await qmp.execute("query-migrate")
            raise QemuError(f"QEMU migration {status}: {info.get('error-desc', 'no detail')}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QemuError(f"QEMU migration still {status} after {timeout:g} s")
        with contextlib.suppress(QemuError):
            await qmp.wait_event("MIGRATION", timeout=min(remaining, 0.5), after=after)
        after = qmp.event_mark()

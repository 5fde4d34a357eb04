"""Auto-converge: slow a guest that dirties memory faster than the link by stopping it in
short duty cycles (QMP stop/cont), so pre-copy can catch up.

QEMU's own cpu-throttle only works inside QEMU's migration; ferry migrates RAM itself,
so it throttles from outside: in every PERIOD_S the guest is stopped for `share` of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agent.errors import QemuError
from agent.qemu import qmp as qmp_mod

log = logging.getLogger(__name__)

PERIOD_S = 0.05


class Throttle:
    """Runs a stop/cont duty cycle on one VM until stopped; the VM ends up running."""

    def __init__(self, qmp: qmp_mod.Qmp) -> None:
        self.qmp = qmp
        self.share = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self._task is not None

    def set_share(self, share: float) -> None:
        """Keep the guest stopped for `share` (0..1) of each period; starts the cycle."""
        self.share = max(0.0, min(share, 0.99))
        if self._task is None and self.share > 0:
            self._task = asyncio.create_task(self._cycle(), name="throttle")

    async def stop(self) -> None:
        """End the duty cycle and make sure the guest is running again."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The cycle may have been cancelled between stop and cont.
        status = await self.qmp.execute("query-status")
        if status.get("status") == "paused":
            await self.qmp.execute("cont")

    async def _cycle(self) -> None:
        while True:
            try:
                await self.qmp.execute("stop")
                await asyncio.sleep(PERIOD_S * self.share)
                await self.qmp.execute("cont")
            except QemuError:
                log.debug("throttle cycle failed", exc_info=True)
                return
            await asyncio.sleep(PERIOD_S * (1 - self.share))

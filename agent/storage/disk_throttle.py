"""Slowing a guest's disk writes so that a disk copy converges, and undoing it.

A dirty bitmap marks whole 64 KiB granules: a guest writing scattered 4 KiB blocks at
5 MiB/s dirties 80 MiB/s of them, more than a 1 Gbit/s link shared with RAM carries, so
the bitmap rounds never shrink and the final round (the guest stopped) copies most of the
disk (9.8 s of downtime measured with the Linux bench's disk scenario). As QEMU's
auto-converge slows the vCPUs, this caps the guest device's write operations and bytes
through QEMU's I/O throttling (`block_set_io_throttle`), so what one round leaves dirty
fits the pause. The device's own limits are kept (ours only ever lower them) and put back
exactly when the migration ends either way; the destination's QEMU never had ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from agent.errors import FerryError, QemuError
from agent.qemu import qmp as qmp_mod

log = logging.getLogger(__name__)

LIMITS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")
"""The limits `block_set_io_throttle` requires, each 0 for none."""
OPTIONAL = ("bps_max", "bps_rd_max", "bps_wr_max", "iops_max", "iops_rd_max", "iops_wr_max",
            "bps_max_length", "bps_rd_max_length", "bps_wr_max_length", "iops_max_length",
            "iops_rd_max_length", "iops_wr_max_length", "iops_size", "group")
"""What else a device's throttling may hold (query-block shows it); QEMU resets whatever a
`block_set_io_throttle` leaves out, so every one present is passed back."""
MIN_WRITE_OPS = 8
"""The lowest write cap: a guest held below this would stall more than it gains."""


def disk_write_cap(dirty_bytes: int, previous_dirty: int | None, round_s: float,
                   rate: float, pause_s: float, granule: int, cap: int | None) -> int | None:
    """The write cap (operations per second) a disk needs so that its copy converges, or
    `cap` unchanged. `dirty_bytes` is what the guest dirtied during the round just sent
    (`round_s` long, at `rate` bytes per second), `previous_dirty` the round before's.

    Nothing changes while the final round would fit `pause_s` (what the disks may take of
    the pause), or while the rounds still shrink by a quarter each. Otherwise the guest
    may dirty at most half of what a round copies per second, and half of what it dirtied
    (of the cap it had), never below MIN_WRITE_OPS: each later round then leaves at most
    half of the one before."""
    if rate <= 0 or round_s <= 0 or dirty_bytes <= 0:
        return cap
    if dirty_bytes / rate <= pause_s:
        return cap
    if previous_dirty is not None and dirty_bytes < 0.75 * previous_dirty:
        return cap
    dirtied_ops = dirty_bytes / granule / round_s
    return max(MIN_WRITE_OPS, int(min(rate / granule, dirtied_ops if cap is None else cap) / 2))


def _target(block: dict[str, Any]) -> dict[str, str]:
    """How block_set_io_throttle names the device: its backend name, else its qdev."""
    if block.get("device"):
        return {"device": str(block["device"])}
    return {"id": str(block.get("qdev") or "")}


@dataclass
class WriteThrottle:
    """One disk's write cap during a migration (found by the format node's name)."""

    qmp: qmp_mod.Qmp
    node: str
    granule: int                                # bytes a bitmap bit stands for
    ops: int | None = None                      # the cap set now, None: ours is not set
    lowest: int | None = None                   # the lowest cap this migration set
    _original: dict[str, Any] = field(default_factory=dict)
    _device: dict[str, str] = field(default_factory=dict)

    @property
    def prepared(self) -> bool:
        return bool(self._device)

    async def prepare(self) -> None:
        """Find the device and read its own limits (before any cap): from then on
        `restore_args` puts them back, for the journal of a job that may crash capped."""
        if not self._device:
            await self._find()

    def restore_args(self) -> dict[str, Any]:
        return {**self._device, **{k: 0 for k in LIMITS}, **self._original}

    async def _find(self) -> None:
        for block in await self.qmp.execute("query-block"):
            inserted = block.get("inserted") or {}
            if inserted.get("node-name") == self.node:
                self._device = _target(block)
                self._original = {k: inserted[k] for k in (*LIMITS, *OPTIONAL)
                                  if k in inserted}
                return
        raise QemuError(f"no guest device uses disk node {self.node}")

    async def cap(self, ops: int) -> int:
        """Cap writes at `ops` per second and `ops` granules' worth of bytes (one write
        dirties about a granule, a large one its size), or the device's total limit of
        that kind if it has one; never above the device's own limits. Returns the cap."""
        ops = max(MIN_WRITE_OPS, ops)
        await self.prepare()
        args = self.restore_args()
        for key, total, value in (("iops_wr", "iops", ops),
                                  ("bps_wr", "bps", ops * self.granule)):
            # QEMU refuses a write limit beside a total one: then the total is capped
            # (reads slow down too, for the minutes of the copy).
            key = total if args.get(total) else key
            own = int(args.get(key) or 0)
            args[key] = min(own, value) if own else value
        await self.qmp.execute("block_set_io_throttle", args)
        self.ops = ops
        self.lowest = ops if self.lowest is None else min(self.lowest, ops)
        return ops

    async def release(self) -> None:
        """Put the device's own limits back (none, if it had none)."""
        if self.ops is None:
            return
        self.ops = None
        try:
            await restore(self.qmp, self.restore_args())
        except (FerryError, OSError) as exc:
            # The source QEMU quits once the VM runs at the destination: nothing to undo.
            log.debug("disk node %s: write cap not lifted: %s", self.node, exc)


async def restore(qmp: qmp_mod.Qmp, args: dict[str, Any]) -> None:
    """Put a device's own limits back (`WriteThrottle.restore_args`: none, if it had none);
    also what a restarted agent does for a job its crash left capped."""
    await qmp.execute("block_set_io_throttle", args)

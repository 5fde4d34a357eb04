"""Moving a running VM's disk to other storage on this host, live, through QEMU's own
mirror job (DESIGN §5, checked on QEMU 7.2).

ferry creates the target image (`qemu-img create`), adds it to QEMU (`blockdev-add`, a
format node over a file node, named by ferry), mirrors the disk's top node into it
(`blockdev-mirror` sync=full, auto-dismiss off so that ferry reads how the job ended), and
once QEMU says the copy is in sync (job `ready`) completes the job (`job-complete`): QEMU
switches the device to the new image atomically and the job concludes. Any failure before
that, a cancel included, cancels the job, deletes the node and the file ferry created; the
VM stays on its old image. The old image is kept after a move: the operator removes it.

auto-finalize stays on: a mirror that has completed holds the disk drained until it is
finalized, so with auto-finalize off every guest write (and every main-loop I/O, e.g. HMP
qemu-io) waits for ferry's `job-finalize`, forever if the agent dies in between; seen on
QEMU 7.2 as a deadlock of a qemu-io write against that window. The switch is decided by
`job-complete` anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import FerryError, LocalError, QemuError, UserError
from agent.qemu import qmp as qmp_mod
from agent.qemu.hostrules import is_under
from agent.qemu.vmspec import DISK_FORMATS
from agent.storage.disk_sink import SPACE_MARGIN

log = logging.getLogger(__name__)

PROGRESS_S = 0.5            # how often the job's figures are read and published
STEP_TIMEOUT_S = 60.0       # a job state change after job-complete or job-cancel
QCOW2_DEFAULT_CLUSTER = 64 << 10
# A source qcow2's cluster size is kept when it is one of these; else the default. Tiny
# clusters make huge metadata, and QEMU's limit is 2 MiB.
QCOW2_CLUSTERS = frozenset(1 << n for n in range(16, 22))
QEMU_IMG_TIMEOUT_S = 60.0

Progress = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class VmDisk:
    """One drive of a VM as query-block shows it."""

    device: str          # the drive id (-drive id=), else "" (a -blockdev disk)
    qdev: str            # the guest device's id (vd0), or its QOM path's id
    node: str            # the top block node the device uses (what the mirror copies)
    path: str            # the image file of that node ("" when nothing is inserted)
    format: str
    virtual_size: int
    allocated: int       # host bytes the image chain takes (what a copy needs at most)
    cluster_size: int | None
    read_only: bool
    removable: bool      # CD-ROM, floppy: media, not a disk ferry moves

    @property
    def name(self) -> str:
        """The name operators see first: the drive id, else the device id, else the node."""
        return self.device or self.qdev or self.node

    def describe(self) -> str:
        return f"{self.name} (node {self.node or '-'}, {self.path or 'empty'})"


def _qdev_id(qdev: str) -> str:
    """vd0 from /machine/peripheral/vd0/virtio-backend; an id as it is."""
    parts = [p for p in qdev.split("/") if p]
    if len(parts) >= 3 and parts[0] == "machine" and parts[1] == "peripheral":
        return parts[2]
    return parts[-1] if parts else ""


def _chain_allocated(image: dict[str, Any]) -> int:
    """Host bytes of an image and its backing chain (a full mirror flattens it)."""
    total = 0
    while image:
        total += int(image.get("actual-size") or 0)
        image = image.get("backing-image") or {}
    return total


def vm_disks(blocks: list[dict[str, Any]]) -> list[VmDisk]:
    """Every drive in a query-block answer, inserted or not."""
    disks = []
    for block in blocks:
        inserted = block.get("inserted") or {}
        image = inserted.get("image") or {}
        cluster = image.get("cluster-size")
        disks.append(VmDisk(
            device=str(block.get("device") or ""), qdev=_qdev_id(str(block.get("qdev") or "")),
            node=str(inserted.get("node-name") or ""), path=str(inserted.get("file") or ""),
            format=str(inserted.get("drv") or ""),
            virtual_size=int(image.get("virtual-size") or 0),
            allocated=_chain_allocated(image),
            cluster_size=int(cluster) if cluster else None,
            read_only=bool(inserted.get("ro")), removable=bool(block.get("removable"))))
    return disks


def _same_file(a: str, b: str) -> bool:
    return bool(a) and bool(b) and (a == b or (os.path.isabs(a) and os.path.isabs(b)
                                              and os.path.realpath(a) == os.path.realpath(b)))


def find_disk(disks: list[VmDisk], name: str) -> VmDisk:
    """The disk `name` names (drive id, device id, node name or image path), or a
    UserError listing the VM's disks."""
    found = [d for d in disks if name and name in (d.device, d.qdev, d.node)]
    if not found:
        found = [d for d in disks if _same_file(d.path, name)]
    if len(found) == 1:
        return found[0]
    listing = "; ".join(d.describe() for d in disks) or "none"
    if found:
        raise UserError(f"disk {name!r} is ambiguous: it names {len(found)} disks ({listing}); "
                        f"name one by its node name")
    raise UserError(f"no disk {name!r} in this VM; its disks: {listing}")


@dataclass(frozen=True, slots=True)
class MovePlan:
    """What a move will do, once every refusal has been checked."""

    disk: VmDisk
    target: Path
    format: str
    needed: int          # bytes the target's file system must have free
    cluster_size: int | None


def plan_move(disk: VmDisk, block_jobs: list[dict[str, Any]], target: str, fmt: str | None,
              roots: tuple[Path, ...]) -> MovePlan:
    """Refuse before anything starts: a CD or read-only disk, a disk in a block job, a
    target outside the allowed paths, existing, in a missing directory, or on a file
    system without room for the disk's allocated data (plus SPACE_MARGIN)."""
    if disk.removable:
        raise UserError(f"disk {disk.describe()} is removable media (a CD-ROM or floppy): "
                        f"ferry moves disks only")
    if not disk.node or not disk.path:
        raise UserError(f"disk {disk.name} has no image inserted")
    if disk.read_only:
        raise UserError(f"disk {disk.describe()} is read-only: nothing to move live (copy "
                        f"the image and point the VM at it)")
    if block_jobs:
        # A job's "device" is its id, not always a disk's name, and a job on any node may
        # be rewriting this disk's chain: refuse while any runs.
        names = ", ".join(f"{j.get('type')} job {j.get('device')!r}" for j in block_jobs)
        raise UserError(f"the VM's disks are in a block job ({names}); wait for it to "
                        f"finish or cancel it before moving disk {disk.name}")
    fmt = fmt or disk.format
    if fmt not in DISK_FORMATS:
        raise UserError(f"target format {fmt!r}: ferry writes {' or '.join(DISK_FORMATS)} "
                        f"(give --format)")
    path = Path(target)
    if not path.is_absolute():
        raise UserError(f"target {target!r} must be an absolute path")
    if not is_under(path.parent, roots):
        raise UserError(f"target {target}: directory {path.parent} is outside the agent's "
                        f"allowed paths ({', '.join(str(r) for r in roots)}); start the "
                        f"agent with --allow-path")
    if os.path.lexists(path):
        raise UserError(f"target {target} already exists: ferry creates the target image "
                        f"itself; remove it or choose another path")
    if not path.parent.is_dir():
        raise UserError(f"target {target}: directory {path.parent} does not exist")
    if _same_file(disk.path, str(path)):
        raise UserError(f"target {target} is the disk's current image")
    needed = disk.allocated + SPACE_MARGIN
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise UserError(f"not enough space for {target}: disk {disk.name} holds "
                        f"{disk.allocated >> 20} MiB of data, {needed >> 20} MiB needed with "
                        f"the margin, {free >> 20} MiB free in {path.parent}")
    cluster = None
    if fmt == "qcow2":
        cluster = disk.cluster_size if disk.cluster_size in QCOW2_CLUSTERS \
            else QCOW2_DEFAULT_CLUSTER
    return MovePlan(disk=disk, target=path, format=fmt, needed=needed, cluster_size=cluster)


def create_image(plan: MovePlan) -> None:
    """The empty target image, of the disk's virtual size."""
    argv = ["qemu-img", "create", "-q", "-f", plan.format]
    options = [f"size={plan.disk.virtual_size}"]
    if plan.cluster_size is not None:
        options.append(f"cluster_size={plan.cluster_size}")
    argv += ["-o", ",".join(options), str(plan.target)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalError(f"qemu-img create {plan.target} failed: {exc}") from exc
    if done.returncode != 0:
        raise LocalError(f"qemu-img create {plan.target} failed: "
                         f"{(done.stderr or done.stdout).strip()}")


def move_name(job_id: str) -> str:
    """The node and the mirror job a move adds to QEMU: its recovery finds them by it."""
    return f"ferry-mv-{job_id}"


class MoveFailed(FerryError):
    """The mirror job ended with an error QEMU reported (target full, I/O error)."""


@dataclass
class DiskMove:
    """One disk move on one VM: run() returns its report and never leaves the VM off its
    old image unless the switch happened."""

    qmp_path: Path
    disk_name: str
    target: str
    format: str | None
    roots: tuple[Path, ...]
    job_id: str
    progress: Progress
    cancel: asyncio.Event
    vm_name: str | None = None
    speed: int | None = None        # the mirror's own rate limit, bytes/s
    before_create: Callable[[Path], None] | None = None
    """Called with the target's path before it is created (the agent journals it)."""

    def __post_init__(self) -> None:
        self.node = self.mirror_job = move_name(self.job_id)
        self.plan: MovePlan | None = None
        self._created = self._added = self._started = False
        self._switched = False
        self._started_at = time.monotonic()
        self._bytes = 0
        self._mirror_s = 0.0
        self.old_image_released = False

    async def run(self) -> dict[str, Any]:
        report: dict[str, Any] = {"event": "result", "job": self.job_id,
                                  "vm": self.vm_name or str(self.qmp_path),
                                  "disk": self.disk_name, "target": self.target}
        try:
            async with qmp_mod.connect(self.qmp_path, name=f"move-{self.job_id}") as qmp:
                try:
                    await self._move(qmp)
                except BaseException as exc:
                    await self._roll_back(qmp, exc)
                    raise
            status, phase, error, reason = "completed", "completed", None, None
        except asyncio.CancelledError:
            raise
        except FerryError as exc:
            cancelled = self.cancel.is_set() and not self._switched
            status = "cancelled" if cancelled else "failed"
            phase, error = status, str(exc)
            reason = "cancelled" if cancelled else type(exc).__name__
            log.info("disk move %s: %s", self.job_id, exc)
            log.debug("disk move %s failed", self.job_id, exc_info=True)
        plan = self.plan
        report.update(status=status, phase=phase, error=error, error_reason=reason,
                      total_ms=round((time.monotonic() - self._started_at) * 1000, 1),
                      mirror_ms=round(self._mirror_s * 1000, 1), bytes=self._bytes)
        if plan is not None:
            report.update(disk=plan.disk.name, node=plan.disk.node, source=plan.disk.path,
                          source_format=plan.disk.format, format=plan.format,
                          target=str(plan.target), virtual_size=plan.disk.virtual_size)
            if self._switched:   # completed, or only what followed the switch failed
                report["old_image"] = plan.disk.path
                report["old_image_released"] = self.old_image_released
                report["note"] = (f"the VM now runs on {plan.target}; its old image "
                                  f"{plan.disk.path} is kept: remove it when no longer needed")
            else:
                undone = "the target was removed" if self._created else "nothing was created"
                report["note"] = f"the VM stays on its old image {plan.disk.path}; {undone}"
        return report

    # ------------------------------------------------------------------ steps

    async def _move(self, qmp: qmp_mod.Qmp) -> None:
        status = (await qmp.execute("query-status")).get("status")
        if status != "running":
            raise UserError(f"the VM is not running (QEMU status {status!r}): ferry moves "
                            f"the disks of running VMs only")
        disks = vm_disks(await qmp.execute("query-block"))
        disk = find_disk(disks, self.disk_name)
        plan = plan_move(disk, await qmp.execute("query-block-jobs"), self.target, self.format,
                         self.roots)
        self.plan = plan
        self._check_cancel()
        if self.before_create is not None:
            self.before_create(plan.target)
        await asyncio.to_thread(create_image, plan)
        self._created = True
        self._check_cancel()
        await qmp.execute("blockdev-add", {
            "driver": plan.format, "node-name": self.node,
            "file": {"driver": "file", "filename": str(plan.target),
                     "node-name": f"{self.node}-file"}})
        self._added = True
        self._check_cancel()
        args: dict[str, Any] = {"job-id": self.mirror_job, "device": disk.node,
                                "target": self.node, "sync": "full",
                                "auto-dismiss": False}
        if self.speed:
            args["speed"] = self.speed
        mirror_started = time.monotonic()
        mark = qmp.event_mark()
        await qmp.execute("blockdev-mirror", args)
        self._started = True
        log.info("disk move %s: mirroring %s to %s (%s)", self.job_id, disk.describe(),
                 plan.target, plan.format)
        await self._until_ready(qmp, mark, mirror_started)
        self._check_cancel()
        await self._switch(qmp)
        self._mirror_s = time.monotonic() - mirror_started
        now = next((d for d in vm_disks(await qmp.execute("query-block"))
                    if d.qdev == disk.qdev and d.device == disk.device), None)
        if now is None or not _same_file(now.path, str(plan.target)):
            raise QemuError(f"QEMU completed the mirror but disk {disk.name} shows "
                            f"{now.path if now else 'nothing'}, not {plan.target}")
        self.old_image_released = await self._release_old(qmp, disk)

    async def _release_old(self, qmp: qmp_mod.Qmp, disk: VmDisk) -> bool:
        """Close the old image in QEMU, so that removing it frees its space: nodes added by
        -blockdev or blockdev-add (an earlier move's) outlive the switch, unused; -drive's
        go by themselves. blockdev-del refuses a node still in use, which then stays.
        Whether QEMU still holds the old image open is returned."""
        candidates = [disk.node] if not disk.node.startswith("#") else []
        for node in await qmp.execute("query-named-block-nodes", {"flat": True}):
            name = str(node.get("node-name") or "")
            if node.get("drv") == "file" and _same_file(str(node.get("file") or ""), disk.path) \
                    and not name.startswith("#") and name not in candidates:
                candidates.append(name)
        for name in candidates:
            with contextlib.suppress(QemuError):
                await qmp.execute("blockdev-del", {"node-name": name})
        return not any(_same_file(str(n.get("file") or ""), disk.path)
                       for n in await qmp.execute("query-named-block-nodes", {"flat": True}))

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise LocalError("disk move cancelled")

    async def _job(self, qmp: qmp_mod.Qmp) -> dict[str, Any] | None:
        for job in await qmp.execute("query-jobs"):
            if job.get("id") == self.mirror_job:
                return dict(job)
        return None

    async def _until_ready(self, qmp: qmp_mod.Qmp, mark: int, started: float) -> None:
        """Publish the copy's progress until the job is ready (or fails, or is cancelled)."""
        last_done, last_at = 0, started
        while True:
            job = await self._job(qmp)
            if job is None:
                raise QemuError(f"the mirror job {self.mirror_job} disappeared")
            state = job.get("status")
            if state == "concluded" or state == "aborting" or job.get("error"):
                raise MoveFailed(f"QEMU's mirror job failed: "
                                 f"{job.get('error') or self._completed_error(qmp, mark)}")
            done, total = int(job.get("current-progress", 0)), int(job.get("total-progress", 0))
            self._bytes = done
            now = time.monotonic()
            rate = (done - last_done) / (now - last_at) if now > last_at else 0.0
            last_done, last_at = done, now
            await self.progress({"event": "progress",
                                 "phase": "ready" if state == "ready" else "mirroring",
                                 "job": self.job_id, "disk": self.disk_name,
                                 "bytes_done": done, "bytes_total": total,
                                 "throughput_bps": round(max(rate, 0.0)),
                                 "elapsed_s": round(now - started, 3)})
            if state == "ready":
                return
            self._check_cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROGRESS_S):
                    await self.cancel.wait()
            self._check_cancel()

    def _completed_error(self, qmp: qmp_mod.Qmp, mark: int) -> str:
        for event in qmp.events("BLOCK_JOB_COMPLETED", after=mark):
            if event.data.get("device") == self.mirror_job and event.data.get("error"):
                return str(event.data["error"])
        return "no reason given"

    async def _wait_status(self, qmp: qmp_mod.Qmp, mark: int, *wanted: str) -> str:
        """The job's first status in `wanted` after mark (or now, if it is there already)."""
        job = await self._job(qmp)
        if job is not None and job.get("status") in wanted:
            return str(job["status"])
        event = await qmp.wait_event(
            "JOB_STATUS_CHANGE", after=mark, timeout=STEP_TIMEOUT_S,
            match=lambda e: e.data.get("id") == self.mirror_job and e.data.get("status") in wanted)
        return str(event.data["status"])

    async def _switch(self, qmp: qmp_mod.Qmp) -> None:
        """Complete the ready job: QEMU drains the last writes, switches the device to the
        new image and concludes the job (or concludes it with an error, the VM on its old
        image)."""
        await self.progress({"event": "progress", "phase": "switching", "job": self.job_id,
                             "disk": self.disk_name, "bytes_done": self._bytes,
                             "bytes_total": self._bytes, "throughput_bps": 0})
        mark = qmp.event_mark()
        await qmp.execute("job-complete", {"id": self.mirror_job})
        await self._wait_status(qmp, mark, "concluded")
        job = await self._job(qmp)
        if job is None or job.get("error"):
            raise MoveFailed(f"QEMU's mirror job failed while completing: "
                             f"{(job or {}).get('error') or self._completed_error(qmp, mark)}")
        self._switched = True
        await qmp.execute("job-dismiss", {"id": self.mirror_job})
        self._started = False
        log.info("disk move %s: the VM now uses %s", self.job_id,
                 self.plan.target if self.plan else "?")

    async def _roll_back(self, qmp: qmp_mod.Qmp, cause: BaseException) -> None:
        """Undo what was done: job, node, file. The VM runs on its old image throughout."""
        if self._switched:
            return   # only the dismiss failed: the move itself is done
        if self._started and qmp.connected:
            # Each step on its own: a job that failed by itself may be aborting already
            # (QEMU refuses the cancel) and still needs its dismiss.
            mark = qmp.event_mark()
            with contextlib.suppress(QemuError):
                await qmp.execute("job-cancel", {"id": self.mirror_job})
            with contextlib.suppress(QemuError):
                await self._wait_status(qmp, mark, "concluded")
            try:
                await qmp.execute("job-dismiss", {"id": self.mirror_job})
            except QemuError as exc:
                log.error("disk move %s: cannot dismiss QEMU's job %s: %s", self.job_id,
                          self.mirror_job, exc)
        if self._added and qmp.connected:
            try:
                await qmp.execute("blockdev-del", {"node-name": self.node})
            except QemuError as exc:
                log.error("disk move %s: cannot remove node %s from QEMU: %s", self.job_id,
                          self.node, exc)
        if self._created and self.plan is not None:
            try:
                self.plan.target.unlink(missing_ok=True)
            except OSError as exc:
                log.error("disk move %s: cannot remove %s: %s", self.job_id, self.plan.target,
                          exc)


async def recover(qmp_path: str, job_id: str, target: Path) -> str:
    """Settle a move whose agent died: what QEMU still holds of it tells how far it got.
    Switched (the job concluded well, or a device uses the target): the move stands, the
    job is dismissed. Anything short of that is undone as a failed move would be: the job
    cancelled, the node removed, the target deleted. With its QEMU gone the target is
    kept (it may be the disk the VM last ran on) and said so. What was done, in words."""
    name = move_name(job_id)
    try:
        async with qmp_mod.connect(qmp_path, name=f"recover-{job_id}") as qmp:
            job = next((j for j in await qmp.execute("query-jobs") if j["id"] == name), None)
            if job is not None and job["status"] == "concluded" and not job.get("error"):
                await qmp.execute("job-dismiss", {"id": name})
                return f"the move to {target} had completed: the VM runs on it"
            if job is None and any(_same_file(d.path, str(target))
                                   for d in vm_disks(await qmp.execute("query-block"))):
                return f"the move to {target} had completed: the VM runs on it"
            if job is not None:
                mark = qmp.event_mark()
                if job["status"] != "concluded":
                    with contextlib.suppress(QemuError):
                        await qmp.execute("job-cancel", {"id": name})
                    with contextlib.suppress(QemuError):
                        await qmp.wait_event("JOB_STATUS_CHANGE", after=mark,
                                             timeout=STEP_TIMEOUT_S,
                                             match=lambda e: e.data.get("id") == name and
                                             e.data.get("status") == "concluded")
                with contextlib.suppress(QemuError):
                    await qmp.execute("job-dismiss", {"id": name})
            if any(n.get("node-name") == name
                   for n in await qmp.execute("query-named-block-nodes", {"flat": True})):
                await qmp.execute("blockdev-del", {"node-name": name})
    except (FerryError, OSError) as exc:
        return (f"its VM's QEMU cannot be asked ({exc}); {target} is kept, since the VM may "
                f"have run on it: remove it if the VM's disk is elsewhere")
    target.unlink(missing_ok=True)
    return f"rolled back: the VM stays on its old image; {target} was removed"

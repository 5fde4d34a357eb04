"""The peer's side of `ferry import SOURCE --to PEER`: one import conversation
(agent.importer.talk) from a trusted agent that reads another hypervisor's images.

It checks the IMPORT (every field, the targets under this agent's allowed paths, the VM
name free here, the space), creates each target image (qcow2 or raw, as a local import
does: agent.importer.copy), writes the disk batches through its own writable
qemu-storage-daemon export with the migration's DiskWriter, and at each DISK_END flushes,
hashes the target (agent.importer.verify: a read of the target, not a transfer) and sends
the hashes back for the source to compare. FINISH records the VM stopped
(`HOME/vms/NAME/import.json`, whatever directory its disks are in) or starts it. A warm
pass keeps its targets, each marked with the import's token beside it
(`TARGET.ferry-import`) so the next pass accepts it; a failed pass removes the targets
it created (and the directory), an ABORT too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.batch.format import HASH_SIZE
from agent.errors import (
    FerryError,
    LocalError,
    NbdCommandError,
    ProtocolError,
    UserError,
    failure_reason,
)
from agent.importer import talk, verify
from agent.importer.copy import check_space, check_target, create_target, space_needed, target_spec
from agent.importer.definition import RECORD_FILE, VmDefinition
from agent.importer.images import EXPORT, StorageDaemon
from agent.importer.talk import ImportRequest
from agent.migration.claims import Claims
from agent.migration.conversation import CheckedLink
from agent.migration.link import parse_message, remote_failure, send_control
from agent.migration.protocol import Control, Op
from agent.qemu.destargv import DiskTarget
from agent.qemu.hostrules import require_allowed
from agent.state import vms
from agent.state.config import AgentConfig
from agent.storage.disk_sink import DiskWriter
from agent.storage.disk_source import DISK_BLOCK, DISK_HEADER, blocks_of
from agent.storage.nbd import NbdClient
from agent.storage.nbd_proto import BASE_ALLOCATION

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".ferry-import"
"""Beside a warm import's target: whose target it is (token, peer, VM, size)."""

StartVm = Callable[[VmDefinition, bool], Awaitable[vms.VmRecord]]
"""Starts an imported VM here (the daemon's: `ferry vm start`'s code), private RAM or not."""


class _Aborted(Exception):
    """The source said ABORT."""


def marker_path(target: Path) -> Path:
    return target.with_name(target.name + MARKER_SUFFIX)


@dataclass
class ImportSink:
    """One incoming import pass, driven by the messages of one link."""

    config: AgentConfig
    link: CheckedLink
    peer: str
    start_vm: StartVm
    claims: Claims = field(default_factory=Claims)
    job_id: str = ""
    vm_name: str | None = None
    request: ImportRequest | None = None
    directory: Path | None = None
    targets: list[Path] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)      # by this pass: removed on failure
    created_dir: bool = False
    received_bytes: int = 0
    disks_done: int = 0
    finished: dict[str, object] | None = None   # FINISHED's body once the pass is over
    error: str | None = None
    error_reason: str | None = None
    _writer: DiskWriter | None = None
    _disk_stack: contextlib.AsyncExitStack | None = None
    _work: Path | None = None

    @property
    def label(self) -> str:
        return f"import {self.job_id or '?'} of {self.vm_name or '?'} from {self.peer}"

    async def run(self, first: Control) -> None:
        """Serve the pass IMPORT began to its FINISH, or remove what it made; raises only
        CancelledError."""
        try:
            self.request = ImportRequest.parse(first)
            self.job_id = self.request.job
            self.vm_name = self.request.definition.name
            self.claims.claim(f"vm:{self.vm_name}", self.job_id, f"VM name {self.vm_name}")
            self._prepare(self.request)
            await send_control(self.link, Op.IMPORT_READY,
                               targets=[str(t) for t in self.targets],
                               vm_dir=str(self.directory))
            await self._serve(self.request)
        except asyncio.CancelledError:
            self.error, self.error_reason = "the agent is shutting down", "shutdown"
            await self._remove()
            raise
        except _Aborted as exc:
            self.error, self.error_reason = f"aborted by the source: {exc}", "cancelled"
            removed = await self._remove()
            with contextlib.suppress(FerryError, ConnectionError):
                await send_control(self.link, Op.ABORTED, removed=removed)
        except Exception as exc:
            if isinstance(exc, FerryError):
                log.error("%s failed: %s", self.label, exc)
            else:
                log.exception("%s: unexpected error", self.label)
                exc = LocalError(f"import destination internal error: {exc!r}")
            self.error, self.error_reason = str(exc), failure_reason(exc)
            removed = await self._remove()
            with contextlib.suppress(FerryError, ConnectionError):
                await send_control(self.link, Op.ERROR, message=str(exc),
                                   error_type=type(exc).__name__, removed=removed)
        finally:
            if self._work is not None:
                shutil.rmtree(self._work, ignore_errors=True)
            self.claims.release(self.job_id)

    # ------------------------------------------------------------------ prepare

    def _prepare(self, request: ImportRequest) -> None:
        """Every refusal before anything is made; then the targets of a first pass."""
        config, defn = self.config, request.definition
        name = defn.name
        if vms.is_running(self.config, name) or vms.record_path(config, name).exists():
            raise UserError(f"a VM named {name} is already on {self.config.home} (the "
                            f"import's destination); choose another --name")
        default = config.vms_dir / name
        directory = Path(request.directory) if request.directory else default
        if (directory / RECORD_FILE).exists() or (default / RECORD_FILE).exists():
            raise UserError(f"a VM named {name} was already imported on the destination "
                            f"({directory / RECORD_FILE}); choose another --name")
        targets = [directory / f"{name}-disk{d.index}.{request.target_format}"
                   for d in request.disks]
        for target in targets:
            # Under the allowed paths, and its directory there (only the default is made).
            if directory == default:
                require_allowed(str(target), config.roots, "import target")
            else:
                check_target(target, config.roots)
        if request.first_pass:
            self._check_new(request, targets, directory)
        else:
            self._check_kept(request, targets)
        self.directory, self.targets = directory, targets
        if request.first_pass:
            if not directory.exists():
                directory.mkdir(parents=True)
                self.created_dir = True
            for offer, target in zip(request.disks, targets, strict=True):
                create_target(target, request.target_format, offer.virtual_size)
                self.created.append(target)
                if request.warm:
                    self._write_marker(target, offer.virtual_size)
        log.info("%s: %d target(s) in %s (%s pass)", self.label, len(targets), directory,
                 "first" if request.first_pass else "later")

    def _check_new(self, request: ImportRequest, targets: list[Path], directory: Path) -> None:
        for target in targets:
            if os.path.lexists(target) or os.path.lexists(marker_path(target)):
                raise UserError(f"import target {target} already exists on the destination; "
                                f"remove it (and {marker_path(target).name} beside it) or "
                                f"choose another --name or --dir")
        # The space all targets need together (they share the directory's file system).
        total = 0
        existing = next(p for p in (directory, *directory.parents) if p.is_dir())
        for offer, target in zip(request.disks, targets, strict=True):
            check_space(existing / target.name, offer.allocated, request.target_format,
                        offer.virtual_size, also=total)
            total += space_needed(offer.allocated, request.target_format, offer.virtual_size)

    def _check_kept(self, request: ImportRequest, targets: list[Path]) -> None:
        """A later pass: each target must be the one an earlier pass of this import made."""
        for offer, target in zip(request.disks, targets, strict=True):
            marker = marker_path(target)
            try:
                mark = json.loads(marker.read_text())
            except (OSError, ValueError) as exc:
                raise UserError(f"no warm import target {target} from an earlier pass on the "
                                f"destination ({marker.name}: {exc}); remove the source's "
                                f"warm state (the error on the source names it) to start "
                                f"with a full copy") from None
            if not isinstance(mark, dict) or mark.get("token") != request.token \
                    or mark.get("peer") != self.peer:
                raise UserError(f"import target {target} on the destination belongs to "
                                f"another import (its {marker.name} names another token or "
                                f"peer); choose another --name or --dir")
            if mark.get("virtual_size") != offer.virtual_size or not target.exists():
                raise UserError(f"import target {target} on the destination is missing or "
                                f"was made for a disk of {mark.get('virtual_size')} bytes, "
                                f"the source is {offer.virtual_size}; remove it and the "
                                f"source's warm state to start over")

    def _write_marker(self, target: Path, virtual_size: int) -> None:
        assert self.request is not None
        marker_path(target).write_text(json.dumps({
            "token": self.request.token, "peer": self.peer, "vm": self.vm_name,
            "virtual_size": virtual_size}) + "\n")

    # ------------------------------------------------------------------ copy

    async def _serve(self, request: ImportRequest) -> None:
        while True:
            kind, payload = await self.link.receive()
            msg = parse_message(kind, payload)
            if msg is None:          # the table lets only DISK_BATCH through
                self.received_bytes += len(payload)
                await self._apply(request, memoryview(payload))
            elif msg.op is Op.DISK_END:
                talk.check_disk_end(msg, self.disks_done)
                await self._disk_end(request)
            elif msg.op is Op.FINISH:
                if self.disks_done != len(request.disks):
                    raise ProtocolError(f"finish after {self.disks_done} of "
                                        f"{len(request.disks)} disks")
                await self._finish(request, msg)
                return
            elif msg.op is Op.ABORT:
                raise _Aborted(str(msg.body.get("reason", "no reason given"))[:200])
            elif msg.op is Op.ERROR:
                raise remote_failure(msg)

    async def _apply(self, request: ImportRequest, payload: memoryview) -> None:
        if payload.nbytes < DISK_HEADER.size:
            raise ProtocolError("disk batch without its disk index")
        (index,) = DISK_HEADER.unpack_from(payload)
        if index != self.disks_done:
            raise ProtocolError(f"disk batch for disk {index} while disk {self.disks_done} "
                                f"is being sent")
        writer = self._writer or await self._open(request, index)
        await writer.apply(payload[DISK_HEADER.size:])

    async def _open(self, request: ImportRequest, index: int) -> DiskWriter:
        """The writable export of disk `index`'s target and its writer."""
        target, size = self.targets[index], request.disks[index].virtual_size
        if self._work is None:
            run_dir = self.config.run_dir
            self._work = Path(tempfile.mkdtemp(prefix="ferry-import-in-",
                                               dir=run_dir if run_dir.is_dir() else None))
        stack = contextlib.AsyncExitStack()
        self._disk_stack = stack
        daemon = await stack.enter_async_context(
            StorageDaemon(target, request.target_format, self._work / f"dst{index}.nbd",
                          writable=True))
        nbd = await stack.enter_async_context(
            NbdClient.connect(daemon.socket_path, EXPORT, meta_contexts=[BASE_ALLOCATION]))
        if nbd.size != size:
            raise UserError(f"import target {target} has {nbd.size} bytes, the source disk "
                            f"{size}")
        self._writer = DiskWriter(target_spec(target, request.target_format, size),
                                  DiskTarget(str(target), request.target_format), nbd=nbd)
        return self._writer

    async def _disk_end(self, request: ImportRequest) -> None:
        """Flush this disk, hash its target and send the hashes, then close it."""
        index = self.disks_done
        writer = self._writer or await self._open(request, index)
        assert writer.nbd is not None and self._disk_stack is not None
        await writer.drain()
        try:
            await writer.nbd.flush()
        except NbdCommandError as exc:
            raise LocalError(writer.write_failure(exc)) from exc
        hashes = await verify.export_hashes(writer.nbd, DISK_BLOCK)
        nblocks = blocks_of(request.disks[index].virtual_size)
        assert len(hashes) == nblocks * HASH_SIZE
        view = memoryview(hashes)
        for first in range(0, nblocks, talk.HASH_RUN_BLOCKS):
            stop = min(nblocks, first + talk.HASH_RUN_BLOCKS)
            await send_control(self.link, Op.HASHES, **talk.hashes_body(
                index, first, view[first * HASH_SIZE:stop * HASH_SIZE]))
        await send_control(self.link, Op.DISK_WRITTEN, disk=index,
                           blocks_written=writer.blocks_written,
                           bytes_written=writer.bytes_written)
        self._writer, stack, self._disk_stack = None, self._disk_stack, None
        await stack.aclose()
        self.disks_done += 1

    # ------------------------------------------------------------------ create

    async def _finish(self, request: ImportRequest, msg: Control) -> None:
        """FINISH: a warm pass keeps its targets; else the VM is recorded, maybe started."""
        create, start = msg.body.get("create"), msg.body.get("start")
        private = msg.body.get("private", False)
        if not all(isinstance(v, bool) for v in (create, start, private)):
            raise ProtocolError("finish message: create, start and private must be "
                                "true/false")
        assert self.directory is not None
        body: dict[str, object] = {"name": self.vm_name, "vm_dir": str(self.directory),
                                   "targets": [str(t) for t in self.targets],
                                   "created": False, "started": False}
        if not create:
            self.created.clear()            # kept for the next pass
            self.created_dir = False
            self.finished = body
            await send_control(self.link, Op.FINISHED, **body)
            return
        defn = request.definition
        disks = iter(self.targets)
        imported = dataclasses.replace(defn, disks=tuple(
            dataclasses.replace(d, path=next(disks), format=request.target_format)
            for d in defn.disks if d.media == "disk"))
        # The record lives in the VM's own directory (where `ferry vm start NAME` looks,
        # and its QMP socket and serial log go), its disks wherever --dir put them.
        home = self.config.vms_dir / defn.name
        home.mkdir(parents=True, exist_ok=True)
        (home / RECORD_FILE).write_text(json.dumps(imported.to_json(), indent=2) + "\n")
        self.created.clear()                # the VM's disks now: nothing is removed
        self.created_dir = False
        for target in self.targets:
            marker_path(target).unlink(missing_ok=True)
        body.update(created=True, vm_dir=str(home), disk_dir=str(self.directory))
        if start:
            try:
                record = await self.start_vm(imported, private)
                body.update(started=True, pid=record.pid)
            except FerryError as exc:
                # The disks are verified and the VM recorded: keep it, say why it is off.
                log.warning("%s: created, but it did not start: %s", self.label, exc)
                body["start_error"] = str(exc)
        if not body["started"]:
            vms.register(self.config, vms.VmRecord(name=defn.name, pid=0, qmp_path="",
                                                   ram_path="", vm_dir=str(home)))
        log.info("%s: VM %s recorded in %s%s", self.label, defn.name, self.directory,
                 ", started" if body["started"] else "")
        self.finished = body
        await send_control(self.link, Op.FINISHED, **body)

    # ------------------------------------------------------------------ failure

    async def _remove(self) -> list[str]:
        """Close the open disk and remove the targets this pass created (a warm target
        from an earlier pass stays: the source forgets the blocks this pass touched)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            for task in writer.pending:
                task.cancel()
            if writer.nbd is not None:
                writer.nbd.abort()
        stack, self._disk_stack = self._disk_stack, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()
        removed = []
        for target in self.created:
            target.unlink(missing_ok=True)
            marker_path(target).unlink(missing_ok=True)
            removed.append(str(target))
        self.created.clear()
        if self.created_dir and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.created_dir = False
        if removed:
            log.info("%s: removed %s", self.label, ", ".join(removed))
        return removed

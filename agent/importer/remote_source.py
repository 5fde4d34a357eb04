"""The importing agent's side of `ferry import SOURCE --to PEER`: one pass of an import
job, every disk read here and written on the peer (agent.importer.remote_sink), over the
authenticated channel in the import conversation (agent.importer.talk).

Each source image is opened read-only by a qemu-storage-daemon (any format QEMU reads;
inside an OVA, in place) and its allocated ranges are read and encoded with the
migration's disk path (agent.storage.disk_source.encoded_batches: zeros never read nor
sent, repeated blocks sent as copies, zstd when asked for) into DISK_BATCH messages. The
encoder's hashes of what was sent are then compared with the hashes the peer reads back
from its target: the verification costs the peer one read of its image, not a second
transfer.

A warm import (`--warm`, then `--cutover`) keeps each disk's block hashes between passes
here, in HOME/imports/PEER/NAME/ (agent.importer.warmstate; with pass.json naming the
import's token and targets): a later pass sends only blocks whose content changed, and
zeroes on the peer what the source now reads as zero. A failed pass marks the blocks it
may have touched unknown, so the next pass resends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.batch import codec
from agent.batch.format import HASH_SIZE
from agent.errors import FerryError, LocalError, ProtocolError, UserError, failure_reason
from agent.importer import talk, verify, warmstate
from agent.importer.copy import DiskImportReport, data_ranges_of
from agent.importer.definition import DiskDef, VmDefinition
from agent.importer.images import EXPORT, ImageInfo, StorageDaemon, probe
from agent.importer.talk import DiskOffer, ImportRequest
from agent.migration import faults
from agent.migration.conversation import CheckedLink, Role
from agent.migration.link import Inbox, Link, RemoteFailure, send_control
from agent.migration.protocol import Kind, Op
from agent.qemu.hostrules import require_allowed
from agent.state.config import AgentConfig
from agent.storage.disk_source import (
    BATCH_DATA_BYTES,
    BATCH_ENTRIES,
    DISK_BLOCK,
    DISK_HEADER,
    DiskCounters,
    blocks_of,
    encoded_batches,
)
from agent.storage.nbd import NbdClient
from agent.storage.nbd_proto import BASE_ALLOCATION

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
"""The peer's checks and qemu-img create of every target."""
VERIFY_BASE_S = 60.0
VERIFY_RATE = 20e6
"""Hashing a target on the peer: VERIFY_BASE_S plus its size at this many bytes a second."""
ABORT_WAIT_S = 10.0
PROGRESS_INTERVAL_S = 0.5
PASS_FILE = "pass.json"

Progress = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ImportOptions:
    """What the operator asked for (the `import` control request)."""

    target_format: str = "qcow2"
    directory: str | None = None      # on the peer
    warm: bool = False                # a warm pass: create nothing yet
    cutover: bool = False             # the last warm pass, then create
    start: bool = False
    private_ram: bool = False
    compress_level: int | None = None


@dataclass
class _Disk:
    """One source disk of this pass: its image, export and warm state."""

    index: int
    definition: DiskDef
    info: ImageInfo
    nbd: NbdClient
    ranges: list[tuple[int, int]]
    state: warmstate.WarmState
    kept: bool                        # the state is from an earlier pass
    state_file: Path | None


@dataclass
class ImportJob:
    """One pass of `ferry import --to PEER` on the importing agent."""

    config: AgentConfig
    definition: VmDefinition
    peer: str
    options: ImportOptions
    connect_peer: Callable[[str], Awaitable[Link]]
    job_id: str
    progress: Progress | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    disks: list[_Disk] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    phase: str = "preparing"
    wire_bytes: int = 0
    _link: CheckedLink | None = None
    _inbox: Inbox | None = None
    _befores: dict[int, bytes] = field(default_factory=dict)
    peer_removed: list[str] | None = None    # what the peer's ABORTED or ERROR says it removed

    @property
    def warm(self) -> bool:
        return self.options.warm or self.options.cutover

    @property
    def state_dir(self) -> Path:
        return self.config.home / "imports" / self.peer / self.definition.name

    async def run(self) -> dict[str, Any]:
        """The pass, to its report (never raises but CancelledError of the caller)."""
        started = time.monotonic()
        report: dict[str, Any] = {"event": "result", "job": self.job_id,
                                  "vm": self.definition.name, "peer": self.peer,
                                  "kind": "import", "warm": self.options.warm,
                                  "cutover": self.options.cutover}
        work = asyncio.ensure_future(self._run())
        cancelled = asyncio.ensure_future(self.cancel.wait())
        try:
            await asyncio.wait({work, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, FerryError):
                    await work
                told = ("the peer removed what this pass created"
                        if self.peer_removed is not None else
                        "the peer did not confirm it removed what this pass created")
                report.update(status="cancelled", phase="cancelled",
                              error=f"cancelled; {told}", error_reason="cancelled")
            else:
                finished = work.result()
                report.update(status="completed", phase="completed", **finished)
        except FerryError as exc:
            report.update(status="failed", phase=self.phase, error=str(exc),
                          error_reason=failure_reason(exc))
        except Exception as exc:   # a bug: reported, not raised into the daemon
            log.exception("import %s: unexpected error", self.job_id)
            report.update(status="failed", phase=self.phase,
                          error=f"import internal error: {exc!r}", error_reason="other")
        finally:
            cancelled.cancel()
            if not work.done():     # the daemon's own task cancelled: roll back all the same
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, FerryError):
                    await work
        report.update(disks=self.reports, wire_bytes=self.wire_bytes,
                      peer_removed=self.peer_removed,
                      total_ms=round((time.monotonic() - started) * 1000, 1))
        return report

    async def _run(self) -> dict[str, Any]:
        run_dir = self.config.run_dir
        work = Path(tempfile.mkdtemp(prefix="ferry-import-",
                                     dir=run_dir if run_dir.is_dir() else None))
        try:
            async with contextlib.AsyncExitStack() as stack:
                token, targets_before = self._pass_state()
                await self._open_sources(stack, work)
                link = CheckedLink(await self.connect_peer(self.peer),
                                   talk.conversation(Role.SOURCE),
                                   faults.hold(self.config.home))
                self._link = link
                stack.push_async_callback(link.close)
                self._inbox = Inbox(link)
                stack.push_async_callback(self._inbox.close)
                try:
                    return await self._converse(link, self._inbox, token, targets_before)
                except BaseException as exc:
                    await self._abort(link, self._inbox, exc)
                    self._forget_touched()
                    if isinstance(exc, FerryError | OSError) and \
                            not isinstance(exc, RemoteFailure):
                        # A send refused or failed because the peer gave up: its reason.
                        explained = await self._inbox.explain(exc)
                        if explained is not exc:
                            raise explained from exc
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------ sources

    def _pass_state(self) -> tuple[str, list[str] | None]:
        """This import's token and the peer's targets from an earlier warm pass, if any."""
        path = self.state_dir / PASS_FILE
        if not self.warm or not path.exists():
            return os.urandom(16).hex(), None
        try:
            data = json.loads(path.read_text())
            token, targets = data["token"], data["targets"]
            if not (isinstance(token, str) and talk.TOKEN.fullmatch(token)
                    and isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
                raise ValueError("token or targets malformed")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"warm import state {path} is damaged ({exc}); remove "
                            f"{self.state_dir} (and the targets on {self.peer}) to start "
                            f"over") from None
        return token, targets

    async def _open_sources(self, stack: contextlib.AsyncExitStack, work: Path) -> None:
        """Probe and export every source image; refuse what cannot be read, before the
        peer is asked for anything."""
        for n, disk in enumerate(d for d in self.definition.disks if d.media == "disk"):
            require_allowed(str(disk.path), self.config.roots, "import source")
            window = ((disk.member_offset, disk.member_size)
                      if disk.member_offset is not None and disk.member_size is not None
                      else None)
            info = probe(disk.path, disk.format, window)
            daemon = await stack.enter_async_context(
                StorageDaemon(disk.path, info.format, work / f"src{n}.nbd", writable=False,
                              window=window))
            nbd = await stack.enter_async_context(
                NbdClient.connect(daemon.socket_path, EXPORT, meta_contexts=[BASE_ALLOCATION]))
            if nbd.size != info.virtual_size:
                raise LocalError(f"disk {disk.path}: the export has {nbd.size} bytes, "
                                 f"qemu-img info said {info.virtual_size}")
            ranges = await data_ranges_of(nbd)
            state_file = self.state_dir / f"disk{n}.ferry-warm" if self.warm else None
            kept = state_file is not None and state_file.exists()
            self.disks.append(_Disk(n, disk, info, nbd, ranges,
                                    warmstate.WarmState.fresh(Path("-"), info.virtual_size,
                                                              DISK_BLOCK),
                                    kept, state_file))

    # ------------------------------------------------------------------ conversation

    async def _converse(self, link: CheckedLink, inbox: Inbox, token: str,
                        targets_before: list[str] | None) -> dict[str, Any]:
        first_pass = targets_before is None
        if first_pass:
            for disk in self.disks:     # a stray state without pass.json says nothing
                disk.kept = False
        elif any(not d.kept for d in self.disks):
            raise UserError(f"warm import state in {self.state_dir} lacks a disk's hashes "
                            f"(the source now has {len(self.disks)} disks?); remove it and "
                            f"the targets on {self.peer} to start over")
        request = ImportRequest(
            job=self.job_id, definition=self.definition,
            disks=tuple(DiskOffer(d.index, d.info.virtual_size, sum(n for _, n in d.ranges))
                        for d in self.disks),
            target_format=self.options.target_format, directory=self.options.directory,
            warm=self.warm, token=token, first_pass=first_pass)
        self.phase = "preparing"
        await send_control(link, Op.IMPORT, **request.body())
        try:
            ready = await inbox.expect({Op.IMPORT_READY}, timeout=READY_TIMEOUT_S,
                                       what="the peer's targets")
        except RemoteFailure as exc:
            if first_pass:
                raise
            raise RemoteFailure(f"{exc} (this host's warm state of the import: "
                                f"{self.state_dir})", exc.outcome) from None
        targets = ready.body.get("targets")
        if not isinstance(targets, list) or len(targets) != len(self.disks) \
                or not all(isinstance(t, str) for t in targets):
            raise ProtocolError("import-ready: targets is not one path per disk")
        if targets_before is not None and targets != targets_before:
            raise UserError(f"the peer's targets {targets} are not the earlier passes' "
                            f"{targets_before}: give the same --dir and --format")
        for disk, target in zip(self.disks, targets, strict=True):
            where = Path(f"{self.peer}:{target}")
            if disk.kept:
                assert disk.state_file is not None
                disk.state = warmstate.load(disk.state_file, where, disk.info.virtual_size,
                                            DISK_BLOCK)
            else:
                disk.state = warmstate.WarmState.fresh(where, disk.info.virtual_size,
                                                       DISK_BLOCK)
        if self.warm:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.state_dir / PASS_FILE, {"token": token, "targets": targets,
                                                     "vm": self.definition.name})
        for disk, target in zip(self.disks, targets, strict=True):
            self.reports.append(await self._send_disk(link, inbox, disk, target))
        self.phase = "finishing"
        create = not self.options.warm
        await send_control(link, Op.FINISH, create=create, start=self.options.start and create,
                           private=self.options.private_ram)
        done = await inbox.expect({Op.FINISHED}, timeout=READY_TIMEOUT_S,
                                  what="the peer recording the VM")
        if create and self.warm:
            shutil.rmtree(self.state_dir, ignore_errors=True)    # the import is over
        body = done.body
        return {"vm_dir": str(body.get("vm_dir", "")),
                "disk_dir": str(body.get("disk_dir") or body.get("vm_dir", "")),
                "targets": targets,
                "created": body.get("created") is True, "started": body.get("started") is True,
                "start_error": body.get("start_error"),
                "warm_pass": self.reports[0]["warm_pass"] if self.reports else 1}

    async def _send_disk(self, link: CheckedLink, inbox: Inbox, disk: _Disk,
                         target: str) -> dict[str, Any]:
        started = time.monotonic()
        size = disk.info.virtual_size
        state = disk.state
        self._befores[disk.index] = bytes(state.hashes)
        ranges = _with_stale(disk.ranges, state, size) if disk.kept else disk.ranges
        allocated = sum(n for _, n in disk.ranges)
        if disk.state_file is not None:
            state.save(disk.state_file, in_pass=True)
        encoder = codec.BatchEncoder(None, DISK_BLOCK, state.hashes, dedup=True,
                                     compress_level=self.options.compress_level,
                                     max_data_bytes=BATCH_DATA_BYTES, max_entries=BATCH_ENTRIES)
        counters = DiskCounters()
        read = [0]
        last = [0.0]
        self.phase = f"copying disk{disk.index}"
        total = sum(n for _, n in ranges)

        def on_chunk(first: int, count: int) -> None:
            read[0] += min(count * DISK_BLOCK, size - first * DISK_BLOCK)

        batches = encoded_batches(disk.nbd, encoder, ranges, size, counters,
                                  DISK_HEADER.pack(disk.index), on_chunk=on_chunk)
        async with contextlib.aclosing(batches):
            async for payload in batches:
                inbox.check()
                await link.send(Kind.DISK_BATCH, payload)
                self.wire_bytes += len(payload)
                del payload
                now = time.monotonic()
                if now - last[0] >= PROGRESS_INTERVAL_S:
                    last[0] = now
                    await self._progress(disk.index, min(read[0], total), total, now - started)
        copy_seconds = time.monotonic() - started
        await self._progress(disk.index, total, total, copy_seconds)
        self.phase = f"verifying disk{disk.index}"
        await send_control(link, Op.DISK_END, disk=disk.index)
        nblocks = blocks_of(size)
        hashes = bytearray()
        timeout = VERIFY_BASE_S + size / VERIFY_RATE
        while True:
            msg = await inbox.expect({Op.HASHES, Op.DISK_WRITTEN}, timeout=timeout,
                                     what=f"the peer's hashes of disk {disk.index}")
            if msg.op is Op.DISK_WRITTEN:
                break
            hashes += talk.parse_hashes(msg, disk.index, nblocks, len(hashes) // HASH_SIZE)
        if len(hashes) != nblocks * HASH_SIZE:
            raise ProtocolError(f"the peer sent hashes of {len(hashes) // HASH_SIZE} of disk "
                                f"{disk.index}'s {nblocks} blocks")
        verdict = verify.compare(state.hashes, hashes)
        if not verdict.verified:
            for block in verdict.mismatched:
                state.forget(block, 1)          # a later pass rewrites them
            raise LocalError(f"disk {disk.definition.path} -> {self.peer}:{target}: "
                             f"verification failed: {verdict.mismatches} of "
                             f"{verdict.blocks_compared} blocks differ (blocks "
                             f"{verdict.listed()})")
        if disk.state_file is not None:
            state.passes += 1
            state.save(disk.state_file)
        self._befores.pop(disk.index, None)
        c = counters
        seconds = time.monotonic() - started
        written = c.data_blocks + c.dedup_blocks
        bytes_read = read[0]
        pass_report = DiskImportReport(
            source=str(disk.definition.path), target=f"{self.peer}:{target}",
            format=disk.info.format, subformat=disk.info.subformat,
            target_format=self.options.target_format, virtual_size=size,
            allocated_bytes=allocated, warm_pass=state.passes if disk.state_file else 1,
            blocks_read=c.blocks_read, blocks_changed=written + c.zero_blocks,
            blocks_written=written, blocks_zeroed=c.zero_blocks, dedup_blocks=c.dedup_blocks,
            bytes_read=bytes_read, zero_bytes_skipped=size - bytes_read,
            bytes_written=_count(msg.body.get("bytes_written")),
            seconds=round(seconds, 3), copy_seconds=round(copy_seconds, 3),
            verify_seconds=round(seconds - copy_seconds, 3),
            mb_per_s=round(allocated / seconds / 1e6, 1) if seconds > 0 else 0.0,
            verified=True, blocks_compared=verdict.blocks_compared, mismatches=0)
        out = pass_report.as_dict()
        # What the peer wrote, and the counters `ferry jobs` and the metrics know.
        out.update(peer_blocks_written=_count(msg.body.get("blocks_written")),
                   wire_bytes=c.wire_bytes, batches=c.batches, data_blocks=c.data_blocks,
                   zero_blocks=c.zero_blocks)
        log.info("import %s: disk%d %s -> %s:%s pass %d: %d blocks changed, %d bytes on "
                 "the wire, verified", self.job_id, disk.index, disk.definition.path,
                 self.peer, target, out["warm_pass"], out["blocks_changed"], c.wire_bytes)
        return out

    async def _progress(self, index: int, done: int, total: int, seconds: float) -> None:
        if self.progress is None:
            return
        await self.progress({"event": "progress", "phase": f"disk{index}",
                             "bytes_done": done, "bytes_total": total,
                             "wire_bytes": self.wire_bytes,
                             "throughput_bps": round(done / seconds) if seconds > 0 else 0})

    async def _abort(self, link: CheckedLink, inbox: Inbox, exc: BaseException) -> None:
        """Tell the peer to remove what this pass made and wait until it says it has
        (it may have given up first: then its ERROR said so)."""
        if link.conversation.state not in talk.ABORTABLE:
            return
        reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc)
        try:
            await send_control(link, Op.ABORT, reason=reason[:200])
            done = await inbox.expect({Op.ABORTED}, timeout=ABORT_WAIT_S,
                                      what="the peer's rollback")
            removed = done.body.get("removed")
            self.peer_removed = [str(r) for r in removed] if isinstance(removed, list) else []
        except (FerryError, ConnectionError, OSError) as late:
            log.info("import %s: abort: %s", self.job_id, late)

    def _forget_touched(self) -> None:
        """A failed pass: every block whose hash it changed may or may not be on the peer."""
        for disk in self.disks:
            before = self._befores.get(disk.index)
            if disk.state_file is None or before is None:
                continue
            if not disk.kept:
                disk.state_file.unlink(missing_ok=True)   # the peer removed its new target
                continue
            now = np.frombuffer(disk.state.hashes, dtype=np.uint8).reshape(-1, HASH_SIZE)
            old = np.frombuffer(before, dtype=np.uint8).reshape(-1, HASH_SIZE)
            for first, stop in verify.true_runs((now != old).any(axis=1)):
                disk.state.forget(first, stop - first)
            with contextlib.suppress(LocalError):
                disk.state.save(disk.state_file)
        if self.warm and not any(d.kept for d in self.disks):
            # A first pass that failed: the peer removed its targets, so no state either.
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _with_stale(ranges: list[tuple[int, int]], state: warmstate.WarmState,
                size: int) -> list[tuple[int, int]]:
    """The source's data ranges plus the blocks the target holds data in (or might) that
    the source now reads as zero: read (as zeros, cheaply) so the encoder zeroes them."""
    nblocks = state.nblocks
    mask = np.zeros(nblocks, dtype=bool)
    for offset, length in ranges:
        mask[offset // DISK_BLOCK:-(-(offset + length) // DISK_BLOCK)] = True
    zero = np.frombuffer(codec.zero_block_hash(DISK_BLOCK), dtype=np.uint8)
    hashes = np.frombuffer(state.hashes, dtype=np.uint8).reshape(-1, HASH_SIZE)
    mask |= (hashes != zero).any(axis=1)
    return [(first * DISK_BLOCK, min(stop * DISK_BLOCK, size) - first * DISK_BLOCK)
            for first, stop in verify.true_runs(mask)]


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data) + "\n")
    os.replace(temporary, path)


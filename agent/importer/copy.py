"""Copying one disk of an import on this host: any image QEMU reads into a qcow2 or raw
target, zeros skipped, verified, and repeatable as warm passes (issue #13: Copy, Verify,
Warm).

The source is exported read-only by one qemu-storage-daemon and the target, which this
module creates, writable by another; the blocks move between the two exports with the
migration's own pieces: agent.storage.disk_source.encoded_batches reads the source's
allocated ranges (`base:allocation`: holes and zero ranges are never read) and encodes them
with the batch codec (blocks that read as zero or that the target already holds produce
nothing; repeated blocks become copies), and agent.storage.disk_sink.DiskWriter writes the
batches. The codec's per-block hashes of what was sent are then compared with the target's
(agent.importer.verify) and, for a warm import, kept for the next pass
(agent.importer.warmstate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agent.batch import codec
from agent.batch.format import HASH_SIZE
from agent.errors import LocalError, NbdCommandError, UserError
from agent.importer import qemuimg, verify, warmstate
from agent.importer.images import (
    EXPORT,
    TARGET_FORMATS,
    ImageInfo,
    StorageDaemon,
    Window,
    probe,
)
from agent.qemu.destargv import DiskTarget
from agent.qemu.hostrules import require_allowed
from agent.qemu.vmspec import DiskSpec
from agent.storage.disk_sink import SPACE_MARGIN, DiskWriter
from agent.storage.disk_source import (
    BATCH_DATA_BYTES,
    BATCH_ENTRIES,
    DISK_BLOCK,
    DiskCounters,
    encoded_batches,
)
from agent.storage.nbd import NbdClient
from agent.storage.nbd_proto import BASE_ALLOCATION, AllocationFlag

log = logging.getLogger(__name__)

READS_IN_FLIGHT = 4
"""Source chunks (3.5 MiB each) read ahead of the encoder: on one host the reads need not
cross a channel, so a little more in flight keeps the source daemon busy."""
PARTIAL_SUFFIX = ".ferry-partial"
"""A one-shot target's name while it is copied and compared."""
PROGRESS_INTERVAL_S = 0.25
"""Least time between two progress reports (the last one is always sent)."""


@dataclass(frozen=True, slots=True)
class Progress:
    """How far one disk's copy is: bytes of the source's data done of total."""

    done: int
    total: int
    seconds: float

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.done / self.seconds if self.seconds > 0 else 0.0


ProgressCallback = Callable[[Progress], None]


@dataclass
class DiskImportReport:
    """What one pass of one disk's import did (the fields of the report per disk)."""

    source: str
    target: str
    format: str                 # the source's
    subformat: str | None
    target_format: str
    virtual_size: int
    allocated_bytes: int        # source bytes that do not read as zero
    warm_pass: int              # 1 for the first pass (a full copy), 2, 3, ... after
    blocks_read: int
    blocks_changed: int         # blocks whose content differs from what the target held
    blocks_written: int         # of those, written with data (not zeroed)
    blocks_zeroed: int          # of those, made zero (only a warm pass has any)
    dedup_blocks: int           # written as a copy of another block of the target
    bytes_read: int
    zero_bytes_skipped: int     # source bytes never read: holes and zero ranges
    bytes_written: int          # data bytes written into the target
    seconds: float              # the whole pass: probing, daemons, copy, verification
    copy_seconds: float         # reading, writing and flushing
    verify_seconds: float
    mb_per_s: float             # MB (10**6) of the source's data per second of the pass
    verified: bool
    blocks_compared: int
    mismatches: int
    engine: str = "ferry"       # who moved the blocks: "ferry" (codec) or "qemu" (block job)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def import_disk(source: Path, target: Path, *, roots: Sequence[Path],
                      target_format: str = "qcow2", source_format: str | None = None,
                      state_file: Path | None = None, verify_copy: bool = True,
                      progress: ProgressCallback | None = None,
                      run_dir: Path | None = None,
                      window: Window | None = None, engine: str = "auto") -> DiskImportReport:
    """Copy `source` (or the `window` of it that holds the image: a disk inside an OVA)
    into a new `target` image (or, with a `state_file` from an earlier pass, bring that
    pass's target up to date); verify it; the pass's report.

    engine "auto" copies a one-shot import (no `state_file`) with `qemu-img convert`
    (agent.importer.qemuimg: several times faster on one host) and warm passes with
    ferry's codec, which keeps their block hashes; "ferry" always takes ferry's codec.

    Refuses, before creating anything: a source QEMU cannot read, a target outside `roots`,
    an existing target without warm state, too little space. On failure the daemons are
    stopped, their sockets removed, and a target created by this call is removed; a kept
    warm target stays, its state marking the blocks the failed pass may have touched.
    """
    started = time.monotonic()
    if target_format not in TARGET_FORMATS:
        raise UserError(f"cannot write target format {target_format!r} "
                        f"(ferry writes {', '.join(TARGET_FORMATS)})")
    if engine not in ("auto", "ferry"):
        raise LocalError(f"unknown import engine {engine!r}")
    info = probe(source, source_format, window)
    target = check_target(target, roots)
    if state_file is None and engine == "auto":
        return await _job_copy(info, target, target_format, window, started,
                               verify_copy=verify_copy, progress=progress)
    state, kept = _prior_state(state_file, target, info, target_format)
    work = Path(tempfile.mkdtemp(prefix="ferry-import-", dir=run_dir))
    created = False
    before = bytes(state.hashes)
    copy = _Pass(info, target, target_format, state, progress)
    try:
        async with StorageDaemon(source, info.format, work / "src.nbd", writable=False,
                                 window=window) as source_daemon:
            async with NbdClient.connect(source_daemon.socket_path, EXPORT,
                                         meta_contexts=[BASE_ALLOCATION]) as src:
                if src.size != info.virtual_size:
                    raise LocalError(f"disk {source}: the export has {src.size} bytes, "
                                     f"qemu-img info said {info.virtual_size}")
                data_ranges = await data_ranges_of(src)
                copy.allocated = sum(n for _, n in data_ranges)
                if not kept:
                    check_space(target, copy.allocated, target_format, info.virtual_size)
                    create_target(target, target_format, info.virtual_size)
                    created = True
                if state_file is not None:
                    state.save(state_file, in_pass=True)
                async with StorageDaemon(target, target_format, work / "dst.nbd",
                                         writable=True) as target_daemon:
                    async with NbdClient.connect(target_daemon.socket_path, EXPORT,
                                                 meta_contexts=[BASE_ALLOCATION]) as dst:
                        await copy.run(src, dst, data_ranges, warm=kept)
                        verdict = await copy.check(dst) if verify_copy else None
        if verdict is not None and not verdict.verified:
            for block in verdict.mismatched:
                state.forget(block, 1)   # a later pass rewrites them
            raise LocalError(f"disk {target}: verification failed: {verdict.mismatches} of "
                             f"{verdict.blocks_compared} blocks differ from the source "
                             f"(blocks {verdict.listed()})")
        if state_file is not None:
            state.passes += 1
            state.save(state_file)
    except BaseException:
        if created:
            target.unlink(missing_ok=True)
            if state_file is not None:
                state_file.unlink(missing_ok=True)
        elif state_file is not None and kept:
            _forget_touched(state, before)
            with contextlib.suppress(LocalError):
                state.save(state_file)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return copy.report(time.monotonic() - started, verdict)


async def _job_copy(info: ImageInfo, target: Path, target_format: str,
                    window: Window | None, started: float, *, verify_copy: bool,
                    progress: ProgressCallback | None) -> DiskImportReport:
    """A one-shot copy by `qemu-img convert`, compared by `qemu-img compare`.

    It is written as TARGET.ferry-partial and takes the target's name only once compared
    equal: a failure removes it, and one a killed import left is replaced by the next."""
    if os.path.lexists(target):
        raise UserError(f"import target {target} already exists; choose another path or "
                        f"remove it")
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    if partial.exists():
        log.warning("removing %s, left by an import that did not finish", partial)
        partial.unlink()
    spec = qemuimg.source_spec(info, window)
    # The source's data map sizes the space check, the progress and the report. Where
    # the whole virtual disk fits anyway, convert starts beside it (it is most of the
    # fixed cost of a small import).
    mapped = asyncio.ensure_future(asyncio.to_thread(qemuimg.data_bytes, spec))
    try:
        if shutil.disk_usage(target.parent).free < space_needed(
                info.virtual_size, target_format, info.virtual_size):
            check_space(target, await mapped, target_format, info.virtual_size)
    except BaseException:
        mapped.cancel()
        raise
    copy_start = time.monotonic()

    def on_share(share: float) -> None:
        if progress is not None and mapped.done() and not mapped.exception():
            allocated = mapped.result()
            progress(Progress(int(allocated * share), allocated,
                              time.monotonic() - copy_start))
    try:
        await qemuimg.convert(spec, partial, target_format, on_share)
        allocated = await mapped
        on_share(1.0)
        copy_seconds = time.monotonic() - copy_start
        verify_start = time.monotonic()
        # The target's data map (the report's bytes written) is read beside the compare.
        difference, written = await asyncio.gather(
            asyncio.to_thread(qemuimg.compare, spec, partial, target_format)
            if verify_copy else _nothing(),
            asyncio.to_thread(qemuimg.data_bytes, str(partial)))
        verify_seconds = time.monotonic() - verify_start if verify_copy else 0.0
        if difference is not None:
            raise LocalError(f"disk {target}: verification failed: {difference}")
        try:
            os.link(partial, target)    # unlike rename, never replaces a file made meanwhile
        except FileExistsError:
            raise UserError(f"import target {target} appeared while ferry copied into it; "
                            f"the copy is removed") from None
        partial.unlink()
    except BaseException:
        partial.unlink(missing_ok=True)
        if not mapped.done():
            mapped.cancel()
        raise
    seconds = time.monotonic() - started
    blocks = -(-allocated // DISK_BLOCK)
    return DiskImportReport(
        source=str(info.path), target=str(target), format=info.format,
        subformat=info.subformat, target_format=target_format,
        virtual_size=info.virtual_size, allocated_bytes=allocated, warm_pass=1,
        blocks_read=blocks, blocks_changed=blocks, blocks_written=-(-written // DISK_BLOCK),
        blocks_zeroed=0, dedup_blocks=0, bytes_read=allocated,
        zero_bytes_skipped=info.virtual_size - allocated, bytes_written=written,
        seconds=round(seconds, 3), copy_seconds=round(copy_seconds, 3),
        verify_seconds=round(verify_seconds, 3),
        mb_per_s=round(allocated / seconds / 1e6, 1) if seconds > 0 else 0.0,
        verified=verify_copy, blocks_compared=-(-info.virtual_size // DISK_BLOCK)
        if verify_copy else 0, mismatches=0, engine="qemu")


async def _nothing() -> None:
    return None


def default_state_file(target: Path) -> Path:
    """Where a warm import keeps a target's block hashes: beside the target."""
    return target.with_name(f"{target.name}.ferry-warm")


def check_target(target: Path, roots: Sequence[Path]) -> Path:
    require_allowed(str(target), roots, "import target")
    if not target.parent.is_dir():
        raise UserError(f"import target {target}: directory {target.parent} does not exist")
    return target


def _prior_state(state_file: Path | None, target: Path, info: ImageInfo,
                 target_format: str) -> tuple[warmstate.WarmState, bool]:
    """The target's warm state and whether the target is kept from an earlier pass."""
    exists = os.path.lexists(target)
    if state_file is not None and state_file.exists():
        if not exists:
            raise UserError(f"warm import state {state_file} is there but its target {target} "
                            f"is not; remove the state to start with a full copy")
        state = warmstate.load(state_file, target, info.virtual_size, DISK_BLOCK)
        kept = probe(target, target_format)
        if kept.virtual_size != info.virtual_size:
            raise UserError(f"import target {target} has {kept.virtual_size} bytes, the "
                            f"source {info.virtual_size}")
        return state, True
    if exists:
        raise UserError(f"import target {target} already exists; choose another path or "
                        f"remove it" + (" (no warm state beside it: it was not made by an "
                                        "earlier pass)" if state_file is not None else ""))
    return warmstate.WarmState.fresh(target, info.virtual_size, DISK_BLOCK), False


def space_needed(allocated: int, target_format: str, virtual_size: int) -> int:
    """Bytes a new target needs: the source's data, qcow2's metadata and a margin."""
    needed = allocated + SPACE_MARGIN
    if target_format == "qcow2":
        needed += virtual_size // DISK_BLOCK * 8 // 512 + (1 << 20)   # L2 tables, roughly
    return needed


def check_space(target: Path, allocated: int, target_format: str, virtual_size: int,
                also: int = 0) -> None:
    """Refuse when the target's file system cannot hold the source's data (plus qcow2's
    metadata and a margin), and `also` bytes other targets there need."""
    needed = space_needed(allocated, target_format, virtual_size) + also
    free = shutil.disk_usage(target.parent).free
    if free < needed:
        raise UserError(f"not enough space for import target {target}: {needed >> 20} MiB "
                        f"needed (the source's {allocated >> 20} MiB of data and a margin), "
                        f"{free >> 20} MiB free in {target.parent}")


def create_target(target: Path, target_format: str, virtual_size: int) -> None:
    writer = DiskWriter(target_spec(target, target_format, virtual_size),
                        DiskTarget(str(target), target_format))
    writer.create()


def target_spec(target: Path, target_format: str, virtual_size: int) -> DiskSpec:
    return DiskSpec(index=0, path=str(target), format=target_format,
                    virtual_size=virtual_size, node="")


async def data_ranges_of(nbd: NbdClient) -> list[tuple[int, int]]:
    """(offset, length) of every extent that does not read as zero."""
    extents = await nbd.block_status(0, nbd.size, BASE_ALLOCATION)
    return [(e.offset, e.length) for e in extents if not e.flags & AllocationFlag.ZERO]


def _forget_touched(state: warmstate.WarmState, before: bytes) -> None:
    """A failed pass: every block whose hash it changed may or may not have been written."""
    now = np.frombuffer(state.hashes, dtype=np.uint8).reshape(-1, HASH_SIZE)
    old = np.frombuffer(before, dtype=np.uint8).reshape(-1, HASH_SIZE)
    for first, stop in verify.true_runs((now != old).any(axis=1)):
        state.forget(first, stop - first)


class _Pass:
    """One pass of one disk: the copy, its counters and its progress reports."""

    def __init__(self, info: ImageInfo, target: Path, target_format: str,
                 state: warmstate.WarmState, progress: ProgressCallback | None) -> None:
        self.info = info
        self.target = target
        self.target_format = target_format
        self.state = state
        self.pass_number = state.passes + 1
        self.progress = progress
        self.allocated = 0
        self.counters = DiskCounters()
        self.bytes_read = 0
        self.blocks_zeroed = 0
        self.writer: DiskWriter | None = None
        self.copy_seconds = 0.0
        self.verify_seconds = 0.0
        self._started = time.monotonic()
        self._reported = 0.0

    async def run(self, src: NbdClient, dst: NbdClient, data_ranges: list[tuple[int, int]],
                  *, warm: bool) -> None:
        size = self.info.virtual_size
        writer = self.writer = DiskWriter(
            target_spec(self.target, self.target_format, size),
            DiskTarget(str(self.target), self.target_format), nbd=dst)
        # The encoder compares each block with what the target holds (the state's hashes)
        # and records what it sends there: after the pass they are the source's hashes.
        encoder = codec.BatchEncoder(None, DISK_BLOCK, self.state.hashes, dedup=True,
                                     compress_level=None, max_data_bytes=BATCH_DATA_BYTES,
                                     max_entries=BATCH_ENTRIES)
        read = np.zeros(self.state.nblocks, dtype=bool)
        self._started = time.monotonic()

        def on_chunk(first: int, count: int) -> None:
            read[first:first + count] = True
            self.bytes_read += min(count * DISK_BLOCK, size - first * DISK_BLOCK)
            self._report(False)

        batches = encoded_batches(src, encoder, data_ranges, size, self.counters,
                                  reads_in_flight=READS_IN_FLIGHT, on_chunk=on_chunk)
        # Closed at once if a write fails: no read or encode may outlive the pass.
        async with contextlib.aclosing(batches):
            async for payload in batches:
                await writer.apply(payload)
                del payload
        if warm:
            await self._zero_stale(writer, read)
        await writer.drain()
        try:
            await dst.flush()
        except NbdCommandError as exc:
            raise LocalError(writer.write_failure(exc)) from exc
        self.copy_seconds = time.monotonic() - self._started
        self._report(True)

    async def _zero_stale(self, writer: DiskWriter, read: np.ndarray) -> None:
        """Blocks the source now reads as zero (not read this pass) that the target holds
        data in: zero them. A first pass has none (its target reads as zero)."""
        assert writer.nbd is not None
        zero_hash = np.frombuffer(codec.zero_block_hash(DISK_BLOCK), dtype=np.uint8)
        hashes = np.frombuffer(self.state.hashes, dtype=np.uint8).reshape(-1, HASH_SIZE)
        stale = ~read & (hashes != zero_hash).any(axis=1)
        size = self.info.virtual_size
        for first, stop in verify.true_runs(stale):
            # The hashes first: if the write fails, the failure path forgets these blocks.
            self.state.hashes[first * HASH_SIZE:stop * HASH_SIZE] = \
                codec.zero_block_hash(DISK_BLOCK) * (stop - first)
            offset = first * DISK_BLOCK
            length = min(stop * DISK_BLOCK, size) - offset
            try:
                await writer.nbd.write_zeroes(offset, length)
            except NbdCommandError as exc:
                raise LocalError(writer.write_failure(exc)) from exc
            self.blocks_zeroed += stop - first
            writer.blocks_written += stop - first

    async def check(self, dst: NbdClient) -> verify.Verdict:
        started = time.monotonic()
        actual = await verify.export_hashes(dst, DISK_BLOCK)
        verdict = verify.compare(self.state.hashes, actual)
        self.verify_seconds = time.monotonic() - started
        return verdict

    def _report(self, last: bool) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if not last and now - self._reported < PROGRESS_INTERVAL_S:
            return
        self._reported = now
        done = self.allocated if last else min(self.bytes_read, self.allocated)
        self.progress(Progress(done, self.allocated, now - self._started))

    def report(self, seconds: float, verdict: verify.Verdict | None) -> DiskImportReport:
        c = self.counters
        written = c.data_blocks + c.dedup_blocks
        return DiskImportReport(
            source=str(self.info.path), target=str(self.target), format=self.info.format,
            subformat=self.info.subformat,
            target_format=self.target_format,
            virtual_size=self.info.virtual_size, allocated_bytes=self.allocated,
            warm_pass=self.pass_number, blocks_read=c.blocks_read,
            blocks_changed=written + c.zero_blocks + self.blocks_zeroed,
            blocks_written=written, blocks_zeroed=c.zero_blocks + self.blocks_zeroed,
            dedup_blocks=c.dedup_blocks, bytes_read=self.bytes_read,
            zero_bytes_skipped=self.info.virtual_size - self.bytes_read,
            bytes_written=self.writer.bytes_written if self.writer else 0,
            seconds=round(seconds, 3), copy_seconds=round(self.copy_seconds, 3),
            verify_seconds=round(self.verify_seconds, 3),
            mb_per_s=round(self.allocated / seconds / 1e6, 1) if seconds > 0 else 0.0,
            verified=verdict.verified if verdict is not None else False,
            blocks_compared=verdict.blocks_compared if verdict is not None else 0,
            mismatches=verdict.mismatches if verdict is not None else 0)

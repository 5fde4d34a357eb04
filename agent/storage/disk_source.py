"""The source side of copying a VM's disks: which disks, and each round's changed blocks,
read through the source QEMU's own NBD export (DESIGN §5, checked on QEMU 7.2).

Per disk, a dirty bitmap records the guest's writes from the start of the migration.
Round 0 reads everything allocated (`base:allocation`, holes and zero ranges skipped: the
destination's fresh image reads as zero there). Every later round swaps bitmaps in one
transaction (add a new enabled one, disable the current), exports the node read-only with
the disabled bitmap, reads the ranges it marks (`qemu:dirty-bitmap:NAME`), then removes
export and bitmap. The final round runs with the guest stopped, so it is exact.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from agent.batch import codec
from agent.buffers import BufferPool
from agent.errors import FerryError, QemuError, UserError
from agent.memory import scan
from agent.qemu import qmp as qmp_mod
from agent.qemu.vmspec import DISK_FORMATS, DiskSpec
from agent.storage.disk_throttle import WriteThrottle, disk_write_cap
from agent.storage.nbd import NbdClient
from agent.storage.nbd_proto import BASE_ALLOCATION, DIRTY, DIRTY_BITMAP_PREFIX, AllocationFlag

log = logging.getLogger(__name__)

DISK_BLOCK = 64 << 10
"""Disk blocks in batches are 64 KiB: qcow2's default cluster and the bitmaps' granularity."""
READS_IN_FLIGHT = 3
"""NBD reads in flight, one batch (BATCH_DATA_BYTES) each: about 10 MiB keep the export
busy; more only costs QEMU fresh bounce buffers (it allocates one per request, and glibc
hands the memory back between bursts). Measured on the disk bench with 4 MiB reads, 4 runs
each: 12 MiB in flight 0.72-0.88 GB/s, source QEMU 0.46-0.60 and agent 0.65-0.70 CPU s per
GB; 32 MiB in flight 0.72-0.74 GB/s, 0.58-0.63 and 0.73-0.77."""
BATCH_DATA_BYTES = 56 * DISK_BLOCK
"""DATA bytes per disk batch, and bytes per NBD read: 3.5 MiB, so a batch with its prefix,
header and entries stays inside the channel's 4 MiB frames. Reading (2 MiB per batch
before) and sending as few pieces as that allows cut the source agent's CPU per GB by about
an eighth (0.35 -> 0.31 s reading and encoding 0.9 GB from qemu-storage-daemon)."""
BATCH_ENTRIES = 1024
"""Entries per disk batch; a 64 KiB block each, so DATA fills a batch long before this."""
DISK_HEADER = struct.Struct("<H")
"""A DISK_BATCH message is the disk's index (u16) followed by one encoded batch."""
EXPORT_GONE_TIMEOUT_S = 10.0
PFLASH_QDEV = "/machine/system.flash"
"""The qdev path of a -drive if=pflash (query-block), never a disk."""


async def copyable_disks(qmp: qmp_mod.Qmp) -> tuple[DiskSpec, ...]:
    """The VM's writable disks, each to be copied; refuses what cannot be copied safely."""
    blocks = await qmp.execute("query-block")
    jobs = await qmp.execute("query-block-jobs")
    if jobs:
        # A job's "device" is its id, not always the disk's name, and a copy taken while a
        # job rewrites the disk could be torn: refuse while any block job runs.
        names = ", ".join(f"{j.get('type')} job {j.get('device')!r}" for j in jobs)
        raise UserError(f"the VM's disks are in use by a block job ({names}); wait for it to "
                        f"finish or cancel it (block-job-cancel) before migrating")
    disks: list[DiskSpec] = []
    for block in blocks:
        inserted = block.get("inserted")
        if not inserted or inserted.get("ro"):
            continue  # empty drive or read-only media: nothing the guest can change
        if str(block.get("qdev") or "").startswith(PFLASH_QDEV):
            # UEFI variables: their content travels in QEMU's stream (RAM block
            # system.flashN), and the destination makes its own file for them.
            continue
        path, node = inserted.get("file", ""), inserted.get("node-name", "")
        fmt = inserted.get("drv")
        if fmt not in DISK_FORMATS:
            raise UserError(f"disk {path} is {fmt}; ferry copies {' and '.join(DISK_FORMATS)} "
                            f"images (convert it with qemu-img, or use --storage shared)")
        if not path.startswith("/"):
            raise UserError(f"disk {path!r} is not a plain image file ferry can copy")
        size = int(inserted.get("image", {}).get("virtual-size", 0))
        disks.append(DiskSpec(index=len(disks), path=path, format=fmt, virtual_size=size,
                              node=node))
    return tuple(disks)


def blocks_of(nbytes: int) -> int:
    return -(-nbytes // DISK_BLOCK)


@dataclass
class DiskCounters:
    """What one disk's copy sent."""

    rounds: int = 0
    blocks_read: int = 0
    batches: int = 0
    data_blocks: int = 0
    zero_blocks: int = 0
    dedup_blocks: int = 0
    wire_bytes: int = 0
    last_dirty_bytes: int = 0
    seconds: float = 0.0       # time spent in this disk's rounds (reading, encoding, sending)


@dataclass
class DiskRounds:
    """One disk's bitmaps, exports and encoder on the source for one migration."""

    qmp: qmp_mod.Qmp
    disk: DiskSpec
    socket_path: Path
    job_id: str
    dedup: bool = True
    compress_level: int | None = None
    counters: DiskCounters = field(default_factory=DiskCounters)
    throttle: WriteThrottle | None = None      # the guest's write cap, once one was needed
    previous_dirty: int | None = None          # what the round before this one left dirty
    _bitmap_seq: int = 0
    _bitmaps: list[str] = field(default_factory=list)
    _exports: list[str] = field(default_factory=list)
    _encoder: codec.BatchEncoder | None = None
    _sealed: bool = False

    def __post_init__(self) -> None:
        nblocks = blocks_of(self.disk.virtual_size)
        sent = bytearray(codec.zero_block_hash(DISK_BLOCK) * nblocks)
        self._encoder = codec.BatchEncoder(None, DISK_BLOCK, sent, dedup=self.dedup,
                                           compress_level=self.compress_level,
                                           max_data_bytes=BATCH_DATA_BYTES,
                                           max_entries=BATCH_ENTRIES)

    @property
    def current_bitmap(self) -> str:
        return f"ferry-{self.job_id}-{self._bitmap_seq}"

    async def start(self) -> None:
        """Begin recording writes, before round 0 reads anything."""
        await self.qmp.execute("block-dirty-bitmap-add",
                               {"node": self.disk.node, "name": self.current_bitmap})
        self._bitmaps.append(self.current_bitmap)

    async def seal(self) -> None:
        """The guest is stopped: disable the current bitmap now, so that QEMU may go on;
        the final round then reads what it holds.

        Sealed before the command is awaited: a round starting meanwhile would otherwise
        add a new, enabled bitmap that the final round then exported (QEMU refuses that).
        A round already past its start has renamed current_bitmap before this runs, and
        its transaction reaches QEMU before this command."""
        name = self.current_bitmap
        self._sealed = True
        await self.qmp.execute("block-dirty-bitmap-disable",
                               {"node": self.disk.node, "name": name})

    async def dirty_bytes(self) -> int:
        """Bytes the current bitmap marks (what the next round would read)."""
        for block in await self.qmp.execute("query-block"):
            inserted = block.get("inserted") or {}
            if inserted.get("node-name") != self.disk.node:
                continue
            for bitmap in inserted.get("dirty-bitmaps", []):
                if bitmap.get("name") == self.current_bitmap:
                    return int(bitmap.get("count", 0))
        return 0

    async def batches(self, *, first: bool, final: bool) -> AsyncIterator[memoryview]:
        """The DISK_BATCH payloads of one round (bitmaps and export handled around it)."""
        if self._sealed and not final:
            return   # the switchover began: the final round reads all that is left
        started = time.monotonic()
        export = f"ferry-{self.job_id}-{self.disk.index}-{self.counters.rounds}"
        if first:
            context, wanted = BASE_ALLOCATION, None
            bitmaps: list[str] = []
        else:
            done = self.current_bitmap
            actions = [{"type": "block-dirty-bitmap-disable",
                        "data": {"node": self.disk.node, "name": done}}]
            if not final:
                self._bitmap_seq += 1
                actions.insert(0, {"type": "block-dirty-bitmap-add",
                                   "data": {"node": self.disk.node, "name": self.current_bitmap}})
                self._bitmaps.append(self.current_bitmap)
            if not (final and self._sealed):
                await self.qmp.execute("transaction", {"actions": actions})
            context, wanted, bitmaps = f"{DIRTY_BITMAP_PREFIX}{done}", DIRTY, [done]
        await self.qmp.execute("block-export-add", {
            "type": "nbd", "id": export, "node-name": self.disk.node, "name": export,
            "writable": False, "bitmaps": bitmaps})
        self._exports.append(export)
        try:
            async with NbdClient.connect(str(self.socket_path), export,
                                         meta_contexts=[context]) as nbd:
                extents = await nbd.block_status(0, self.disk.virtual_size, context)
                if wanted is None:   # round 0: everything that does not read as zero
                    ranges = [(e.offset, e.length) for e in extents
                              if not e.flags & AllocationFlag.ZERO]
                else:
                    ranges = [(e.offset, e.length) for e in extents if e.flags & wanted]
                self.counters.last_dirty_bytes = sum(n for _, n in ranges)
                async for payload in self._read_and_encode(nbd, ranges):
                    yield payload
        finally:
            await self._drop_export(export)
            if not first:
                await self._drop_bitmap(bitmaps[0])
            self.counters.seconds += time.monotonic() - started
        self.counters.rounds += 1

    def _read_and_encode(self, nbd: NbdClient,
                         ranges: list[tuple[int, int]]) -> AsyncGenerator[memoryview, None]:
        # The generator itself, not a wrapper: closing it stops its reads at once.
        assert self._encoder is not None
        return encoded_batches(nbd, self._encoder, ranges, self.disk.virtual_size,
                               self.counters, DISK_HEADER.pack(self.disk.index))

    async def _drop_export(self, export: str) -> None:
        if export not in self._exports:
            return
        self._exports.remove(export)
        mark = self.qmp.event_mark()
        try:
            await self.qmp.execute("block-export-del", {"id": export})
            await self.qmp.wait_event("BLOCK_EXPORT_DELETED", after=mark,
                                      timeout=EXPORT_GONE_TIMEOUT_S,
                                      match=lambda e: e.data.get("id") == export)
        except QemuError as exc:
            log.warning("could not remove NBD export %s: %s", export, exc)

    async def _drop_bitmap(self, name: str) -> None:
        if name not in self._bitmaps:
            return
        self._bitmaps.remove(name)
        try:
            await self.qmp.execute("block-dirty-bitmap-remove",
                                   {"node": self.disk.node, "name": name})
        except QemuError as exc:
            log.warning("could not remove dirty bitmap %s on %s: %s", name, self.disk.node, exc)

    async def close(self) -> None:
        """Remove every export and bitmap this copy made (also after a failure)."""
        for export in list(self._exports):
            await self._drop_export(export)
        for bitmap in list(self._bitmaps):
            await self._drop_bitmap(bitmap)


async def encoded_batches(nbd: NbdClient, encoder: codec.BatchEncoder,
                          ranges: list[tuple[int, int]], size: int, counters: DiskCounters,
                          prefix: bytes = b"", *, reads_in_flight: int = READS_IN_FLIGHT,
                          on_chunk: Callable[[int, int], None] | None = None,
                          ) -> AsyncGenerator[memoryview, None]:
    """The batches of one disk's `ranges` (byte ranges of a disk of `size` bytes) read
    from `nbd`: what DiskRounds sends in a round, and what an import writes.

    Reads block-aligned chunks covering `ranges` and encodes them, overlapped: the
    reads run `reads_in_flight` chunks ahead, and the next chunk is encoded (in a worker
    thread) while the batch of this one is sent. Batches leave in disk order.

    A chunk is one batch's worth of blocks, read straight into the DATA section of a
    batch buffer and encoded there in place, so its blocks are never copied: the
    buffer goes out as the payload and is reused once the consumer has let go of it.
    `on_chunk(first block, count)` is told of each chunk read."""
    data_at = encoder.data_offset(prefix)
    loop = asyncio.get_running_loop()
    upcoming = iter(aligned_chunks(ranges, size, encoder.data_capacity // DISK_BLOCK))
    # Each chunk: (first block, block count, batch buffer, view of its DATA section,
    # the read). The view marks the buffer busy from the read until it is encoded.
    reads: collections.deque[tuple[int, int, bytearray, memoryview,
                                   asyncio.Future[None]]] = collections.deque()
    pool = BufferPool(PAYLOAD_POOL)

    def read_ahead() -> None:
        while len(reads) < reads_in_flight and (chunk := next(upcoming, None)):
            first, n_blocks = chunk
            into = pool.take(encoder.buffer_size(prefix))
            blocks = memoryview(into)[data_at:data_at + n_blocks * DISK_BLOCK]
            valid = min(n_blocks * DISK_BLOCK, size - first * DISK_BLOCK)
            # The last block of a disk whose size is not a whole block is zero-padded.
            blocks[valid:] = bytes(n_blocks * DISK_BLOCK - valid)
            reads.append((first, n_blocks, into, blocks, asyncio.ensure_future(
                nbd.readinto(first * DISK_BLOCK, blocks[:valid]))))

    async def encode_next() -> tuple[memoryview, BatchCounts] | _Done | None:
        """The next chunk's batch (None if every block was unchanged), or DONE when
        every chunk is done."""
        read_ahead()
        if not reads:
            return DONE
        first, n_blocks, into, blocks, read = reads[0]
        await read
        reads.popleft()
        read_ahead()
        counters.blocks_read += n_blocks
        if on_chunk is not None:
            on_chunk(first, n_blocks)
        # One encoder, one thread at a time: the next encode starts only after this one,
        # and a cancelled round still waits for the thread to let go of the encoder.
        job = loop.run_in_executor(None, _encode_chunk, encoder, first, n_blocks, into,
                                   blocks, prefix)
        try:
            return await asyncio.shield(job)
        finally:
            if not job.done():
                await asyncio.wait([job])

    encoding: asyncio.Task[tuple[memoryview, BatchCounts] | _Done | None] | None = None
    try:
        encoding = asyncio.ensure_future(encode_next())
        while not isinstance(encoded := await encoding, _Done):
            encoding = asyncio.ensure_future(encode_next())
            if encoded is None:
                continue
            payload, counts = encoded
            del encoded  # the payload's buffer is free again once the consumer drops it
            counters.batches += 1
            counters.data_blocks += counts.data
            counters.zero_blocks += counts.zero
            counters.dedup_blocks += counts.copy
            counters.wire_bytes += len(payload)
            yield payload
            del payload
        encoding = None
    finally:
        # Stopped early (a failed send, say): nothing may keep reading, nor the encoder
        # keep running in its thread, once the round is over.
        leftovers: list[asyncio.Future[Any]] = [read for *_, read in reads]
        reads.clear()
        if encoding is not None:
            leftovers.append(encoding)
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.gather(*leftovers, return_exceptions=True)


def _encode_chunk(encoder: codec.BatchEncoder, first: int, n_blocks: int, into: bytearray,
                  blocks: memoryview, prefix: bytes) -> tuple[memoryview, BatchCounts] | None:
    """The DISK_BATCH payload of one chunk read into `blocks`, the DATA section of
    `into` (worker thread), or None when the destination already holds all of it."""
    try:
        batch, position = encoder.encode(scan.run_indices([(first, n_blocks)]), 0,
                                         src=blocks, base=first, into=into, prefix=prefix)
    finally:
        blocks.release()
    assert position == n_blocks, "a chunk is one batch"
    if not batch.entry_count:
        return None
    return (memoryview(batch.payload),
            BatchCounts(batch.data_count, batch.zero_count, batch.copy_count))


class _Done:
    """Marks the end of a round's chunks."""


DONE = _Done()


class BatchCounts(NamedTuple):
    """Entries of one encoded batch, by kind."""

    data: int
    zero: int
    copy: int


PAYLOAD_POOL = 16
"""DISK_BATCH payload buffers kept for reuse within a round."""


def aligned_chunks(ranges: list[tuple[int, int]], size: int,
                    per_chunk: int) -> list[tuple[int, int]]:
    """(first block, block count) chunks of at most `per_chunk` blocks covering `ranges`."""
    last = blocks_of(size)
    chunks: list[tuple[int, int]] = []
    covered = 0  # blocks below this are already in a chunk (ranges may share a block)
    for offset, length in ranges:
        first = max(offset // DISK_BLOCK, covered)
        end = min(blocks_of(offset + length), last)
        while first < end:
            n = min(per_chunk, end - first)
            chunks.append((first, n))
            first += n
        covered = max(covered, end)
    return chunks


@dataclass
class StorageSource:
    """Every copied disk of one migration on the source, and the NBD server they share."""

    qmp: qmp_mod.Qmp
    disks: tuple[DiskSpec, ...]
    socket_path: Path
    job_id: str
    dedup: bool = True
    compress_level: int | None = None
    rounds: list[DiskRounds] = field(default_factory=list)
    _server: bool = False

    async def start(self) -> None:
        if not self.disks:
            return
        self.socket_path.unlink(missing_ok=True)
        await self.qmp.execute("nbd-server-start", {
            "addr": {"type": "unix", "data": {"path": str(self.socket_path)}}})
        self._server = True
        for disk in self.disks:
            rounds = DiskRounds(self.qmp, disk, self.socket_path, self.job_id, self.dedup,
                                self.compress_level)
            await rounds.start()
            self.rounds.append(rounds)

    async def dirty_bytes(self) -> int:
        return sum([await r.dirty_bytes() for r in self.rounds])

    def saved_limits(self) -> list[dict[str, Any]]:
        """What puts back the own limits of every disk ferry capped or is about to (for
        the journal)."""
        return [r.throttle.restore_args() for r in self.rounds
                if r.throttle is not None and r.throttle.prepared]

    async def converge(self, round_s: float, rate: float, pause_s: float,
                       before_first_cap: Callable[[], None]) -> None:
        """After a round (`round_s` long, disks read at `rate`): cap the writes of each
        disk whose next final round would not fit `pause_s` and whose rounds stopped
        shrinking (disk_write_cap). `before_first_cap` runs before a disk's first cap,
        with its limits already in `saved_limits` (the job journals them: a crash must
        not leave the cap on)."""
        for rounds in self.rounds:
            dirty = await rounds.dirty_bytes()
            previous, rounds.previous_dirty = rounds.previous_dirty, dirty
            if rounds.throttle is None:
                rounds.throttle = WriteThrottle(self.qmp, rounds.disk.node, DISK_BLOCK)
            throttle = rounds.throttle
            ops = disk_write_cap(dirty, previous, round_s, rate, pause_s, DISK_BLOCK,
                                 throttle.ops)
            if ops is not None and ops != throttle.ops:
                if not throttle.prepared:
                    await throttle.prepare()
                    before_first_cap()
                ops = await throttle.cap(ops)
                log.info("%s: writes capped at %d/s (%.1f MiB/s) so that its copy converges "
                         "(%.0f MiB dirtied in %.1f s, copied at %.0f MiB/s)", rounds.disk.path,
                         ops, ops * DISK_BLOCK / (1 << 20), dirty / (1 << 20), round_s,
                         rate / (1 << 20))

    async def seal_final_round(self) -> None:
        """Disable every disk's current bitmap (in QEMU's pre-switchover pause)."""
        for rounds in self.rounds:
            await rounds.seal()

    async def round_batches(self, *, first: bool, final: bool) -> AsyncIterator[memoryview]:
        for rounds in self.rounds:
            async for payload in rounds.batches(first=first, final=final):
                yield payload

    async def close(self) -> None:
        """Leave the source QEMU as it was: no export, bitmap, write cap or NBD server of
        ours."""
        for rounds in self.rounds:
            with contextlib.suppress(FerryError):
                await rounds.close()
            if rounds.throttle is not None:
                await rounds.throttle.release()
        if self._server:
            self._server = False
            with contextlib.suppress(QemuError):
                await self.qmp.execute("nbd-server-stop")
        self.socket_path.unlink(missing_ok=True)

    def report(self) -> list[dict[str, object]]:
        """Per-disk figures for the migration report."""
        return [{"path": r.disk.path, "format": r.disk.format, "size": r.disk.virtual_size,
                 "rounds": r.counters.rounds, "blocks_read": r.counters.blocks_read,
                 "data_blocks": r.counters.data_blocks, "zero_blocks": r.counters.zero_blocks,
                 "dedup_blocks": r.counters.dedup_blocks, "wire_bytes": r.counters.wire_bytes,
                 "seconds": round(r.counters.seconds, 3),
                 "write_cap_ops": r.throttle.lowest if r.throttle else None}
                for r in self.rounds]

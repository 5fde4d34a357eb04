"""Page batches: RAM pages and disk blocks as ZERO / COPY / DATA entries plus one zstd frame.

The per-block loops are native (ext/codec.pyx) unless FERRY_PURE_PYTHON=1 asks for the
twin (agent/batch/_codec_py.py); BACKEND says which. Both give the same bytes. This module adds
the per-batch parts: header, zstd, strict parsing.

Batch layout (all integers little-endian; names from agent.batch.format; docs/wire-batch.md):

    header   24 bytes  magic b"FBAT", u8 version (2), u8 log2(block size), u16 flags,
                       u32 entry count, u32 COPY entry count, u32 raw DATA bytes,
                       u32 DATA bytes on the wire (== raw unless FLAG_COMPRESSED)
    entries  (entry count + COPY count) u64 words, in apply order: kind in the top 2 bits
             (1 ZERO, 2 COPY, 3 DATA), bit 61 STORED (DATA only), block index in the low
             61; a COPY word is followed by a word holding the source block index
    data     the DATA entries' blocks back to back; with FLAG_COMPRESSED, one zstd frame
             (with its content size) of the blocks whose entry lacks STORED_BIT (bit 61),
             then the stored ones raw, each part in entry order

The destination applies entries in order; that is what makes COPY correct, because the
source decided each COPY against what the destination holds after the entries before it.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import zstandard

from agent._native import select
from agent.batch.format import (
    DEFAULT_COMPRESS_LEVEL,
    DEFAULT_MAX_DATA_BYTES,
    DEFAULT_MAX_ENTRIES,
    FLAG_COMPRESSED,
    HASH_SIZE,
    HEADER,
    HEADER_SIZE,
    INDEX_MASK,
    KIND_SHIFT,
    KNOWN_FLAGS,
    MAGIC,
    MAX_DATA_BYTES,
    MAX_ENTRIES,
    MAX_WORDS_PER_ENTRY,
    VERSION,
    WORD_SIZE,
    EntryKind,
    block_shift,
)
from agent.errors import BatchError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer


BACKEND, _backend = select("codec", "agent.batch._codec_py")

DedupIndex = _backend.DedupIndex
block_hash = _backend.block_hash

__all__ = [
    "BACKEND", "BatchEncoder", "BatchEntry", "DecodedBatch", "DedupIndex", "EncodedBatch",
    "EntryKind", "apply_batch", "block_hash", "compress_batch", "decode_and_apply", "decode_batch",
    "zero_block_hash",
]


@functools.lru_cache(maxsize=8)
def zero_block_hash(block_size: int) -> bytes:
    """The HASH_SIZE-byte hash of an all-zero block: what sent_hashes starts as."""
    block_shift(block_size)
    return _backend.block_hash(bytes(block_size))


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """One batch ready to send, with what went into it."""

    payload: memoryview | bytes
    entry_count: int
    zero_count: int
    copy_count: int
    data_count: int
    unchanged_count: int
    raw_data_bytes: int
    compressed: bool

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        return len(self.payload)

    def __bytes__(self) -> bytes:
        return bytes(self.payload)


_compressors = threading.local()


def compress_batch(batch: EncodedBatch, level: int, prefix_len: int = 0) -> EncodedBatch:
    """The batch with its DATA as one zstd frame at `level`, blocks that look incompressible
    stored raw after it, or the batch itself when that saves nothing (an incompressible
    batch goes raw: the receiver has less to do).

    Keeping random blocks out of the frame matters twice: zstd does not spend time on them,
    and the text-like blocks get Huffman tables of their own (a mixed 1 MiB batch packs to
    0.85 of its size, split to 0.67). Thread-safe, and zstd and the split run without the
    GIL: senders call it from worker threads, one zstd context per thread. The result no
    longer views the uncompressed batch's buffer.
    """
    raw_len = batch.raw_data_bytes
    if batch.compressed or not raw_len:
        return batch
    by_level: dict[int, zstandard.ZstdCompressor] = _compressors.__dict__.setdefault(
        "by_level", {})
    compressor = by_level.get(level)
    if compressor is None:
        compressor = by_level[level] = zstandard.ZstdCompressor(level=level)
    with memoryview(batch.payload) as view:
        data_start = len(view) - raw_len
        magic, version, shift, flags, entries, copy, _, _ = HEADER.unpack_from(view, prefix_len)
        words, blocks, stored = _backend.split_stored(
            view[prefix_len + HEADER_SIZE:data_start], entries, view[data_start:], 1 << shift)
        packed_len = raw_len - (stored << shift)
        if not packed_len:
            return batch
        with memoryview(blocks) as sections:
            packed = compressor.compress(sections[:packed_len])
            wire_len = len(packed) + raw_len - packed_len
            if wire_len >= raw_len:
                return batch
            header = HEADER.pack(magic, version, shift, flags | FLAG_COMPRESSED, entries,
                                 copy, raw_len, wire_len)
            payload = b"".join((view[:prefix_len], header, words, packed,
                                sections[packed_len:]))
    return dataclasses.replace(batch, payload=payload, compressed=True)


def _u64_view(indices: ReadableBuffer) -> memoryview:
    view = memoryview(indices)
    return view if view.format == "Q" else view.cast("B").cast("Q")


class BatchEncoder:
    """Source side: turns dirty block indices into batches, keeping sent_hashes and dedup.

    sent_hashes (HASH_SIZE bytes per block, writable, shared with the tracker) says what the
    destination holds; every encode updates it as if the batch will be applied, so a batch
    that is encoded but never applied leaves sent_hashes ahead of the destination and the
    transfer must start over. src holds the blocks (a read-only mmap of RAM, say); a disk's
    last partial block must be padded. Not thread-safe: one encoder per stream.
    """

    def __init__(self, src: ReadableBuffer | None, block_size: int,
                 sent_hashes: WriteableBuffer, *, dedup: bool = True,
                 compress_level: int | None = DEFAULT_COMPRESS_LEVEL,
                 max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.block_size = block_size
        self._shift = block_shift(block_size)
        with memoryview(sent_hashes) as view:
            if view.nbytes % HASH_SIZE:
                raise ValueError(f"sent_hashes of {view.nbytes} bytes is not {HASH_SIZE} "
                                 f"bytes per block")
            self.nblocks = view.nbytes // HASH_SIZE
        if not 1 <= max_entries <= MAX_ENTRIES:
            raise ValueError(f"max_entries must be between 1 and {MAX_ENTRIES}")
        if not 0 < max_data_bytes <= MAX_DATA_BYTES:
            raise ValueError(f"max_data_bytes must be between 1 and {MAX_DATA_BYTES}")
        # Whole blocks, at least one, so every batch makes progress.
        self._data_capacity = max(block_size, max_data_bytes - max_data_bytes % block_size)
        self._src = src
        self._sent = sent_hashes
        self._max_entries = max_entries
        self._impl = _backend  # an encoder keeps the backend it started with (index and loops)
        self.index = self._impl.DedupIndex(self.nblocks) if dedup else None
        self.compress_level = compress_level

    def buffer_size(self, prefix: bytes = b"") -> int:
        """Bytes an `into` buffer of encode() needs for any batch with this prefix."""
        return self.data_offset(prefix) + self._data_capacity

    def data_offset(self, prefix: bytes = b"") -> int:
        """Where DATA starts in an `into` buffer: blocks read there can be encoded in
        place (src=that section), saving their copy."""
        entry_room = self._max_entries * MAX_WORDS_PER_ENTRY * WORD_SIZE
        return len(prefix) + HEADER_SIZE + entry_room

    @property
    def data_capacity(self) -> int:
        """DATA bytes one batch holds at most (whole blocks)."""
        return self._data_capacity

    def encode(self, indices: ReadableBuffer, start: int = 0, *,
               src: ReadableBuffer | None = None, base: int = 0,
               offsets: ReadableBuffer | None = None, into: bytearray | None = None,
               prefix: bytes = b"", compress: bool = True) -> tuple[EncodedBatch, int]:
        """Encode indices[start:] (u64 block indices, e.g. array("Q")) until the batch is full.

        Returns the batch and the position to continue from (len(indices) when done). src
        and base override the source for this call: src then holds blocks base, base+1, ...
        (a disk extent just read). With `offsets` (u64, one per index: where in src each
        block is, or ZERO_OFFSET for an all-zero block not in src) the blocks may lie
        anywhere in src, e.g. in a QEMU stream buffer. Blocks whose content the
        destination already holds produce no entry; a batch may therefore be empty
        (entry_count 0).

        The payload starts with `prefix` (a message header of the caller's). With `into`
        (buffer_size(prefix) bytes at least, reused by the caller once nothing views the
        last payload) an uncompressed payload is a view of it: no allocation, no copy.
        compress=False sends this batch uncompressed even if the encoder has a level
        (compress_batch() may pack it later, in another thread).
        """
        source = self._src if src is None else src
        if source is None:
            raise ValueError("no source buffer given")
        (buf, head, data_start, data_end, next_start, entries, zero, copy, data,
         unchanged) = self._impl.encode_blocks(
            source, base, self.block_size, _u64_view(indices), start, self._sent, self.index,
            self._max_entries, self._data_capacity, into, len(prefix),
            None if offsets is None else _u64_view(offsets))
        raw_len = data_end - data_start
        fields = (MAGIC, VERSION, self._shift, 0, entries, copy, raw_len, raw_len)
        HEADER.pack_into(buf, head, *fields)
        start_at = head - len(prefix)
        buf[start_at:head] = prefix
        payload: memoryview | bytes
        if into is not None:
            # The unused room around the batch is outside the view.
            payload = memoryview(buf)[start_at:data_end].toreadonly()
        else:
            # Trim in place, so the data stays where encode_blocks put it and the unused
            # (uninitialised) room around it cannot be reached through the payload;
            # cutting the front of a bytearray only moves its start.
            del buf[data_end:]
            del buf[:start_at]
            payload = memoryview(buf).toreadonly()
        batch = EncodedBatch(payload, entries, zero, copy, data, unchanged, raw_len, False)
        if compress and self.compress_level is not None:
            batch = compress_batch(batch, self.compress_level, len(prefix))
        return batch, next_start


class BatchEntry(NamedTuple):
    """One decoded entry: source is the COPY source block, data the DATA block's bytes."""

    kind: EntryKind
    block: int
    source: int | None
    data: memoryview | None


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A batch that passed every check against its target, DATA decompressed."""

    block_size: int
    nblocks: int
    entry_count: int
    entries: memoryview
    data: memoryview
    zero_count: int
    copy_count: int
    data_count: int
    compressed: bool

    def __iter__(self) -> Iterator[BatchEntry]:
        """The entries in apply order, for a destination that writes them elsewhere (NBD).

        One Python step per entry: meant for disks with large blocks, not for RAM pages.
        """
        words = struct.unpack(f"<{self.entries.nbytes // WORD_SIZE}Q", self.entries)
        pos = taken = 0
        for _ in range(self.entry_count):
            word = words[pos]
            pos += 1
            kind, block = EntryKind(word >> KIND_SHIFT), word & INDEX_MASK
            if kind == EntryKind.COPY:
                yield BatchEntry(kind, block, words[pos], None)
                pos += 1
            elif kind == EntryKind.DATA:
                yield BatchEntry(kind, block, None, self.data[taken:taken + self.block_size])
                taken += self.block_size
            else:
                yield BatchEntry(kind, block, None, None)


def _decompress(frame: memoryview, raw_len: int) -> memoryview:
    """The raw DATA bytes of one zstd frame that must hold exactly raw_len bytes."""
    try:
        # Refuse a frame that does not declare its size, or declares another one, before
        # zstd allocates anything: the declared size bounds the output (no bombs).
        declared = zstandard.frame_content_size(frame)
        if declared != raw_len:
            raise BatchError(f"zstd frame declares {declared} bytes, header says {raw_len}")
        raw = zstandard.ZstdDecompressor().decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise BatchError(f"DATA section is not a valid zstd frame: {exc}") from exc
    if len(raw) != raw_len:
        raise BatchError(f"zstd frame held {len(raw)} bytes, header says {raw_len}")
    return memoryview(raw)


def decode_batch(batch: ReadableBuffer, nblocks: int, block_size: int, *,
                 max_data_bytes: int = MAX_DATA_BYTES) -> DecodedBatch:
    """Parse and check a whole batch for a target of nblocks blocks; BatchError if anything
    is wrong. Nothing is written anywhere; the result may keep views of batch."""
    shift = block_shift(block_size)
    view = memoryview(batch).cast("B")
    if view.nbytes < HEADER_SIZE:
        raise BatchError(f"batch of {view.nbytes} bytes is shorter than its header")
    (magic, version, batch_shift, flags, entry_count, copy_count, raw_len,
     wire_len) = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise BatchError(f"not a page batch (magic {magic!r})")
    if version != VERSION:
        raise BatchError(f"page batch version {version}, expected {VERSION}")
    if batch_shift != shift:
        raise BatchError(f"batch of 2**{batch_shift}-byte blocks for a target of "
                         f"{block_size}-byte blocks")
    if flags & ~KNOWN_FLAGS:
        raise BatchError(f"unknown batch flags {flags:#x}")
    if entry_count > MAX_ENTRIES or copy_count > entry_count:
        raise BatchError(f"{entry_count} entries with {copy_count} COPY entries is out of "
                         f"bounds (at most {MAX_ENTRIES})")
    if raw_len > min(max_data_bytes, MAX_DATA_BYTES) or raw_len % block_size:
        raise BatchError(f"{raw_len} DATA bytes is not a whole number of blocks within "
                         f"{min(max_data_bytes, MAX_DATA_BYTES)}")
    compressed = bool(flags & FLAG_COMPRESSED)
    if compressed and not 0 < wire_len < raw_len:
        raise BatchError(f"compressed DATA of {wire_len} bytes for {raw_len} raw bytes")
    if not compressed and wire_len != raw_len:
        raise BatchError(f"uncompressed DATA of {wire_len} bytes, header says {raw_len}")
    entries_end = HEADER_SIZE + (entry_count + copy_count) * WORD_SIZE
    if entries_end + wire_len != view.nbytes:
        raise BatchError(f"batch of {view.nbytes} bytes, header says {entries_end + wire_len}")
    entries = view[HEADER_SIZE:entries_end]
    zero, copy, data, stored = _backend.check_entries(entries, entry_count, nblocks)
    if copy != copy_count:
        raise BatchError(f"{copy} COPY entries, header says {copy_count}")
    if data * block_size != raw_len:
        raise BatchError(f"{data} DATA entries need {data * block_size} bytes, header says "
                         f"{raw_len}")
    payload = view[entries_end:]
    raw = _unpack(entries, entry_count, payload, raw_len, stored * block_size, block_size) \
        if compressed else _uncompressed(payload, stored)
    return DecodedBatch(block_size, nblocks, entry_count, entries, raw, zero, copy, data,
                        compressed)


def _uncompressed(payload: memoryview, stored: int) -> memoryview:
    if stored:
        raise BatchError(f"{stored} DATA entries are marked stored in an uncompressed batch")
    return payload


def _unpack(entries: memoryview, entry_count: int, payload: memoryview, raw_len: int,
            stored_len: int, block_size: int) -> memoryview:
    """The DATA blocks in entry order: the zstd frame's, with the stored ones after it
    merged back in."""
    frame_len = payload.nbytes - stored_len
    if stored_len >= raw_len or frame_len <= 0:
        raise BatchError(f"a compressed batch of {raw_len} DATA bytes stores {stored_len} "
                         f"of them raw, leaving a frame of {frame_len} bytes")
    packed = _decompress(payload[:frame_len], raw_len - stored_len)
    if not stored_len:
        return packed
    return memoryview(_backend.merge_stored(entries, entry_count, packed,
                                            payload[frame_len:], block_size))


def apply_batch(decoded: DecodedBatch, dst: WriteableBuffer, fd: int = -1, *,
                pwrite_data: bool = True) -> None:
    """Write a decoded batch into dst (the destination's RAM mmap, say), entries in order.

    The entries are checked again against dst first, so nothing is written unless all of
    the batch can be. fd, the file dst maps (shared), takes runs of blocks: ZERO runs as
    holes, DATA runs by pwrite (cheaper than faulting fresh 4 KiB pages in through the
    mapping) or, with pwrite_data false (huge-page tmpfs), allocated, then copied.
    """
    with memoryview(dst) as view:
        if view.readonly:
            raise ValueError("destination buffer is read-only")
        if view.nbytes < decoded.nblocks * decoded.block_size:
            raise ValueError(f"destination of {view.nbytes} bytes is smaller than the "
                             f"{decoded.nblocks} blocks the batch was checked against")
        target = view.cast("B")
        try:
            _backend.apply_entries(decoded.entries, decoded.entry_count, decoded.data, target,
                                   decoded.block_size, fd, pwrite_data)
        finally:
            target.release()


def decode_and_apply(batch: ReadableBuffer, dst: WriteableBuffer, nblocks: int,
                     block_size: int, fd: int = -1, *, pwrite_data: bool = True) -> int:
    """Check a whole batch, then write it into dst (through fd, when given: apply_batch);
    the number of entries applied."""
    decoded = decode_batch(batch, nblocks, block_size)
    apply_batch(decoded, dst, fd, pwrite_data=pwrite_data)
    return decoded.entry_count

"""Pure-Python twin of agent._native.codec: the specification of the per-block codec loops.

Every function and class here has the same signature and result as its Cython counterpart;
the tests compare the two on generated inputs. agent.batch.codec builds the public API on top.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import TYPE_CHECKING

import xxhash

from agent.batch.format import (
    ENTROPY_ONE,
    ENTROPY_SAMPLES,
    ENTROPY_TABLE,
    HASH_SIZE,
    HEADER_SIZE,
    INDEX_MASK,
    KIND_SHIFT,
    MAX_DATA_BYTES,
    MAX_ENTRIES,
    MAX_WORDS_PER_ENTRY,
    STORED_BIT,
    STORED_HALF_BITS,
    WORD_SIZE,
    ZERO_OFFSET,
    EntryKind,
    block_shift,
)
from agent.errors import BatchError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

# A home slot and the next few: a lookup or insert never looks further, so the index is a
# cache (verified on use against sent_hashes), never a source of truth.
PROBE_LIMIT = 8
_EMPTY = 0  # slot value: block index + 1, so that zeroed memory is an empty table

_ZERO = EntryKind.ZERO << KIND_SHIFT
_COPY = EntryKind.COPY << KIND_SHIFT
_DATA = EntryKind.DATA << KIND_SHIFT


def block_hash(block: ReadableBuffer) -> bytes:
    """XXH3-128 of block as HASH_SIZE bytes: low64 then high64, little-endian."""
    return xxhash.xxh3_128_intdigest(block).to_bytes(HASH_SIZE, "little")


def _split(h: bytes) -> tuple[int, int]:
    if len(h) != HASH_SIZE:
        raise ValueError(f"a hash is {HASH_SIZE} bytes, not {len(h)}")
    return int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")


def _hash_count(sent_hashes: ReadableBuffer) -> int:
    with memoryview(sent_hashes) as view:
        nbytes = view.nbytes
    if nbytes % HASH_SIZE:
        raise ValueError(f"sent_hashes of {nbytes} bytes is not {HASH_SIZE} bytes per block")
    return nbytes // HASH_SIZE


class DedupIndex:
    """Open-addressing table from a block's 128-bit hash to a block holding that content.

    A slot keeps the low 64 bits of the hash as a tag and the block index; whether the block
    still holds the content is read from sent_hashes on every use, so stale slots cost a
    missed match at worst and are the first to be overwritten.
    """

    def __init__(self, nblocks: int) -> None:
        if not 0 <= nblocks <= INDEX_MASK:
            raise ValueError(f"cannot index {nblocks} blocks")
        self.nblocks = nblocks
        # Twice the blocks, rounded up to a power of two: live keys stay under half load.
        self.capacity = max(16, 1 << (2 * nblocks - 1).bit_length()) if nblocks else 16
        self._mask = self.capacity - 1
        self._tags = [0] * self.capacity
        self._values = [_EMPTY] * self.capacity

    def _holds(self, sent: memoryview, block: int, lo: int, hi: int) -> bool:
        at = block * HASH_SIZE
        return sent[at:at + HASH_SIZE] == lo.to_bytes(8, "little") + hi.to_bytes(8, "little")

    def _find(self, lo: int, hi: int, sent: memoryview) -> int:
        home = hi & self._mask
        for probe in range(PROBE_LIMIT):
            slot = (home + probe) & self._mask
            value = self._values[slot]
            if value == _EMPTY:
                return -1  # inserts fill the first free slot, so the key is not further on
            block = value - 1
            if self._tags[slot] == lo and block < self.nblocks and self._holds(sent, block, lo, hi):
                return block
        return -1

    def _put(self, lo: int, hi: int, index: int, sent: memoryview) -> None:
        home = hi & self._mask
        stale = -1
        for probe in range(PROBE_LIMIT):
            slot = (home + probe) & self._mask
            value = self._values[slot]
            if value == _EMPTY:
                target = stale if stale >= 0 else slot
                self._tags[target], self._values[target] = lo, index + 1
                return
            block = value - 1
            tag = self._tags[slot]
            if tag == lo and self._holds(sent, block, lo, hi):
                self._values[slot] = index + 1
                return
            at = block * HASH_SIZE
            if stale < 0 and int.from_bytes(sent[at:at + 8], "little") != tag:
                stale = slot
        target = stale if stale >= 0 else home  # full window of live keys: evict the home slot
        self._tags[target], self._values[target] = lo, index + 1

    def _check(self, sent_hashes: ReadableBuffer) -> memoryview:
        if _hash_count(sent_hashes) != self.nblocks:
            raise ValueError(f"sent_hashes does not hold {self.nblocks} hashes")
        return memoryview(sent_hashes).cast("B")

    def lookup(self, h: bytes, sent_hashes: ReadableBuffer) -> int:
        """A block whose sent hash is h, or -1."""
        lo, hi = _split(h)
        return self._find(lo, hi, self._check(sent_hashes))

    def insert(self, h: bytes, index: int, sent_hashes: ReadableBuffer) -> None:
        """Remember that block index holds content with hash h."""
        lo, hi = _split(h)
        if not 0 <= index < self.nblocks:
            raise ValueError(f"block {index} outside {self.nblocks} blocks")
        self._put(lo, hi, index, self._check(sent_hashes))


def _check_encode_args(block_size: int, max_entries: int, data_capacity: int) -> None:
    block_shift(block_size)
    if not 1 <= max_entries <= MAX_ENTRIES:
        raise ValueError(f"max_entries must be between 1 and {MAX_ENTRIES}, not {max_entries}")
    if (data_capacity < block_size or data_capacity % block_size
            or data_capacity > MAX_DATA_BYTES):
        raise ValueError(f"data capacity {data_capacity} is not a whole number of "
                         f"{block_size}-byte blocks up to {MAX_DATA_BYTES} bytes")


def encode_blocks(src: ReadableBuffer, base: int, block_size: int, indices: ReadableBuffer,
                  start: int, sent_hashes: WriteableBuffer, index: DedupIndex | None,
                  max_entries: int, data_capacity: int, into: bytearray | None = None,
                  prefix: int = 0, offsets: ReadableBuffer | None = None,
                  ) -> tuple[bytearray, int, int, int, int, int, int, int, int, int]:
    """Classify indices[start:] into entries until a budget is full; update sent_hashes.

    src holds blocks base, base+1, ...; indices are u64 block indices. With `offsets`
    (u64, one per index) block indices[k] is instead at src[offsets[k]:], or all zero
    where offsets[k] is ZERO_OFFSET (a QEMU ZERO record: nothing in src). Returns
    (buf, head, data_start, data_end, next_start, entries, zero, copy, data, unchanged):
    buf[head:head+HEADER_SIZE] is left for the header, the entry words follow up to
    data_start, then the raw DATA bytes up to data_end; at least `prefix` bytes before head
    are free for the caller. buf is `into` if given (room for the budgets and prefix),
    else a new bytearray; src may be into's DATA section itself, with indices ascending.
    An index outside src or sent_hashes ends the batch before it; ValueError if it is the
    first one (nothing changed then).
    """
    _check_encode_args(block_size, max_entries, data_capacity)
    needed = prefix + HEADER_SIZE + max_entries * MAX_WORDS_PER_ENTRY * WORD_SIZE + data_capacity
    if into is not None and len(into) < needed:
        raise ValueError(f"buffer of {len(into)} bytes; a batch needs {needed}")
    nblocks = _hash_count(sent_hashes)
    if index is not None and index.nblocks != nblocks:
        raise ValueError(f"dedup index is for {index.nblocks} blocks, not {nblocks}")
    with memoryview(src) as raw_src, memoryview(indices) as raw_idx, \
            memoryview(sent_hashes) as raw_sent:
        source = raw_src.cast("B")
        wanted = raw_idx.cast("B").cast("Q")
        sent = raw_sent.cast("B")
        where = None if offsets is None else memoryview(offsets).cast("B").cast("Q")
        if where is not None and len(where) < len(wanted):
            raise ValueError(f"{len(where)} offsets for {len(wanted)} indices")
        if not 0 <= start <= len(wanted):
            raise ValueError(f"start {start} outside {len(wanted)} indices")
        src_blocks = source.nbytes // block_size
        zero_block = bytes(block_size)
        zero_hash = block_hash(zero_block)
        words: list[int] = []
        data = bytearray()
        entries = zero = copy = ndata = unchanged = 0
        pos = start
        while pos < len(wanted):
            if entries >= max_entries or len(data) + block_size > data_capacity:
                break
            i = wanted[pos]
            at = (i - base) * block_size if where is None else where[pos]
            if where is None:
                inside = base <= i < base + src_blocks
            else:
                inside = at == ZERO_OFFSET or at + block_size <= source.nbytes
            if not (inside and i < nblocks):
                if pos == start:
                    raise ValueError(f"block {i} outside the source (blocks {base}.."
                                     f"{base + src_blocks - 1}, or its offset) or the "
                                     f"{nblocks} sent hashes")
                break
            # The copy that is hashed and sent.
            block = zero_block if at == ZERO_OFFSET and where is not None else bytes(
                source[at:at + block_size])
            is_zero = block == zero_block
            h = zero_hash if is_zero else block_hash(block)
            slot = slice(i * HASH_SIZE, (i + 1) * HASH_SIZE)
            pos += 1
            if sent[slot] == h:
                unchanged += 1
                continue
            entries += 1
            if is_zero:
                sent[slot] = h
                words.append(_ZERO | i)
                zero += 1
                continue
            # Look up before recording h for i, so a stale slot of i's own cannot shadow
            # another block that really holds h.
            lo, hi = _split(h)
            j = index._find(lo, hi, sent) if index is not None else -1
            sent[slot] = h
            if j >= 0 and j != i:
                words += (_COPY | i, j)
                copy += 1
            else:
                words.append(_DATA | i)
                data += block
                ndata += 1
            if index is not None:
                index._put(lo, hi, i, sent)
    packed = struct.pack(f"<{len(words)}Q", *words)
    data_start = prefix + HEADER_SIZE + len(packed)
    data_end = data_start + len(data)
    buf = bytearray(data_end) if into is None else into
    buf[data_start - len(packed):data_start] = packed
    buf[data_start:data_end] = data
    return buf, prefix, data_start, data_end, pos, entries, zero, copy, ndata, unchanged


def check_entries(entries: ReadableBuffer, count: int, nblocks: int
                  ) -> tuple[int, int, int, int]:
    """(zero, copy, data, stored) counts of count entries that must fill entries exactly;
    else BatchError. Only DATA entries may be stored."""
    with memoryview(entries) as raw:
        view = raw.cast("B")
        if view.nbytes % WORD_SIZE:
            raise BatchError(f"entry section of {view.nbytes} bytes is not whole words")
        words = struct.unpack(f"<{view.nbytes // WORD_SIZE}Q", view)
    counts = {EntryKind.ZERO: 0, EntryKind.COPY: 0, EntryKind.DATA: 0}
    stored = pos = 0
    for entry in range(count):
        if pos >= len(words):
            raise BatchError(f"entry {entry} lies beyond the entry section")
        word = words[pos]
        pos += 1
        kind, i = word >> KIND_SHIFT, word & INDEX_MASK
        if kind not in counts:
            raise BatchError(f"entry {entry} has no valid kind ({kind})")
        if word & STORED_BIT:
            if kind != EntryKind.DATA:
                raise BatchError(f"entry {entry} of kind {kind} is marked stored")
            stored += 1
        if i >= nblocks:
            raise BatchError(f"entry {entry} names block {i} of {nblocks}")
        counts[EntryKind(kind)] += 1
        if kind == EntryKind.COPY:
            if pos >= len(words):
                raise BatchError(f"COPY entry {entry} lost its source word")
            j = words[pos]
            pos += 1
            if j >= nblocks or j == i:
                raise BatchError(f"COPY entry {entry} copies block {i} from block {j} of "
                                 f"{nblocks}")
    if pos != len(words):
        raise BatchError(f"{len(words) - pos} words left after {count} entries")
    return counts[EntryKind.ZERO], counts[EntryKind.COPY], counts[EntryKind.DATA], stored


def apply_entries(entries: ReadableBuffer, count: int, data: ReadableBuffer,
                  dst: WriteableBuffer, block_size: int, fd: int = -1,
                  pwrite_data: bool = True) -> None:
    """Check the entries against dst and data (BatchError, nothing written), then apply in order.

    With fd (the file dst maps, shared), runs of consecutive blocks go to the file a run
    at a time: ZERO runs become holes (never faulted in, no memory held), DATA runs are
    written with pwrite (a fresh 4 KiB tmpfs page filled by write() is neither faulted in
    nor zeroed first) or, with pwrite_data false (huge-page tmpfs, where a partial write
    zeroes the rest of its 2 MiB page every time), allocated and copied through dst.
    """
    block_shift(block_size)
    with memoryview(dst) as raw_dst, memoryview(data) as raw_data, \
            memoryview(entries) as raw_entries:
        out = raw_dst.cast("B")
        payload = raw_data.cast("B")
        _, _, ndata, _ = check_entries(raw_entries, count, out.nbytes // block_size)
        if ndata * block_size != payload.nbytes:
            raise BatchError(f"{ndata} DATA entries need {ndata * block_size} bytes, "
                             f"not {payload.nbytes}")
        words = struct.unpack(f"<{raw_entries.nbytes // WORD_SIZE}Q", raw_entries.cast("B"))
        zero_block = bytes(block_size)
        pos = taken = 0
        run_kind, run_first, run_end, run_at = EntryKind.DATA, 0, 0, 0  # the pending run

        def flush() -> None:
            nonlocal run_first, run_end
            if run_end > run_first:
                offset, n = run_first * block_size, (run_end - run_first) * block_size
                if run_kind == EntryKind.ZERO:
                    _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, n)
                elif pwrite_data:
                    _pwrite_all(fd, payload[run_at:run_at + n], offset)
                else:   # space first: a full tmpfs is an OSError here, not a SIGBUS
                    _fallocate(fd, 0, offset, n)
                    out[offset:offset + n] = payload[run_at:run_at + n]
            run_first = run_end = 0

        for _ in range(count):
            word = words[pos]
            pos += 1
            kind, i = word >> KIND_SHIFT, word & INDEX_MASK
            block = slice(i * block_size, (i + 1) * block_size)
            if fd >= 0 and kind != EntryKind.COPY:
                if run_end <= run_first or kind != run_kind or i != run_end:
                    flush()
                    run_kind, run_first, run_end, run_at = kind, i, i + 1, taken
                else:
                    run_end += 1
                if kind == EntryKind.DATA:
                    taken += block_size
                continue
            flush()   # a COPY may read what the run writes; entries apply in order
            if kind == EntryKind.ZERO:
                if out[block] != zero_block:  # untouched private memory stays so
                    out[block] = zero_block
            elif kind == EntryKind.COPY:
                j = words[pos]
                pos += 1
                out[block] = out[j * block_size:(j + 1) * block_size]
            else:
                out[block] = payload[taken:taken + block_size]
                taken += block_size
        flush()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


# <linux/falloc.h>; os has posix_fallocate but no way to punch a hole.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    while _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"writing pages into the RAM file: {os.strerror(err)}")


def _sampling(block_size: int) -> tuple[int, int, int]:
    """(samples, stride, limit): a block is stored when sum(T[count]) <= limit."""
    shift = block_shift(block_size)
    samples = min(block_size, ENTROPY_SAMPLES)
    sample_shift = min(shift, ENTROPY_SAMPLES.bit_length() - 1)
    # H = log2(n) - sum(c log2 c) / n >= STORED_HALF_BITS / 2
    limit = samples * ENTROPY_ONE * (2 * sample_shift - STORED_HALF_BITS) // 2
    return samples, block_size // samples, limit


def incompressible(block: ReadableBuffer) -> bool:
    """Whether a block (a power of two of bytes) looks random: its sampled byte entropy is
    at least STORED_HALF_BITS / 2 bits per byte."""
    with memoryview(block) as raw:
        view = raw.cast("B")
        samples, stride, limit = _sampling(view.nbytes)
        counts = [0] * 256
        for at in range(0, samples * stride, stride):
            counts[view[at]] += 1
    return sum(ENTROPY_TABLE[c] for c in counts) <= limit


def _data_words(words: tuple[int, ...], count: int) -> list[int]:
    """Positions of the DATA words among count entries (checked before)."""
    positions = []
    pos = 0
    for _ in range(count):
        kind = words[pos] >> KIND_SHIFT
        if kind == EntryKind.DATA:
            positions.append(pos)
        pos += 2 if kind == EntryKind.COPY else 1
    return positions


def split_stored(entries: ReadableBuffer, count: int, data: ReadableBuffer,
                 block_size: int) -> tuple[bytearray, bytearray, int]:
    """Sender: (words, blocks, stored) for a batch's entries and DATA (checked, unstored).

    words are the entries with STORED_BIT set on every DATA entry whose block looks
    incompressible; blocks holds the other DATA blocks in order, then the stored ones in
    order; stored counts the latter.
    """
    block_shift(block_size)
    with memoryview(entries) as raw_entries, memoryview(data) as raw_data:
        view = raw_entries.cast("B")
        payload = raw_data.cast("B")
        words = list(struct.unpack(f"<{view.nbytes // WORD_SIZE}Q", view))
        positions = _data_words(tuple(words), count)
        if len(positions) * block_size != payload.nbytes:
            raise ValueError(f"{len(positions)} DATA entries need "
                             f"{len(positions) * block_size} bytes, not {payload.nbytes}")
        packed, stored = bytearray(), bytearray()
        for k, pos in enumerate(positions):
            block = payload[k * block_size:(k + 1) * block_size]
            if incompressible(block):
                words[pos] |= STORED_BIT
                stored += block
            else:
                packed += block
    return bytearray(struct.pack(f"<{len(words)}Q", *words)), packed + stored, \
        len(stored) // block_size


def merge_stored(entries: ReadableBuffer, count: int, packed: ReadableBuffer,
                 stored: ReadableBuffer, block_size: int) -> bytearray:
    """Receiver: the DATA blocks in entry order, from the frame's blocks (packed) and the
    stored ones, as the entries' STORED bits say (entries checked before)."""
    block_shift(block_size)
    with memoryview(entries) as raw_entries, memoryview(packed) as raw_packed, \
            memoryview(stored) as raw_stored:
        view = raw_entries.cast("B")
        words = struct.unpack(f"<{view.nbytes // WORD_SIZE}Q", view)
        positions = _data_words(words, count)
        nstored = sum(1 for pos in positions if words[pos] & STORED_BIT)
        sources = raw_packed.cast("B"), raw_stored.cast("B")
        if (sources[0].nbytes != (len(positions) - nstored) * block_size
                or sources[1].nbytes != nstored * block_size):
            raise BatchError(f"{len(positions)} DATA entries, {nstored} of them stored, do "
                             f"not match {sources[0].nbytes} + {sources[1].nbytes} bytes")
        out = bytearray()
        taken = [0, 0]
        for pos in positions:
            side = 1 if words[pos] & STORED_BIT else 0
            out += sources[side][taken[side]:taken[side] + block_size]
            taken[side] += block_size
    return out

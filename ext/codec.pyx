# cython: language_level=3
"""Native per-block loops of the page-batch codec (twin: agent/batch/_codec_py.py), GIL released."""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.errno cimport EINTR, errno
from libc.string cimport memcpy, memmove, memset, strerror
from posix.types cimport off_t
from posix.unistd cimport pwrite

cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, off_t offset, off_t length)

cdef extern from "<linux/falloc.h>":
    enum:
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE

from codec cimport fcodec_hash, fcodec_is_zero, fcodec_load_le64, fcodec_store_le64

from agent.batch import format as _fmt
from agent.errors import BatchError

# The wire constants come from agent.batch.format at import: one source of truth.
cdef size_t HASH_SIZE = _fmt.HASH_SIZE
cdef size_t HEADER_SIZE = _fmt.HEADER_SIZE
cdef size_t WORD_SIZE = _fmt.WORD_SIZE
cdef size_t MAX_WORDS_PER_ENTRY = _fmt.MAX_WORDS_PER_ENTRY
cdef unsigned KIND_SHIFT = _fmt.KIND_SHIFT
cdef uint64_t INDEX_MASK = _fmt.INDEX_MASK
cdef uint64_t STORED_BIT = _fmt.STORED_BIT
cdef uint64_t KIND_ZERO = _fmt.EntryKind.ZERO
cdef uint64_t KIND_COPY = _fmt.EntryKind.COPY
cdef uint64_t KIND_DATA = _fmt.EntryKind.DATA
cdef uint64_t ZERO_OFFSET = _fmt.ZERO_OFFSET

# Same probe window as the twin: a lookup or insert never looks further.
PROBE_LIMIT = 8
cdef uint64_t C_PROBE_LIMIT = PROBE_LIMIT

# The entropy judge's table (c * log2 c for every count a sample can hold), copied from
# agent.batch.format so that both codecs judge every block alike.
cdef enum:
    MAX_SAMPLES = 1024
    MAX_SAMPLES_SHIFT = 10
if (_fmt.ENTROPY_SAMPLES != MAX_SAMPLES or MAX_SAMPLES != 1 << MAX_SAMPLES_SHIFT
        or len(_fmt.ENTROPY_TABLE) != MAX_SAMPLES + 1):
    raise ImportError("agent.batch.format's entropy sampling does not match ext/codec.pyx")
cdef int64_t ENTROPY_TABLE[MAX_SAMPLES + 1]
for _c, _v in enumerate(_fmt.ENTROPY_TABLE):
    ENTROPY_TABLE[_c] = _v

# check_entries outcomes; the detail words say which entry and which values.
cdef enum:
    ENTRIES_OK
    ENTRY_BEYOND
    ENTRY_BAD_KIND
    ENTRY_BAD_INDEX
    ENTRY_NO_SOURCE
    ENTRY_BAD_SOURCE
    ENTRY_BAD_STORED
    ENTRY_WORDS_LEFT


def block_hash(const unsigned char[::1] block not None):
    """XXH3-128 of block as HASH_SIZE bytes: low64 then high64, little-endian."""
    cdef uint64_t lo, hi
    cdef unsigned char out[16]
    cdef const unsigned char *p = &block[0] if block.shape[0] else <const unsigned char *>out
    with nogil:
        fcodec_hash(p, block.shape[0], &lo, &hi)
    fcodec_store_le64(out, lo)
    fcodec_store_le64(out + 8, hi)
    return out[:16]


cdef inline bint _holds(const unsigned char *sent, uint64_t block, uint64_t lo,
                        uint64_t hi) noexcept nogil:
    cdef const unsigned char *h = sent + block * HASH_SIZE
    return fcodec_load_le64(h) == lo and fcodec_load_le64(h + 8) == hi


cdef class DedupIndex:
    """Open-addressing table from a block's 128-bit hash to a block holding that content.

    A slot keeps the low 64 bits of the hash as a tag and the block index; whether the block
    still holds the content is read from sent_hashes on every use, so stale slots cost a
    missed match at worst and are the first to be overwritten.
    """

    # Two words per slot: the hash's low 64 bits (tag), then block index + 1 (0 = empty).
    cdef uint64_t *slots
    cdef uint64_t mask
    cdef readonly uint64_t nblocks
    cdef readonly uint64_t capacity

    def __cinit__(self, nblocks):
        if not 0 <= nblocks <= _fmt.INDEX_MASK:
            raise ValueError(f"cannot index {nblocks} blocks")
        # Twice the blocks, rounded up to a power of two: live keys stay under half load.
        capacity = max(16, 1 << (2 * nblocks - 1).bit_length()) if nblocks else 16
        self.nblocks = nblocks
        self.capacity = capacity
        self.mask = capacity - 1
        # calloc: an empty table is zeroed memory, which the kernel hands out lazily.
        self.slots = <uint64_t *>calloc(capacity * 2, sizeof(uint64_t))
        if self.slots == NULL:
            raise MemoryError(f"no memory for a dedup index of {capacity} slots")

    def __dealloc__(self):
        free(self.slots)

    cdef int64_t find(self, uint64_t lo, uint64_t hi, const unsigned char *sent) noexcept nogil:
        cdef uint64_t home = hi & self.mask, slot, value, probe
        for probe in range(C_PROBE_LIMIT):
            slot = (home + probe) & self.mask
            value = self.slots[2 * slot + 1]
            if value == 0:
                return -1  # inserts fill the first free slot, so the key is not further on
            if (self.slots[2 * slot] == lo and value - 1 < self.nblocks
                    and _holds(sent, value - 1, lo, hi)):
                return <int64_t>(value - 1)
        return -1

    cdef void put(self, uint64_t lo, uint64_t hi, uint64_t index,
                  const unsigned char *sent) noexcept nogil:
        cdef uint64_t home = hi & self.mask, slot, value, tag, probe, target
        cdef int64_t stale = -1
        for probe in range(C_PROBE_LIMIT):
            slot = (home + probe) & self.mask
            value = self.slots[2 * slot + 1]
            if value == 0:
                target = <uint64_t>stale if stale >= 0 else slot
                self.slots[2 * target] = lo
                self.slots[2 * target + 1] = index + 1
                return
            tag = self.slots[2 * slot]
            if tag == lo and _holds(sent, value - 1, lo, hi):
                self.slots[2 * slot + 1] = index + 1
                return
            if stale < 0 and fcodec_load_le64(sent + (value - 1) * HASH_SIZE) != tag:
                stale = <int64_t>slot
        target = <uint64_t>stale if stale >= 0 else home  # full window of live keys: evict home
        self.slots[2 * target] = lo
        self.slots[2 * target + 1] = index + 1

    cdef const unsigned char *_sent(self, const unsigned char[::1] sent_hashes) except NULL:
        if <uint64_t>sent_hashes.shape[0] != self.nblocks * HASH_SIZE:
            raise ValueError(f"sent_hashes does not hold {self.nblocks} hashes")
        return &sent_hashes[0] if sent_hashes.shape[0] else <const unsigned char *>self.slots

    def lookup(self, bytes h not None, const unsigned char[::1] sent_hashes not None):
        """A block whose sent hash is h, or -1."""
        if <size_t>len(h) != HASH_SIZE:
            raise ValueError(f"a hash is {HASH_SIZE} bytes, not {len(h)}")
        cdef const unsigned char *p = h
        return self.find(fcodec_load_le64(p), fcodec_load_le64(p + 8), self._sent(sent_hashes))

    def insert(self, bytes h not None, uint64_t index,
               const unsigned char[::1] sent_hashes not None):
        """Remember that block index holds content with hash h."""
        if <size_t>len(h) != HASH_SIZE:
            raise ValueError(f"a hash is {HASH_SIZE} bytes, not {len(h)}")
        if index >= self.nblocks:
            raise ValueError(f"block {index} outside {self.nblocks} blocks")
        cdef const unsigned char *p = h
        self.put(fcodec_load_le64(p), fcodec_load_le64(p + 8), index, self._sent(sent_hashes))


def _check_encode_args(block_size, max_entries, data_capacity):
    _fmt.block_shift(block_size)
    if not 1 <= max_entries <= _fmt.MAX_ENTRIES:
        raise ValueError(f"max_entries must be between 1 and {_fmt.MAX_ENTRIES}, not {max_entries}")
    if (data_capacity < block_size or data_capacity % block_size
            or data_capacity > _fmt.MAX_DATA_BYTES):
        raise ValueError(f"data capacity {data_capacity} is not a whole number of "
                         f"{block_size}-byte blocks up to {_fmt.MAX_DATA_BYTES} bytes")


def encode_blocks(const unsigned char[::1] src not None, uint64_t base, size_t block_size,
                  const uint64_t[::1] indices not None, size_t start,
                  unsigned char[::1] sent_hashes not None, DedupIndex index,
                  size_t max_entries, size_t data_capacity, bytearray into=None,
                  size_t prefix=0, const uint64_t[::1] offsets=None):
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
    if sent_hashes.shape[0] % HASH_SIZE:
        raise ValueError(f"sent_hashes of {sent_hashes.shape[0]} bytes is not {HASH_SIZE} "
                         f"bytes per block")
    cdef uint64_t nblocks = sent_hashes.shape[0] // HASH_SIZE
    if index is not None and index.nblocks != nblocks:
        raise ValueError(f"dedup index is for {index.nblocks} blocks, not {nblocks}")
    cdef size_t nindices = indices.shape[0]
    if start > nindices:
        raise ValueError(f"start {start} outside {nindices} indices")
    cdef uint64_t src_blocks = src.shape[0] // block_size
    cdef bint located = offsets is not None
    if located and <size_t>offsets.shape[0] < nindices:
        raise ValueError(f"{offsets.shape[0]} offsets for {nindices} indices")
    cdef const uint64_t *where = &offsets[0] if located and offsets.shape[0] else NULL
    cdef uint64_t at = 0
    cdef size_t src_len = src.shape[0]
    # Entries are written after the header room, then moved right against the data, so the
    # (large) DATA section is never copied again when the batch goes out uncompressed.
    cdef size_t room = prefix + HEADER_SIZE + max_entries * MAX_WORDS_PER_ENTRY * WORD_SIZE
    if into is None:
        buf = PyByteArray_FromStringAndSize(NULL, room + data_capacity)
    elif <size_t>len(into) < room + data_capacity:
        raise ValueError(f"buffer of {len(into)} bytes; a batch needs {room + data_capacity}")
    else:
        buf = into
    cdef unsigned char *out = <unsigned char *>PyByteArray_AS_STRING(buf)
    cdef unsigned char *words = out + prefix + HEADER_SIZE
    cdef unsigned char *data = out + room
    cdef const unsigned char *source = &src[0] if src.shape[0] else NULL
    cdef unsigned char *sent = &sent_hashes[0] if sent_hashes.shape[0] else NULL
    cdef bint dedup = index is not None
    cdef size_t pos = start, nwords = 0, data_len = 0
    cdef size_t entries = 0, zero = 0, copy = 0, ndata = 0, unchanged = 0
    cdef uint64_t i = 0, lo, hi, zlo = 0, zhi = 0
    cdef int64_t j
    cdef bint have_zero_hash = False, bad = False, is_zero
    cdef unsigned char *block
    cdef unsigned char *slot
    with nogil:
        while pos < nindices:
            if entries >= max_entries or data_len + block_size > data_capacity:
                break
            i = indices[pos]
            if located:
                at = where[pos]
                if i >= nblocks or (at != ZERO_OFFSET and (at > src_len
                                                           or src_len - at < block_size)):
                    bad = True
                    break
            elif i < base or i - base >= src_blocks or i >= nblocks:
                bad = True
                break
            else:
                at = (i - base) * block_size
            # Copy first and hash the copy: a block written meanwhile is caught next scan.
            # A source that is `into`'s own DATA section (encoding in place) only moves down
            # past the blocks that produced no DATA, or not at all.
            block = data + data_len
            if located and at == ZERO_OFFSET:
                is_zero = True   # nothing to read: its hash is the zero hash
                if not have_zero_hash:
                    memset(block, 0, block_size)
            else:
                if block != source + at:
                    memmove(block, source + at, block_size)
                is_zero = fcodec_is_zero(block, block_size)
            if is_zero:
                if not have_zero_hash:
                    fcodec_hash(block, block_size, &zlo, &zhi)
                    have_zero_hash = True
                lo, hi = zlo, zhi
            else:
                fcodec_hash(block, block_size, &lo, &hi)
            slot = sent + i * HASH_SIZE
            pos += 1
            if fcodec_load_le64(slot) == lo and fcodec_load_le64(slot + 8) == hi:
                unchanged += 1
                continue
            entries += 1
            if is_zero:
                fcodec_store_le64(slot, lo)
                fcodec_store_le64(slot + 8, hi)
                fcodec_store_le64(words + nwords * WORD_SIZE, (KIND_ZERO << KIND_SHIFT) | i)
                nwords += 1
                zero += 1
                continue
            # Look up before recording h for i, so a stale slot of i's own cannot shadow
            # another block that really holds h.
            j = index.find(lo, hi, sent) if dedup else -1
            fcodec_store_le64(slot, lo)
            fcodec_store_le64(slot + 8, hi)
            if j >= 0 and <uint64_t>j != i:
                fcodec_store_le64(words + nwords * WORD_SIZE, (KIND_COPY << KIND_SHIFT) | i)
                fcodec_store_le64(words + (nwords + 1) * WORD_SIZE, <uint64_t>j)
                nwords += 2
                copy += 1
            else:
                fcodec_store_le64(words + nwords * WORD_SIZE, (KIND_DATA << KIND_SHIFT) | i)
                nwords += 1
                data_len += block_size
                ndata += 1
            if dedup:
                index.put(lo, hi, i, sent)
    if bad and pos == start:
        raise ValueError(f"block {i} outside the source (blocks {base}.."
                         f"{base + src_blocks - 1}, or its offset) or the {nblocks} sent "
                         f"hashes")
    cdef size_t entries_len = nwords * WORD_SIZE
    memmove(out + room - entries_len, words, entries_len)
    return (buf, room - entries_len - HEADER_SIZE, room, room + data_len, pos,
            entries, zero, copy, ndata, unchanged)


cdef int _walk(const unsigned char *w, size_t nwords, size_t count, uint64_t nblocks,
               size_t *counts, uint64_t *detail) noexcept nogil:
    """Check count entries in nwords words; counts[kind] += 1 per entry, counts[0] per stored
    one; 0 or an ENTRY_ code."""
    cdef size_t pos = 0, entry
    cdef uint64_t word, kind, i, j
    for entry in range(count):
        detail[0] = entry
        if pos >= nwords:
            return ENTRY_BEYOND
        word = fcodec_load_le64(w + pos * WORD_SIZE)
        pos += 1
        kind = word >> KIND_SHIFT
        i = word & INDEX_MASK
        detail[1] = kind
        detail[2] = i
        if kind != KIND_ZERO and kind != KIND_COPY and kind != KIND_DATA:
            return ENTRY_BAD_KIND
        if word & STORED_BIT:
            if kind != KIND_DATA:
                return ENTRY_BAD_STORED
            counts[0] += 1   # no kind is 0: that slot counts the stored entries
        if i >= nblocks:
            return ENTRY_BAD_INDEX
        counts[kind] += 1
        if kind == KIND_COPY:
            if pos >= nwords:
                return ENTRY_NO_SOURCE
            j = fcodec_load_le64(w + pos * WORD_SIZE)
            pos += 1
            detail[3] = j
            if j >= nblocks or j == i:
                return ENTRY_BAD_SOURCE
    detail[0] = nwords - pos
    return ENTRY_WORDS_LEFT if pos != nwords else ENTRIES_OK


cdef tuple _check(const unsigned char[::1] entries, size_t count, uint64_t nblocks):
    if entries.shape[0] % WORD_SIZE:
        raise BatchError(f"entry section of {entries.shape[0]} bytes is not whole words")
    cdef size_t counts[4]
    cdef uint64_t detail[4]
    cdef int outcome
    cdef const unsigned char *w = &entries[0] if entries.shape[0] else NULL
    cdef size_t nwords = entries.shape[0] // WORD_SIZE
    memset(counts, 0, sizeof(counts))
    memset(detail, 0, sizeof(detail))
    with nogil:
        outcome = _walk(w, nwords, count, nblocks, counts, detail)
    entry, kind, i, j = detail[0], detail[1], detail[2], detail[3]
    if outcome == ENTRY_BEYOND:
        raise BatchError(f"entry {entry} lies beyond the entry section")
    if outcome == ENTRY_BAD_KIND:
        raise BatchError(f"entry {entry} has no valid kind ({kind})")
    if outcome == ENTRY_BAD_INDEX:
        raise BatchError(f"entry {entry} names block {i} of {nblocks}")
    if outcome == ENTRY_NO_SOURCE:
        raise BatchError(f"COPY entry {entry} lost its source word")
    if outcome == ENTRY_BAD_SOURCE:
        raise BatchError(f"COPY entry {entry} copies block {i} from block {j} of {nblocks}")
    if outcome == ENTRY_BAD_STORED:
        raise BatchError(f"entry {entry} of kind {kind} is marked stored")
    if outcome == ENTRY_WORDS_LEFT:
        raise BatchError(f"{entry} words left after {count} entries")
    return counts[KIND_ZERO], counts[KIND_COPY], counts[KIND_DATA], counts[0]


def check_entries(const unsigned char[::1] entries not None, size_t count, uint64_t nblocks):
    """(zero, copy, data, stored) counts of count entries that must fill entries exactly;
    else BatchError. Only DATA entries may be stored."""
    return _check(entries, count, nblocks)


cdef struct Sampling:
    size_t samples
    size_t stride
    int64_t limit


cdef Sampling _sampling(size_t block_size):
    """Which bytes of a block the entropy judge reads, and its verdict's bound."""
    cdef int shift = _fmt.block_shift(block_size)
    cdef Sampling s
    cdef int64_t sample_shift = min(shift, <int>MAX_SAMPLES_SHIFT)
    s.samples = min(block_size, <size_t>MAX_SAMPLES)
    s.stride = block_size // s.samples
    s.limit = (<int64_t>s.samples * _fmt.ENTROPY_ONE
               * (2 * sample_shift - _fmt.STORED_HALF_BITS)) // 2
    return s


cdef bint _incompressible(const unsigned char *p, Sampling s) noexcept nogil:
    """The sampled byte entropy is at least STORED_HALF_BITS / 2 bits per byte."""
    cdef uint32_t counts[256]
    cdef size_t k
    cdef int64_t total = 0
    memset(counts, 0, sizeof(counts))
    for k in range(s.samples):
        counts[p[k * s.stride]] += 1
    for k in range(256):
        total += ENTROPY_TABLE[counts[k]]
    return total <= s.limit


def incompressible(const unsigned char[::1] block not None):
    """Whether a block (a power of two of bytes) looks random: its sampled byte entropy is
    at least STORED_HALF_BITS / 2 bits per byte."""
    cdef Sampling s = _sampling(block.shape[0])
    cdef bint verdict
    with nogil:
        verdict = _incompressible(&block[0], s)
    return verdict


cdef inline bint _next_data(const unsigned char *w, size_t nwords, size_t *pos,
                            size_t *left, uint64_t *word) noexcept nogil:
    """Step to the next DATA entry's word among `left` checked entries from word `pos`;
    False when none is left (or the words end)."""
    cdef uint64_t kind
    while left[0] and pos[0] < nwords:
        left[0] -= 1
        word[0] = fcodec_load_le64(w + pos[0] * WORD_SIZE)
        kind = word[0] >> KIND_SHIFT
        pos[0] += 2 if kind == KIND_COPY else 1
        if kind == KIND_DATA:
            return True
    return False


cdef void _count_data(const unsigned char *w, size_t nwords, size_t count, size_t *ndata,
                      size_t *nstored) noexcept nogil:
    """DATA entries, and the stored ones among them, of count checked entries."""
    cdef size_t pos = 0, left = count
    cdef uint64_t word
    ndata[0] = nstored[0] = 0
    while _next_data(w, nwords, &pos, &left, &word):
        ndata[0] += 1
        nstored[0] += (word & STORED_BIT) != 0


def split_stored(const unsigned char[::1] entries not None, size_t count,
                 const unsigned char[::1] data not None, size_t block_size):
    """Sender: (words, blocks, stored) for a batch's entries and DATA (checked, unstored).

    words are the entries with STORED_BIT set on every DATA entry whose block looks
    incompressible; blocks holds the other DATA blocks in order, then the stored ones in
    order; stored counts the latter.
    """
    cdef Sampling s = _sampling(block_size)
    cdef size_t nwords = entries.shape[0] // WORD_SIZE
    words = PyByteArray_FromStringAndSize(<const char *>&entries[0] if nwords else NULL,
                                          nwords * WORD_SIZE)
    cdef unsigned char *w = <unsigned char *>PyByteArray_AS_STRING(words)
    cdef size_t ndata, nstored
    _count_data(w, nwords, count, &ndata, &nstored)
    if ndata * block_size != <size_t>data.shape[0]:
        raise ValueError(f"{ndata} DATA entries need {ndata * block_size} bytes, "
                         f"not {data.shape[0]}")
    blocks = PyByteArray_FromStringAndSize(NULL, data.shape[0])
    cdef unsigned char *out = <unsigned char *>PyByteArray_AS_STRING(blocks)
    cdef const unsigned char *src = &data[0] if data.shape[0] else NULL
    cdef size_t pos = 0, left = count, taken = 0, packed_at = 0, stored_at
    cdef uint64_t word
    with nogil:
        nstored = 0
        while _next_data(w, nwords, &pos, &left, &word):   # judge: mark the stored words
            if _incompressible(src + taken, s):
                fcodec_store_le64(w + (pos - 1) * WORD_SIZE, word | STORED_BIT)
                nstored += 1
            taken += block_size
        stored_at = (ndata - nstored) * block_size
        pos, left, taken = 0, count, 0
        while _next_data(w, nwords, &pos, &left, &word):   # packed blocks first, then stored
            if word & STORED_BIT:
                memcpy(out + stored_at, src + taken, block_size)
                stored_at += block_size
            else:
                memcpy(out + packed_at, src + taken, block_size)
                packed_at += block_size
            taken += block_size
    return words, blocks, nstored


def merge_stored(const unsigned char[::1] entries not None, size_t count,
                 const unsigned char[::1] packed not None,
                 const unsigned char[::1] stored not None, size_t block_size):
    """Receiver: the DATA blocks in entry order, from the frame's blocks (packed) and the
    stored ones, as the entries' STORED bits say (entries checked before)."""
    _fmt.block_shift(block_size)
    cdef size_t nwords = entries.shape[0] // WORD_SIZE
    cdef const unsigned char *w = &entries[0] if nwords else NULL
    cdef size_t ndata, nstored
    _count_data(w, nwords, count, &ndata, &nstored)
    if (<size_t>packed.shape[0] != (ndata - nstored) * block_size
            or <size_t>stored.shape[0] != nstored * block_size):
        raise BatchError(f"{ndata} DATA entries, {nstored} of them stored, do not match "
                         f"{packed.shape[0]} + {stored.shape[0]} bytes")
    out = PyByteArray_FromStringAndSize(NULL, ndata * block_size)
    cdef unsigned char *dst = <unsigned char *>PyByteArray_AS_STRING(out)
    cdef const unsigned char *sources[2]
    sources[0] = &packed[0] if packed.shape[0] else NULL
    sources[1] = &stored[0] if stored.shape[0] else NULL
    cdef size_t taken[2]
    cdef size_t pos = 0, left = count
    cdef uint64_t word
    cdef int side
    taken[0] = taken[1] = 0
    with nogil:
        while _next_data(w, nwords, &pos, &left, &word):
            side = 1 if word & STORED_BIT else 0
            memcpy(dst, sources[side] + taken[side], block_size)
            dst += block_size
            taken[side] += block_size
    return out


cdef int _pwrite_all(int fd, const unsigned char *p, size_t n, uint64_t offset) noexcept nogil:
    """0, or the errno of a failed write."""
    cdef ssize_t written
    while n:
        written = pwrite(fd, p, n, <off_t>offset)
        if written < 0:
            if errno == EINTR:
                continue
            return errno
        p += written
        n -= written
        offset += written
    return 0


cdef int _fallocate(int fd, int mode, uint64_t offset, size_t n) noexcept nogil:
    """0, or the errno of a failed fallocate."""
    while fallocate(fd, mode, <off_t>offset, <off_t>n) != 0:
        if errno != EINTR:
            return errno
    return 0


cdef int _flush_run(int fd, bint pwrite_data, uint64_t kind, unsigned char *out,
                    const unsigned char *payload, uint64_t first, uint64_t end,
                    size_t at, size_t block_size) noexcept nogil:
    """Apply a run of consecutive blocks of one kind to the file: 0, or an errno."""
    cdef size_t n = (end - first) * block_size
    cdef uint64_t offset = first * block_size
    cdef int failed
    if end <= first:
        return 0
    if kind == KIND_ZERO:
        return _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, n)
    if pwrite_data:
        return _pwrite_all(fd, payload + at, n, offset)
    # Through the mapping: space first, so a full tmpfs is an errno here, not a SIGBUS.
    failed = _fallocate(fd, 0, offset, n)
    if not failed:
        memcpy(out + offset, payload + at, n)
    return failed


def apply_entries(const unsigned char[::1] entries not None, size_t count,
                  const unsigned char[::1] data not None, unsigned char[::1] dst not None,
                  size_t block_size, int fd=-1, bint pwrite_data=True):
    """Check the entries against dst and data (BatchError, nothing written), then apply in order.

    With fd (the file dst maps, shared), runs of consecutive blocks go to the file a run
    at a time: ZERO runs become holes (never faulted in, no memory held), DATA runs are
    written with pwrite (a fresh 4 KiB tmpfs page filled by write() is neither faulted in
    nor zeroed first) or, with pwrite_data false (huge-page tmpfs, where a partial write
    zeroes the rest of its 2 MiB page every time), allocated and copied through dst.
    """
    _fmt.block_shift(block_size)
    _, _, ndata, _ = _check(entries, count, dst.shape[0] // block_size)
    if ndata * block_size != <size_t>data.shape[0]:
        raise BatchError(f"{ndata} DATA entries need {ndata * block_size} bytes, "
                         f"not {data.shape[0]}")
    if count == 0:
        return
    cdef const unsigned char *w = &entries[0]
    cdef const unsigned char *payload = &data[0] if data.shape[0] else NULL
    cdef unsigned char *out = &dst[0]
    cdef size_t pos = 0, taken = 0, entry
    cdef uint64_t word, kind, i, j
    cdef unsigned char *block
    cdef uint64_t run_kind = KIND_DATA, run_first = 0, run_end = 0
    cdef size_t run_at = 0
    cdef int failed = 0
    with nogil:
        for entry in range(count):
            word = fcodec_load_le64(w + pos * WORD_SIZE)
            pos += 1
            kind = word >> KIND_SHIFT
            i = word & INDEX_MASK
            block = out + i * block_size
            if fd >= 0 and kind != KIND_COPY:
                if run_end > run_first and kind == run_kind and i == run_end:
                    run_end += 1
                else:
                    failed = _flush_run(fd, pwrite_data, run_kind, out, payload, run_first,
                                        run_end, run_at, block_size)
                    if failed:
                        break
                    run_kind, run_first, run_end, run_at = kind, i, i + 1, taken
                if kind == KIND_DATA:
                    taken += block_size
                continue
            # A COPY may read what the pending run writes: entries apply in order.
            failed = _flush_run(fd, pwrite_data, run_kind, out, payload, run_first, run_end,
                                run_at, block_size)
            run_first = run_end = 0
            if failed:
                break
            if kind == KIND_ZERO:
                if not fcodec_is_zero(block, block_size):  # untouched private memory stays so
                    memset(block, 0, block_size)
            elif kind == KIND_COPY:
                j = fcodec_load_le64(w + pos * WORD_SIZE)
                pos += 1
                memcpy(block, out + j * block_size, block_size)  # j != i: checked above
            else:
                memcpy(block, payload + taken, block_size)
                taken += block_size
        if not failed:
            failed = _flush_run(fd, pwrite_data, run_kind, out, payload, run_first, run_end,
                                run_at, block_size)
    if failed:
        raise OSError(failed, f"writing pages into the RAM file: {strerror(failed).decode()}")

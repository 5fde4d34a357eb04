# cython: language_level=3
"""Native record loop of QEMU's migration-stream codec (twin: agent/qemu/_stream_py.py).

One call walks the RAM page records of a SECTION_PART or SECTION_END body with the GIL
released: records of the main RAM block become (page index, offset of its 4 KiB in buf)
pairs for the page-batch encoder, records of every other block are copied unchanged into
a forward buffer for the destination QEMU. It stops, without consuming it, at the first
record it cannot take whole (too short, the outputs full, EOS, anything malformed); the
status says which, and agent/qemu/stream.py handles the rest of the stream.
"""

from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy

from agent.qemu import stream_format as _fmt

cdef uint64_t FLAG_ZERO = _fmt.RAM_SAVE_FLAG_ZERO
cdef uint64_t FLAG_PAGE = _fmt.RAM_SAVE_FLAG_PAGE
cdef uint64_t FLAG_EOS = _fmt.RAM_SAVE_FLAG_EOS
cdef uint64_t FLAG_CONTINUE = _fmt.RAM_SAVE_FLAG_CONTINUE
cdef uint64_t FLAGS_MASK = _fmt.RECORD_FLAGS_MASK
cdef uint64_t PAGE_SHIFT = _fmt.PAGE_SHIFT
cdef size_t PAGE_BYTES = _fmt.PAGE_SIZE
cdef uint64_t ZERO_MARK = _fmt.ZERO_PAGE_OFFSET

# Status codes (agent.qemu.stream_format.Scan)
cdef int S_NEED_DATA = _fmt.Scan.NEED_DATA
cdef int S_EOS = _fmt.Scan.EOS
cdef int S_FULL = _fmt.Scan.FULL
cdef int S_BAD_FLAGS = _fmt.Scan.BAD_FLAGS
cdef int S_UNKNOWN_BLOCK = _fmt.Scan.UNKNOWN_BLOCK
cdef int S_NO_BLOCK = _fmt.Scan.NO_BLOCK
cdef int S_BEYOND = _fmt.Scan.BEYOND
cdef int S_BAD_FILL = _fmt.Scan.BAD_FILL


cdef inline uint64_t load_be64(const unsigned char *p) noexcept nogil:
    return ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40)
            | (<uint64_t>p[3] << 32) | (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16)
            | (<uint64_t>p[6] << 8) | <uint64_t>p[7])


cdef Py_ssize_t find_block(const unsigned char *names, size_t names_len,
                           const unsigned char *name, size_t name_len) noexcept nogil:
    """Index of the block called name in the table (u8 length + name, back to back), or -1."""
    cdef size_t at = 0, n
    cdef Py_ssize_t index = 0
    while at < names_len:
        n = names[at]
        if n == name_len and at + 1 + n <= names_len and memcmp(names + at + 1, name, n) == 0:
            return index
        at += 1 + n
        index += 1
    return -1


def scan_records(const unsigned char[::1] buf not None, size_t pos, size_t end,
                 const unsigned char[::1] names not None, const uint64_t[::1] npages not None,
                 Py_ssize_t main, Py_ssize_t current,
                 uint64_t[::1] page_index not None, uint64_t[::1] page_offset not None,
                 size_t taken, unsigned char[::1] fwd not None, size_t fwd_len):
    """Walk page records in buf[pos:end].

    Main-block records go to page_index/page_offset from position `taken` on (offset
    ZERO_PAGE_OFFSET for a ZERO record), other blocks' records to fwd from fwd_len on.
    Returns (pos, taken, fwd_len, current, status, detail): current is the block a
    CONTINUE record refers to (-1: none yet), detail the record header or offset that
    stopped a malformed record.
    """
    if end > <size_t>buf.shape[0] or pos > end:
        raise ValueError(f"range {pos}..{end} outside a buffer of {buf.shape[0]} bytes")
    if npages.shape[0] == 0 or not 0 <= main < npages.shape[0]:
        raise ValueError(f"main block {main} outside a table of {npages.shape[0]} blocks")
    cdef size_t capacity = min(page_index.shape[0], page_offset.shape[0])
    cdef size_t fwd_cap = fwd.shape[0]
    cdef const unsigned char *b = &buf[0] if buf.shape[0] else NULL
    cdef const unsigned char *table = &names[0]
    cdef size_t table_len = names.shape[0]
    cdef Py_ssize_t nblocks = npages.shape[0]
    cdef uint64_t word = 0, flags, kind, page
    cdef size_t head, size, name_len
    cdef Py_ssize_t block
    cdef int status = S_NEED_DATA
    cdef uint64_t detail = 0
    with nogil:
        while True:
            if end - pos < 8:
                status = S_NEED_DATA
                break
            word = load_be64(b + pos)
            flags = word & FLAGS_MASK
            if flags & FLAG_EOS:
                status = S_EOS if flags == FLAG_EOS else S_BAD_FLAGS
                detail = word
                break
            kind = flags & ~FLAG_CONTINUE
            if kind != FLAG_ZERO and kind != FLAG_PAGE:
                status, detail = S_BAD_FLAGS, word
                break
            head = 8
            if flags & FLAG_CONTINUE:
                if current < 0:
                    status, detail = S_NO_BLOCK, word
                    break
                block = current
            else:
                if end - pos < 9:
                    status = S_NEED_DATA
                    break
                name_len = b[pos + 8]
                if end - pos < 9 + name_len:
                    status = S_NEED_DATA
                    break
                block = find_block(table, table_len, b + pos + 9, name_len)
                if block < 0 or block >= nblocks:
                    status, detail = S_UNKNOWN_BLOCK, pos
                    break
                head = 9 + name_len
            size = head + (1 if kind == FLAG_ZERO else PAGE_BYTES)
            if end - pos < size:
                status = S_NEED_DATA
                break
            page = (word & ~FLAGS_MASK) >> PAGE_SHIFT
            if page >= npages[block]:
                status, detail = S_BEYOND, word
                break
            if kind == FLAG_ZERO and b[pos + head] != 0:
                status, detail = S_BAD_FILL, b[pos + head]
                break
            if block == main:
                if taken >= capacity:
                    status = S_FULL
                    break
                page_index[taken] = page
                page_offset[taken] = ZERO_MARK if kind == FLAG_ZERO else pos + head
                taken += 1
            else:
                if fwd_len + size > fwd_cap:
                    status = S_FULL
                    break
                memcpy(&fwd[fwd_len], b + pos, size)
                fwd_len += size
            current = block
            pos += size
    return pos, taken, fwd_len, current, status, detail

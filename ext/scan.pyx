# cython: language_level=3
"""Native page scanner: XXH3-128 per 4 KiB page, zero pages, dirty pages; GIL released, threaded.

agent/memory/_scan_py.py is the specification: same functions, same results.
"""

import errno
import os
from array import array as _array

from cpython cimport array
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove

# ext/scan.pxd: Cython finds a .pxd for the module itself only under its full name
# (agent._native.scan), and our sources live in ext/, so the declarations are cimported.
from scan cimport (
    FERRY_HASH_SIZE, FERRY_PAGE_SIZE, FERRY_PAGEMAP_ENTRY_SIZE, FERRY_PAGEMAP_SOFT_DIRTY, Job,
    Segment, ferry_hash_differs, ferry_hash_page, ferry_load_le64, ferry_page_is_zero,
    pthread_create, pthread_join, pthread_t,
)

PAGE_SIZE = FERRY_PAGE_SIZE
HASH_SIZE = FERRY_HASH_SIZE
PAGEMAP_ENTRY_SIZE = FERRY_PAGEMAP_ENTRY_SIZE
PAGEMAP_SOFT_DIRTY = FERRY_PAGEMAP_SOFT_DIRTY

cdef unsigned char _zero_page[FERRY_PAGE_SIZE]
cdef unsigned char _zero_hash[FERRY_HASH_SIZE]
ferry_hash_page(_zero_page, _zero_hash)   # static storage: the page is all zero
ZERO_PAGE_HASH = bytes(_zero_hash[:FERRY_HASH_SIZE])

cdef array.array _INDEX_TEMPLATE = _array("Q")

cdef enum:
    _MAX_THREADS = 256


# ---- buffers ---------------------------------------------------------------------------

cdef class _Buffer:
    """A held Py_buffer of raw bytes, released when this object goes."""
    cdef Py_buffer view
    cdef bint held

    def __cinit__(self, object obj, bint writable=False):
        PyObject_GetBuffer(obj, &self.view, PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
        self.held = True

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.view)

    cdef inline unsigned char *ptr(self):
        return <unsigned char *>self.view.buf


cdef uint64_t _npages(_Buffer buf) except? 0:
    if buf.view.len % FERRY_PAGE_SIZE:
        raise ValueError(f"buffer of {buf.view.len} bytes is not a whole number of "
                         f"{FERRY_PAGE_SIZE}-byte pages")
    return buf.view.len // FERRY_PAGE_SIZE


cdef _check_hashes(_Buffer hashes, uint64_t npages, str what):
    if <uint64_t>hashes.view.len != npages * FERRY_HASH_SIZE:
        raise ValueError(f"{what} holds {hashes.view.len} bytes, expected "
                         f"{npages * FERRY_HASH_SIZE} ({FERRY_HASH_SIZE} per page for "
                         f"{npages} pages)")


cdef _check_threads(int threads):
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")


cdef array.array _index_array(object indices):
    if isinstance(indices, _array) and indices.typecode == "Q":
        return indices
    return _array("Q", indices)


def page_count(buf):
    """Number of pages in buf; ValueError unless its length is a multiple of PAGE_SIZE."""
    return _npages(_Buffer(buf))


# ---- the threaded scan -----------------------------------------------------------------

cdef void _run_job(Job *job) noexcept nogil:
    cdef size_t s
    cdef uint64_t page, lo, hi
    cdef unsigned char *h
    for s in range(job.nsegments):
        lo = max(job.segments[s].first, job.lo)
        hi = min(job.segments[s].end, job.hi)
        for page in range(lo, hi):
            h = job.current + page * FERRY_HASH_SIZE
            # Zero pages are common in guests and cheaper to recognise than to hash.
            if job.segments[s].data and not ferry_page_is_zero(job.pages + page * FERRY_PAGE_SIZE):
                ferry_hash_page(job.pages + page * FERRY_PAGE_SIZE, h)
            else:
                memcpy(h, _zero_hash, FERRY_HASH_SIZE)
            if job.sent != NULL and ferry_hash_differs(h, job.sent + page * FERRY_HASH_SIZE):
                job.dirty[job.ndirty] = page
                job.ndirty += 1


cdef void *_thread_main(void *arg) noexcept nogil:
    _run_job(<Job *>arg)
    return NULL


cdef void _run_jobs(Job *jobs, int njobs) noexcept nogil:
    """Job 0 on the calling thread, the others on new threads (inline if one cannot start)."""
    cdef pthread_t *tids = <pthread_t *>malloc(njobs * sizeof(pthread_t))
    cdef bint *started = <bint *>malloc(njobs * sizeof(bint))
    cdef int i
    if tids == NULL or started == NULL:
        free(tids)
        free(started)
        for i in range(njobs):
            _run_job(&jobs[i])
        return
    for i in range(1, njobs):
        started[i] = pthread_create(&tids[i], NULL, _thread_main, &jobs[i]) == 0
    _run_job(&jobs[0])
    for i in range(1, njobs):
        if started[i]:
            pthread_join(tids[i], NULL)
        else:
            _run_job(&jobs[i])
    free(tids)
    free(started)


cdef list _segments(object ranges, uint64_t npages):
    """[(first, end, data)] covering every page: the given data ranges and the holes between."""
    if ranges is None:
        return [(0, npages, True)]
    segments = []
    cdef uint64_t end = 0
    for first, count in ranges:
        if first < end or count < 0 or first + count > npages:
            raise ValueError(f"page range ({first}, {count}) overlaps, is unsorted, or lies "
                             f"outside {npages} pages")
        if first > end:
            segments.append((end, first, False))
        if count:
            segments.append((first, first + count, True))
        end = first + count
    if end < npages:
        segments.append((end, npages, False))
    return segments


cdef uint64_t _nth_data_page(list segments, uint64_t n):
    """Index of the n-th (from 0) page that lies in a data segment; n must exist."""
    for first, end, data in segments:
        if data:
            if n < end - first:
                return first + n
            n -= end - first
    return 0


cdef array.array _scan(object buf, object sent, object current, int threads, object ranges):
    """Hash buf's pages into current; with sent, return the indices where they differ."""
    cdef _Buffer pages = _Buffer(buf)
    cdef uint64_t npages = _npages(pages)
    _check_threads(threads)
    cdef _Buffer new = _Buffer(current, True)
    _check_hashes(new, npages, "current")
    cdef _Buffer old = None
    if sent is not None:
        old = _Buffer(sent)
        _check_hashes(old, npages, "sent")
    segment_list = _segments(ranges, npages)
    cdef array.array dirty = array.clone(_INDEX_TEMPLATE, npages if sent is not None else 0,
                                         False)
    if npages == 0:
        return dirty

    cdef uint64_t ndata = 0, total = 0
    for first, end, data in segment_list:
        if data:
            ndata += end - first
    # A thread per data page at most (filling in the hashes of holes is next to free), and
    # never more than _MAX_THREADS: the result is the same with any number of threads.
    cdef int njobs = <int>min(<uint64_t>min(threads, _MAX_THREADS), max(ndata, <uint64_t>1))
    cdef size_t nsegments = len(segment_list)
    cdef Segment *segments = <Segment *>malloc(nsegments * sizeof(Segment))
    cdef Job *jobs = <Job *>malloc(njobs * sizeof(Job))
    cdef size_t s
    cdef int t
    try:
        if segments == NULL or jobs == NULL:
            raise MemoryError()
        for s, (first, end, data) in enumerate(segment_list):
            segments[s].first = first
            segments[s].end = end
            segments[s].data = data
        for t in range(njobs):
            jobs[t].pages = pages.ptr()
            jobs[t].sent = old.ptr() if old is not None else NULL
            jobs[t].current = new.ptr()
            jobs[t].segments = segments
            jobs[t].nsegments = nsegments
            # Contiguous shares holding the same number of data pages each; a share also
            # takes the holes before its first data page. (t > 0 implies ndata >= njobs.)
            jobs[t].lo = _nth_data_page(segment_list, t * ndata // njobs) if t else 0
            if t:
                jobs[t - 1].hi = jobs[t].lo
            jobs[t].ndirty = 0
        jobs[njobs - 1].hi = npages
        for t in range(njobs):
            jobs[t].dirty = NULL
            if sent is not None:
                jobs[t].dirty = <uint64_t *>dirty.data.as_ulonglongs + jobs[t].lo
        with nogil:
            _run_jobs(jobs, njobs)
        if sent is not None:
            # Each job wrote at its own offset lo; close the gaps.
            for t in range(njobs):
                memmove(dirty.data.as_ulonglongs + total, jobs[t].dirty,
                        jobs[t].ndirty * sizeof(uint64_t))
                total += jobs[t].ndirty
            array.resize(dirty, total)
    finally:
        free(segments)
        free(jobs)
    return dirty


def hash_pages(buf, *, int threads=1):
    """XXH3-128 of every page of buf, HASH_SIZE bytes per page, in page order."""
    out = bytearray(page_count(buf) * FERRY_HASH_SIZE)
    _scan(buf, None, out, threads, None)
    return out


def hash_pages_into(buf, out, *, int threads=1):
    """XXH3-128 of every page of buf written into out (HASH_SIZE bytes per page)."""
    _scan(buf, None, out, threads, None)


def scan(buf, sent, current, *, int threads=1, ranges=None):
    """Hash every page of buf into current; return the ascending indices where current != sent.

    ranges, if given, lists the (first_page, count) runs that may hold data, sorted and
    disjoint; pages outside them are taken as zero pages without being read (a file hole).
    """
    return _scan(buf, sent, current, threads, ranges)


# ---- zero pages, bitmaps, runs ---------------------------------------------------------

def zero_pages(buf, indices=None):
    """Those of indices (default: every page, ascending) whose page is all zero bytes, in order."""
    cdef _Buffer pages = _Buffer(buf)
    cdef uint64_t npages = _npages(pages)
    cdef array.array wanted
    cdef uint64_t nwanted, i, page, bad = 0, nzero = 0
    cdef bint all_pages = indices is None
    if not all_pages:
        wanted = _index_array(indices)
    nwanted = npages if all_pages else len(wanted)
    cdef array.array zeros = array.clone(_INDEX_TEMPLATE, nwanted, False)
    cdef const unsigned char *base = pages.ptr()
    with nogil:
        for i in range(nwanted):
            page = i if all_pages else wanted.data.as_ulonglongs[i]
            if page >= npages:
                bad = page + 1      # report after the loop, with the GIL
                break
            if ferry_page_is_zero(base + page * FERRY_PAGE_SIZE):
                zeros.data.as_ulonglongs[nzero] = page
                nzero += 1
    if bad:
        raise ValueError(f"page {bad - 1} outside a buffer of {npages} pages")
    array.resize(zeros, nzero)
    return zeros


def indices_to_bitmap(indices, uint64_t npages):
    """A bitmap of npages bits (bit i is bit i % 8 of byte i // 8) with the given pages set."""
    cdef array.array pages = _index_array(indices)
    bitmap = bytearray((npages + 7) // 8)
    cdef unsigned char *bits = bitmap
    cdef uint64_t i, page, n = len(pages), bad = 0
    with nogil:
        for i in range(n):
            page = pages.data.as_ulonglongs[i]
            if page >= npages:
                bad = page + 1
                break
            bits[page >> 3] |= 1 << (page & 7)
    if bad:
        raise ValueError(f"page {bad - 1} outside a bitmap of {npages} pages")
    return bitmap


def bitmap_to_indices(bitmap, uint64_t npages):
    """Ascending indices of the set bits among the first npages bits of bitmap."""
    cdef _Buffer raw = _Buffer(bitmap)
    if <uint64_t>raw.view.len * 8 < npages:
        raise ValueError(f"bitmap of {raw.view.len} bytes is too short for {npages} pages")
    cdef const unsigned char *bits = raw.ptr()
    cdef array.array pages = array.clone(_INDEX_TEMPLATE, npages, False)
    cdef uint64_t byte, page, n = 0
    cdef int bit
    with nogil:
        for byte in range((npages + 7) // 8):
            if bits[byte] == 0:        # the common case in a sparse dirty set
                continue
            for bit in range(8):
                page = byte * 8 + bit
                if page < npages and bits[byte] >> bit & 1:
                    pages.data.as_ulonglongs[n] = page
                    n += 1
    array.resize(pages, n)
    return pages


def runs(indices):
    """Strictly ascending page indices as maximal runs of consecutive pages: (first, count)."""
    cdef array.array pages = _index_array(indices)
    cdef uint64_t i, n = len(pages), page, first = 0, count = 0
    cdef const uint64_t *p = <const uint64_t *>pages.data.as_ulonglongs
    result = []
    for i in range(n):
        page = p[i]
        if count and page == first + count:
            count += 1
            continue
        if count and page < first + count:
            raise ValueError(f"page indices must be strictly ascending; {page} came after "
                             f"{first + count - 1}")
        if count:
            result.append((first, count))
        first = page
        count = 1
    if count:
        result.append((first, count))
    return result


def run_indices(ranges):
    """Every page index of (first, count) runs, in order, as array("Q"): the inverse of
    runs(), filled without a Python object per page."""
    cdef list pairs = [(int(first), int(count)) for first, count in ranges]
    cdef uint64_t total = 0, first, count, i, n = 0
    for first, count in pairs:
        total += count
    cdef array.array out = array.clone(_INDEX_TEMPLATE, total, False)
    cdef uint64_t *dst = <uint64_t *>out.data.as_ulonglongs
    for first, count in pairs:
        with nogil:
            for i in range(count):
                dst[n + i] = first + i
        n += count
    return out


def shifted(indices, uint64_t delta):
    """A copy of page indices with delta added to each (indices of a slice made absolute)."""
    cdef array.array pages = _index_array(indices)
    cdef uint64_t i, n = len(pages)
    cdef array.array out = array.clone(_INDEX_TEMPLATE, n, False)
    cdef const uint64_t *src = <const uint64_t *>pages.data.as_ulonglongs
    cdef uint64_t *dst = <uint64_t *>out.data.as_ulonglongs
    with nogil:
        for i in range(n):
            dst[i] = src[i] + delta
    return out


# ---- holes and soft-dirty --------------------------------------------------------------

def data_extents(int fd, length):
    """Byte extents (offset, length) of fd within [0, length) that may hold data.

    Uses lseek SEEK_DATA/SEEK_HOLE (tmpfs answers per page); everything else reads as zero.
    A file system that cannot say returns the whole range.
    """
    extents = []
    offset = 0
    while offset < length:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after offset
                break
            if exc.errno == errno.EINVAL:  # SEEK_DATA unsupported: assume all data
                return [(0, length)] if length else []
            raise
        if start >= length:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
        extents.append((start, end - start))
        offset = end
    return extents


def extent_pages(extents, npages):
    """Page ranges (first, count) covering sorted, disjoint byte extents: rounded outward,
    merged where they touch, clipped to npages."""
    pages = []
    byte_end = 0
    for offset, length in extents:
        if offset < byte_end or length < 0:
            raise ValueError(f"extent ({offset}, {length}) overlaps or is out of order")
        byte_end = offset + length
        first = offset // FERRY_PAGE_SIZE
        end = min((byte_end + FERRY_PAGE_SIZE - 1) // FERRY_PAGE_SIZE, npages)
        if first >= end:
            continue
        # (wraparound is off in this module: no negative indices)
        if pages and first <= pages[len(pages) - 1][0] + pages[len(pages) - 1][1]:
            first = pages.pop()[0]
        pages.append((first, end - first))
    return pages


def soft_dirty_indices(pagemap):
    """Indices of the 8-byte little-endian pagemap entries whose soft-dirty bit (55) is set."""
    cdef _Buffer raw = _Buffer(pagemap)
    if raw.view.len % FERRY_PAGEMAP_ENTRY_SIZE:
        raise ValueError(f"pagemap data of {raw.view.len} bytes is not a whole number of "
                         f"{FERRY_PAGEMAP_ENTRY_SIZE}-byte entries")
    cdef uint64_t i, n = raw.view.len // FERRY_PAGEMAP_ENTRY_SIZE, ndirty = 0
    cdef const unsigned char *entries = raw.ptr()
    cdef array.array dirty = array.clone(_INDEX_TEMPLATE, n, False)
    with nogil:
        for i in range(n):
            if ferry_load_le64(entries + i * FERRY_PAGEMAP_ENTRY_SIZE) & FERRY_PAGEMAP_SOFT_DIRTY:
                dirty.data.as_ulonglongs[ndirty] = i
                ndirty += 1
    array.resize(dirty, ndirty)
    return dirty

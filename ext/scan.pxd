# C declarations for ext/scan.pyx: the per-page kernels (scan_kernel.h) and pthreads.

from libc.stdint cimport uint64_t


cdef extern from "scan_kernel.h" nogil:
    enum:
        FERRY_PAGE_SIZE
        FERRY_HASH_SIZE
        FERRY_PAGEMAP_ENTRY_SIZE
    uint64_t FERRY_PAGEMAP_SOFT_DIRTY
    uint64_t ferry_load_le64(const unsigned char *p)
    bint ferry_page_is_zero(const unsigned char *page)
    void ferry_hash_page(const unsigned char *page, unsigned char *out)
    bint ferry_hash_differs(const unsigned char *a, const unsigned char *b)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_attr_t:
        pass
    int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                       void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)


# A run of pages [first, end) that either may hold data (read them) or is a file hole
# (reads as zero, so its hash is known without touching it).
cdef struct Segment:
    uint64_t first
    uint64_t end
    bint data


# One thread's share of a scan: the contiguous pages [lo, hi).
cdef struct Job:
    const unsigned char *pages
    const unsigned char *sent      # NULL when only hashing
    unsigned char *current
    const Segment *segments
    size_t nsegments
    uint64_t lo
    uint64_t hi
    uint64_t *dirty                # this job's dirty indices go to dirty[0 .. hi - lo)
    uint64_t ndirty

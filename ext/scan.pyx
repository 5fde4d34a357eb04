# cython: language_level=3
"""Native index runs: ascending indices as (first, count) runs and runs back as indices.

agent/memory/_scan_py.py is the specification: same functions, same results.
"""

from array import array as _array

from cpython cimport array
from libc.stdint cimport uint64_t

cdef array.array _INDEX_TEMPLATE = _array("Q")


cdef array.array _index_array(object indices):
    if isinstance(indices, _array) and indices.typecode == "Q":
        return indices
    return _array("Q", indices)


def runs(indices):
    """Strictly ascending indices as maximal runs of consecutive ones: (first, count)."""
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
            raise ValueError(f"indices must be strictly ascending; {page} came after "
                             f"{first + count - 1}")
        if count:
            result.append((first, count))
        first = page
        count = 1
    if count:
        result.append((first, count))
    return result


def run_indices(ranges):
    """Every index of (first, count) runs, in order, as array("Q"): the inverse of runs(),
    filled without a Python object per index."""
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

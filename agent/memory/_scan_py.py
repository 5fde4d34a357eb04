"""Pure-Python twin of agent._native.scan: the specification of the index runs.

Every function here has the same signature and result as its Cython counterpart; the tests
compare the two on generated inputs.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable


def _index_array(indices: Iterable[int]) -> array[int]:
    if isinstance(indices, array) and indices.typecode == "Q":
        return indices
    return array("Q", indices)


def runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Strictly ascending indices as maximal runs of consecutive ones: (first, count)."""
    result: list[tuple[int, int]] = []
    first = count = 0
    for page in _index_array(indices):
        if count and page == first + count:
            count += 1
            continue
        if count and page < first + count:
            raise ValueError(f"indices must be strictly ascending; {page} came after "
                             f"{first + count - 1}")
        if count:
            result.append((first, count))
        first, count = page, 1
    if count:
        result.append((first, count))
    return result


def run_indices(ranges: Iterable[tuple[int, int]]) -> array[int]:
    """Every index of (first, count) runs, in order, as array("Q"): the inverse of runs()."""
    out = array("Q")
    for first, count in ranges:
        if first < 0 or count < 0:
            raise OverflowError(f"run ({first}, {count}) has a negative part")
        out.extend(range(first, first + count))
    return out

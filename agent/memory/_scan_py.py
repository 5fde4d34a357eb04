"""Pure-Python twin of agent._native.scan: the specification of the page scanner.

Every function here has the same signature and result as its Cython counterpart; the tests
compare the two on generated inputs. `threads` is validated but the twin always runs in one
(the native scanner splits the pages into contiguous shares, one per thread, and caps the
count; the result never depends on it).
"""

from __future__ import annotations

import errno
import os
from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

PAGE_SIZE = 4096
HASH_SIZE = 16
# Bit 55 of a /proc/PID/pagemap entry: written since the last `clear_refs 4`.
PAGEMAP_ENTRY_SIZE = 8
PAGEMAP_SOFT_DIRTY = 1 << 55


def _page_hash(page: ReadableBuffer) -> bytes:
    # low64 then high64, little-endian: the layout the native scanner writes.
    return xxhash.xxh3_128_intdigest(page).to_bytes(HASH_SIZE, "little")


ZERO_PAGE_HASH: bytes = _page_hash(bytes(PAGE_SIZE))
_ZERO_PAGE = bytes(PAGE_SIZE)


def page_count(buf: ReadableBuffer) -> int:
    """Number of pages in buf; ValueError unless its length is a multiple of PAGE_SIZE."""
    with memoryview(buf) as view:
        nbytes = view.nbytes
    if nbytes % PAGE_SIZE:
        raise ValueError(f"buffer of {nbytes} bytes is not a whole number of "
                         f"{PAGE_SIZE}-byte pages")
    return nbytes // PAGE_SIZE


def _check_threads(threads: int) -> None:
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")


def _check_hashes(hashes: ReadableBuffer, npages: int, what: str) -> None:
    with memoryview(hashes) as view:
        nbytes = view.nbytes
    if nbytes != npages * HASH_SIZE:
        raise ValueError(f"{what} holds {nbytes} bytes, expected {npages * HASH_SIZE} "
                         f"({HASH_SIZE} per page for {npages} pages)")


def _check_ranges(ranges: Iterable[tuple[int, int]], npages: int) -> list[tuple[int, int]]:
    """The ranges as a list, or ValueError unless sorted, disjoint and inside the buffer."""
    checked = []
    end = 0
    for first, count in ranges:
        if first < end or count < 0 or first + count > npages:
            raise ValueError(f"page range ({first}, {count}) overlaps, is unsorted, or lies "
                             f"outside {npages} pages")
        checked.append((first, count))
        end = first + count
    return checked


def _in_ranges(npages: int, ranges: Iterable[tuple[int, int]] | None) -> list[bool]:
    if ranges is None:
        return [True] * npages
    data = [False] * npages
    for first, count in _check_ranges(ranges, npages):
        data[first:first + count] = [True] * count
    return data


def hash_pages(buf: ReadableBuffer, *, threads: int = 1) -> bytearray:
    """XXH3-128 of every page of buf, HASH_SIZE bytes per page, in page order."""
    out = bytearray(page_count(buf) * HASH_SIZE)
    hash_pages_into(buf, out, threads=threads)
    return out


def hash_pages_into(buf: ReadableBuffer, out: WriteableBuffer, *, threads: int = 1) -> None:
    """XXH3-128 of every page of buf written into out (HASH_SIZE bytes per page)."""
    npages = page_count(buf)
    _check_threads(threads)
    _check_hashes(out, npages, "out")
    with memoryview(buf) as raw, raw.cast("B") as src, memoryview(out) as rawout, \
            rawout.cast("B") as dst:
        for page in range(npages):
            offset = page * PAGE_SIZE
            page_bytes = src[offset:offset + PAGE_SIZE]
            dst[page * HASH_SIZE:(page + 1) * HASH_SIZE] = _page_hash(page_bytes)


def scan(buf: ReadableBuffer, sent: ReadableBuffer, current: WriteableBuffer, *,
         threads: int = 1, ranges: Iterable[tuple[int, int]] | None = None) -> array[int]:
    """Hash every page of buf into current; return the ascending indices where current != sent.

    ranges, if given, lists the (first_page, count) runs that may hold data, sorted and
    disjoint; pages outside them are taken as zero pages without being read (a file hole).
    Zero pages get ZERO_PAGE_HASH (detected without hashing in the native scanner).
    """
    npages = page_count(buf)
    _check_threads(threads)
    _check_hashes(sent, npages, "sent")
    _check_hashes(current, npages, "current")
    data = _in_ranges(npages, ranges)
    dirty = array("Q")
    with memoryview(buf) as raw, raw.cast("B") as src, memoryview(sent) as rawsent, \
            rawsent.cast("B") as old, memoryview(current) as rawcur, rawcur.cast("B") as new:
        for page in range(npages):
            offset = page * PAGE_SIZE
            h = slice(page * HASH_SIZE, (page + 1) * HASH_SIZE)
            new[h] = _page_hash(src[offset:offset + PAGE_SIZE]) if data[page] else ZERO_PAGE_HASH
            if new[h] != old[h]:
                dirty.append(page)
    return dirty


def _index_array(indices: Iterable[int]) -> array[int]:
    if isinstance(indices, array) and indices.typecode == "Q":
        return indices
    return array("Q", indices)


def shifted(indices: Iterable[int], delta: int) -> array[int]:
    """A copy of page indices with delta added to each (indices of a slice made absolute)."""
    return array("Q", (page + delta for page in _index_array(indices)))


def zero_pages(buf: ReadableBuffer, indices: Iterable[int] | None = None) -> array[int]:
    """Those of indices (default: every page, ascending) whose page is all zero bytes, in order."""
    npages = page_count(buf)
    wanted = range(npages) if indices is None else _index_array(indices)
    zeros = array("Q")
    with memoryview(buf) as raw, raw.cast("B") as src:
        for page in wanted:
            if page >= npages:
                raise ValueError(f"page {page} outside a buffer of {npages} pages")
            if src[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] == _ZERO_PAGE:
                zeros.append(page)
    return zeros


def indices_to_bitmap(indices: Iterable[int], npages: int) -> bytearray:
    """A bitmap of npages bits (bit i is bit i % 8 of byte i // 8) with the given pages set."""
    bitmap = bytearray((npages + 7) // 8)
    for page in _index_array(indices):
        if page >= npages:
            raise ValueError(f"page {page} outside a bitmap of {npages} pages")
        bitmap[page >> 3] |= 1 << (page & 7)
    return bitmap


def bitmap_to_indices(bitmap: ReadableBuffer, npages: int) -> array[int]:
    """Ascending indices of the set bits among the first npages bits of bitmap."""
    with memoryview(bitmap) as raw, raw.cast("B") as bits:
        if bits.nbytes * 8 < npages:
            raise ValueError(f"bitmap of {bits.nbytes} bytes is too short for {npages} pages")
        return array("Q", (page for page in range(npages) if bits[page >> 3] >> (page & 7) & 1))


def runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Strictly ascending page indices as maximal runs of consecutive pages: (first, count)."""
    result: list[tuple[int, int]] = []
    first = count = 0
    for page in _index_array(indices):
        if count and page == first + count:
            count += 1
            continue
        if count and page < first + count:
            raise ValueError(f"page indices must be strictly ascending; {page} came after "
                             f"{first + count - 1}")
        if count:
            result.append((first, count))
        first, count = page, 1
    if count:
        result.append((first, count))
    return result


def run_indices(ranges: Iterable[tuple[int, int]]) -> array[int]:
    """Every page index of (first, count) runs, in order, as array("Q"): the inverse of
    runs()."""
    out = array("Q")
    for first, count in ranges:
        if first < 0 or count < 0:
            raise OverflowError(f"run ({first}, {count}) has a negative part")
        out.extend(range(first, first + count))
    return out


def data_extents(fd: int, length: int) -> list[tuple[int, int]]:
    """Byte extents (offset, length) of fd within [0, length) that may hold data.

    Uses lseek SEEK_DATA/SEEK_HOLE (tmpfs answers per page); everything else reads as zero.
    A file system that cannot say returns the whole range.
    """
    extents: list[tuple[int, int]] = []
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


def extent_pages(extents: Iterable[tuple[int, int]], npages: int) -> list[tuple[int, int]]:
    """Page ranges (first, count) covering sorted, disjoint byte extents: rounded outward,
    merged where they touch, clipped to npages."""
    pages: list[tuple[int, int]] = []
    byte_end = 0
    for offset, length in extents:
        if offset < byte_end or length < 0:
            raise ValueError(f"extent ({offset}, {length}) overlaps or is out of order")
        byte_end = offset + length
        first = offset // PAGE_SIZE
        end = min((byte_end + PAGE_SIZE - 1) // PAGE_SIZE, npages)
        if first >= end:
            continue
        if pages and first <= pages[-1][0] + pages[-1][1]:
            prev_first, _ = pages.pop()
            first = prev_first
        pages.append((first, end - first))
    return pages


def soft_dirty_indices(pagemap: ReadableBuffer) -> array[int]:
    """Indices of the 8-byte little-endian pagemap entries whose soft-dirty bit (55) is set."""
    with memoryview(pagemap) as raw, raw.cast("B") as entries:
        if entries.nbytes % PAGEMAP_ENTRY_SIZE:
            raise ValueError(f"pagemap data of {entries.nbytes} bytes is not a whole number of "
                             f"{PAGEMAP_ENTRY_SIZE}-byte entries")
        # Bit 55 is the top bit of byte 6 of each entry: look only at those bytes.
        flags = bytes(entries[6::PAGEMAP_ENTRY_SIZE])
    return array("Q", (index for index, byte in enumerate(flags) if byte & 0x80))

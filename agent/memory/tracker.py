"""Dirty-page trackers: which guest pages the destination may not yet hold.

Two kinds behind one interface (DESIGN §3): `HashScanTracker` hashes every page each round
and works on every kernel; `SoftDirtyTracker` reads the kernel's soft-dirty bits, which
needs CONFIG_MEM_SOFT_DIRTY and is detected at run time. `choose_tracker` picks one.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from array import array
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

from agent.errors import LocalError, VmNotMigratableError
from agent.memory import scan

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

log = logging.getLogger(__name__)

PAGE_SIZE = scan.PAGE_SIZE
HASH_SIZE = scan.HASH_SIZE
HASH_SIZE = scan.HASH_SIZE
PAGEMAP_ENTRY_SIZE = scan.PAGEMAP_ENTRY_SIZE
# Written to /proc/PID/clear_refs: clear the soft-dirty bits of every page of the process.
CLEAR_SOFT_DIRTY = b"4"


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


class DirtyTracker(ABC):
    """Tells, round by round, which pages of guest RAM the destination may not hold.

    The first `collect()` covers every page that may not be zero (the destination RAM file
    starts as zeros); each later one the pages that may have changed since. Indices are
    ascending, in an array('Q').
    """

    name: ClassVar[str]
    npages: int

    @abstractmethod
    def collect(self) -> array[int]:
        """Indices of the pages to send this round, ascending."""

    def close(self) -> None:
        """Release what the tracker holds (not the RAM mapping itself, which the caller owns)."""

    def __enter__(self) -> DirtyTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class ScanPart:
    """Pages [first, end) of RAM and, relative to first, the runs that may hold data."""

    first: int
    end: int
    ranges: list[tuple[int, int]]


class HashScanTracker(DirtyTracker):
    """Hashes every page each round and compares with the hash of what was sent for it.

    `sent_hashes` (HASH_SIZE bytes per page) holds, per page, the hash of what the
    destination holds; it starts as the hash of a zero page because the destination's RAM
    file starts as zeros, so the first `collect()` returns exactly the non-zero pages.
    `current_hashes` holds the hashes the last scan computed.

    The migration code copies each dirty page into a buffer, hashes that copy, sends it and
    writes *that* hash into `sent_hashes` (it is a writable buffer for this reason). A page
    the guest writes while it is being copied then differs from its sent hash and is caught
    by the next round, and the final round, with the guest stopped, is exact. `acknowledge`
    is the simpler form for tests and demos: it takes the scan's own hashes as sent.

    With `fd` (the RAM file), ranges the file has never written (holes, per SEEK_DATA) are
    not read: they are zero pages.
    """

    name = "hash-scan"

    def __init__(self, ram: ReadableBuffer, *, threads: int | None = None,
                 fd: int | None = None) -> None:
        self.npages = scan.page_count(ram)
        self.threads = threads if threads is not None else usable_cpus()
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.threads}")
        self._ram: ReadableBuffer | None = ram
        self._fd = fd
        self.sent_hashes = bytearray(scan.ZERO_PAGE_HASH * self.npages)
        self.current_hashes = bytearray(scan.ZERO_PAGE_HASH * self.npages)

    def collect(self) -> array[int]:
        """Rescan RAM; the pages whose hash differs from the hash of what was sent."""
        if self._ram is None:
            raise LocalError("hash-scan tracker used after close()")
        return scan.scan(self._ram, self.sent_hashes, self.current_hashes,
                         threads=self.threads, ranges=self._data_ranges())

    def parts(self, count: int) -> list[ScanPart]:
        """Up to `count` consecutive page ranges holding about equal shares of the data
        pages, for scanning RAM piece by piece (`collect_part`). The file's data extents
        are read once here, not per part."""
        ranges = self._data_ranges() or [(0, self.npages)]
        total = sum(n for _, n in ranges)
        share = max(1, -(-total // max(1, count)))
        bounds, seen, start = [], 0, 0
        for first, n in ranges:
            while seen + n >= share * (len(bounds) + 1) and len(bounds) < count - 1:
                cut = first + share * (len(bounds) + 1) - seen
                bounds.append((start, cut))
                start = cut
            seen += n
        bounds.append((start, self.npages))
        return [ScanPart(a, b, [(max(f, a) - a, min(f + n, b) - max(f, a))
                                for f, n in ranges if f < b and f + n > a])
                for a, b in bounds if b > a]

    def collect_part(self, part: ScanPart) -> array[int]:
        """collect() restricted to one part: its dirty pages, as absolute indices.

        Scanning in parts lets the final round send one part while hashing the next.
        """
        if self._ram is None:
            raise LocalError("hash-scan tracker used after close()")
        first, end = part.first, part.end
        with memoryview(self._ram) as ram, memoryview(self.sent_hashes) as sent, \
                memoryview(self.current_hashes) as current:
            dirty = scan.scan(ram[first * PAGE_SIZE:end * PAGE_SIZE],
                              sent[first * HASH_SIZE:end * HASH_SIZE],
                              current[first * HASH_SIZE:end * HASH_SIZE],
                              threads=self.threads, ranges=part.ranges)
        return scan.shifted(dirty, first)

    def _data_ranges(self) -> list[tuple[int, int]] | None:
        """(first page, count) runs of the RAM file that may hold data (None: all of it)."""
        if self._fd is None:
            return None
        extents = scan.data_extents(self._fd, self.npages * PAGE_SIZE)
        return scan.extent_pages(extents, self.npages)

    def acknowledge(self, indices: Iterable[int]) -> None:
        """Take the last scan's hashes of these pages (strictly ascending) as sent."""
        for first, count in scan.runs(indices):
            if first + count > self.npages:
                raise ValueError(f"pages {first}..{first + count - 1} outside {self.npages}")
            span = slice(first * HASH_SIZE, (first + count) * HASH_SIZE)
            self.sent_hashes[span] = self.current_hashes[span]

    def close(self) -> None:
        self._ram = None


class SoftDirtyTracker(DirtyTracker):
    """Reads soft-dirty bits from /proc/PID/pagemap over the RAM mapping, then clears them.

    The first `collect()` returns every page: nothing is known of what was written before.
    Each later one returns the pages written through the process's page tables since the
    previous call, 8 bytes read per page instead of 4096.

    Caveat: reading the bits and clearing them (writing 4 to clear_refs) are two steps, and
    a write landing between them to a page not already in the set is lost. Callers must keep
    the guest's vCPUs paused across `collect()` (the clear takes milliseconds), or use it only
    where the guest is stopped anyway. Writes through write(2) to the file, not the mapping,
    are not seen either.
    """

    name = "soft-dirty"

    def __init__(self, pid: int, ram_vaddr: int, npages: int) -> None:
        if ram_vaddr % PAGE_SIZE or npages < 0:
            raise ValueError(f"RAM mapping at {ram_vaddr:#x} of {npages} pages is not "
                             "page-aligned")
        self.pid = pid
        self.ram_vaddr = ram_vaddr
        self.npages = npages
        self._first = True
        try:
            self._pagemap: int | None = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LocalError(f"cannot read the page map of process {pid}: {exc}") from exc

    def collect(self) -> array[int]:
        """Pages written since the previous call (every page on the first), bits then cleared."""
        if self._pagemap is None:
            raise LocalError("soft-dirty tracker used after close()")
        if self._first:
            clear_soft_dirty(self.pid)
            self._first = False
            return array("Q", range(self.npages))
        entries = read_pagemap(self._pagemap, self.ram_vaddr, self.npages)
        clear_soft_dirty(self.pid)
        return scan.soft_dirty_indices(entries)

    def close(self) -> None:
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None


def read_pagemap(pagemap_fd: int, vaddr: int, npages: int) -> bytes:
    """The npages 8-byte pagemap entries starting at the page of vaddr."""
    want = npages * PAGEMAP_ENTRY_SIZE
    offset = vaddr // PAGE_SIZE * PAGEMAP_ENTRY_SIZE
    chunks = []
    while want:
        chunk = os.pread(pagemap_fd, want, offset)
        if not chunk:
            raise LocalError(f"page map ended at offset {offset:#x} with {want} bytes unread")
        chunks.append(chunk)
        want -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def clear_soft_dirty(pid: int) -> None:
    """Clear the soft-dirty bits of every page of process pid."""
    try:
        with open(f"/proc/{pid}/clear_refs", "wb", buffering=0) as clear_refs:
            clear_refs.write(CLEAR_SOFT_DIRTY)
    except OSError as exc:
        raise LocalError(f"cannot clear the soft-dirty bits of process {pid}: {exc}") from exc


def _kernel_tracks_soft_dirty() -> bool:
    """Write a page of our own after clearing soft-dirty bits: does the kernel mark it?"""
    pid = os.getpid()
    with mmap.mmap(-1, PAGE_SIZE) as page:
        page[0] = 1                      # fault it in, so the clear has a mapping to clean
        anchor = ctypes.c_char.from_buffer(page)
        vaddr = ctypes.addressof(anchor)
        del anchor                       # an exported buffer would keep the mmap open
        clear_soft_dirty(pid)
        page[0] = 2
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            entry = read_pagemap(fd, vaddr, 1)
        finally:
            os.close(fd)
    return len(scan.soft_dirty_indices(entry)) == 1


_kernel_support: bool | None = None


def available(pid: int) -> bool:
    """Whether soft-dirty tracking works here (the kernel marks pages) and on process pid."""
    global _kernel_support
    if _kernel_support is None:
        try:
            _kernel_support = _kernel_tracks_soft_dirty()
        except (OSError, LocalError) as exc:
            log.debug("soft-dirty self-test failed: %s", exc)
            _kernel_support = False
    if not _kernel_support:
        return False
    try:
        # Opening is where /proc checks our right to the process; nothing is written.
        with open(f"/proc/{pid}/pagemap", "rb"), open(f"/proc/{pid}/clear_refs", "wb"):
            return True
    except OSError as exc:
        log.debug("soft-dirty not usable on process %d: %s", pid, exc)
        return False


def find_ram_mapping(pid: int, path: str | os.PathLike[str]) -> tuple[int, int]:
    """(vaddr, length) where process pid maps the file at path from offset 0, shared.

    Adjacent mappings of the same file that continue each other (the kernel splits one
    mapping into several when parts of it change flags) are merged.
    """
    wanted = os.path.realpath(path)
    found: list[tuple[int, int, int, str]] = []   # (start, end, file offset, perms)
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as maps:
            for line in maps:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) < 6:
                    continue
                mapped = fields[5].removesuffix(" (deleted)")
                if mapped != wanted:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end, int(fields[2], 16), fields[1]))
    except OSError as exc:
        raise LocalError(f"cannot read the mappings of process {pid}: {exc}") from exc
    for i, (start, end, offset, perms) in enumerate(found):
        if offset != 0:
            continue
        if "s" not in perms:
            raise VmNotMigratableError(f"process {pid} maps {wanted} privately, so guest "
                                       "writes never reach the file; use share=on")
        for next_start, next_end, next_offset, _ in found[i + 1:]:
            if next_start != end or next_offset != end - start:
                break
            end = next_end
        return start, end - start
    raise VmNotMigratableError(f"process {pid} does not map {wanted}")


def choose_tracker(ram: ReadableBuffer, *, pid: int | None = None,
                   ram_path: str | os.PathLike[str] | None = None, fd: int | None = None,
                   threads: int | None = None) -> DirtyTracker:
    """Soft-dirty on process pid's mapping of ram_path when it works, else a hash scan of ram.

    The tracker's `name` says which was chosen; the reason is logged at INFO.
    """
    npages = scan.page_count(ram)
    if pid is None or ram_path is None:
        reason = "no QEMU process given"
    elif not available(pid):
        reason = "kernel does not track soft-dirty pages (CONFIG_MEM_SOFT_DIRTY) or no access"
    else:
        vaddr, length = find_ram_mapping(pid, ram_path)
        if length < npages * PAGE_SIZE:
            raise VmNotMigratableError(f"process {pid} maps only {length} bytes of {ram_path}, "
                                       f"expected {npages * PAGE_SIZE}")
        log.info("dirty tracking: soft-dirty on process %d at %#x", pid, vaddr)
        return SoftDirtyTracker(pid, vaddr, npages)
    log.info("dirty tracking: hash scan (%s backend); soft-dirty not used: %s",
             scan.BACKEND, reason)
    return HashScanTracker(ram, threads=threads, fd=fd)

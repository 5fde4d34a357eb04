"""Populate a fresh RAM file's pages ahead of the writes, in a thread of its own.

On tmpfs the first write to a page allocates it inside a page fault, which costs more than
the copy itself (measured here: 423 MiB took 228 ms by memcpy into a fresh mapping, but
145 ms of MADV_POPULATE_WRITE and then 44 ms of memcpy). The destination populates the
ranges the source says hold data while pages are still on their way, so the copies that
follow only hit mapped pages. ctypes releases the GIL around madvise (CPython's
mmap.madvise does not), so the event loop keeps running meanwhile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import threading
from collections.abc import Sequence

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23  # Linux 5.14+
CHUNK = 8 << 20           # populate in slices so a stop request is noticed quickly
MAX_EXTENTS = 4096        # what a PREPARE may carry
MERGE_GAP = 2 << 20       # extents closer than this are sent as one

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def coarse_extents(extents: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge extents closer than MERGE_GAP, then as needed, to at most MAX_EXTENTS."""
    merged: list[tuple[int, int]] = []
    gap = MERGE_GAP
    while True:
        merged = []
        for offset, length in extents:
            if merged and offset - (merged[-1][0] + merged[-1][1]) < gap:
                start = merged[-1][0]
                merged[-1] = (start, offset + length - start)
            else:
                merged.append((offset, length))
        if len(merged) <= MAX_EXTENTS:
            return merged
        gap *= 4


class Prefaulter:
    """Populates extents of a shared mapping in a background thread until done or stopped."""

    def __init__(self, ram: mmap.mmap, extents: Sequence[tuple[int, int]]) -> None:
        size = len(ram)
        self._extents = [(o, min(n, size - o)) for o, n in extents if 0 <= o < size and n > 0]
        holder = ctypes.c_char.from_buffer(ram)
        self._base = ctypes.addressof(holder)
        del holder  # keep no export: the mapping must stay closable
        self._stop = threading.Event()
        self.populated = 0
        self._thread = threading.Thread(target=self._run, name="prefault", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for offset, length in self._extents:
            end = offset + length
            while offset < end and not self._stop.is_set():
                n = min(CHUNK, end - offset)
                if _libc.madvise(self._base + offset, n, MADV_POPULATE_WRITE) != 0:
                    log.debug("MADV_POPULATE_WRITE unavailable (errno %d); pages fault in "
                              "as they are written", ctypes.get_errno())
                    return
                self.populated += n
                offset += n

    def wait(self) -> None:
        """Wait until every extent is populated (or populating turned out unsupported)."""
        self._thread.join()

    def stop(self) -> None:
        """Stop and wait (before the mapping is closed)."""
        self._stop.set()
        self._thread.join()

"""The page scanner in use: native (ext/scan.pyx) unless FERRY_PURE_PYTHON=1 asks for the twin.

BACKEND says which one ("native" or "python"). If the native module was not built, the twin
is used and a warning is logged, since a scan then runs some hundred times slower.
"""

from __future__ import annotations

from agent._native import select

BACKEND, _impl = select("scan", "agent.memory._scan_py")

HASH_SIZE = _impl.HASH_SIZE
PAGE_SIZE = _impl.PAGE_SIZE
PAGEMAP_ENTRY_SIZE = _impl.PAGEMAP_ENTRY_SIZE
PAGEMAP_SOFT_DIRTY = _impl.PAGEMAP_SOFT_DIRTY
ZERO_PAGE_HASH = _impl.ZERO_PAGE_HASH
bitmap_to_indices = _impl.bitmap_to_indices
data_extents = _impl.data_extents
extent_pages = _impl.extent_pages
hash_pages = _impl.hash_pages
hash_pages_into = _impl.hash_pages_into
indices_to_bitmap = _impl.indices_to_bitmap
page_count = _impl.page_count
run_indices = _impl.run_indices
runs = _impl.runs
scan = _impl.scan
shifted = _impl.shifted
soft_dirty_indices = _impl.soft_dirty_indices
zero_pages = _impl.zero_pages

__all__ = [
    "BACKEND",
    "HASH_SIZE",
    "PAGEMAP_ENTRY_SIZE",
    "PAGEMAP_SOFT_DIRTY",
    "PAGE_SIZE",
    "ZERO_PAGE_HASH",
    "bitmap_to_indices",
    "data_extents",
    "extent_pages",
    "hash_pages",
    "hash_pages_into",
    "indices_to_bitmap",
    "page_count",
    "run_indices",
    "runs",
    "scan",
    "shifted",
    "soft_dirty_indices",
    "zero_pages",
]

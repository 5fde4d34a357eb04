"""The page scanner in use: native (ext/scan.pyx) unless FERRY_PURE_PYTHON=1 asks for the twin.

BACKEND says which one ("native" or "python"). If the native module was not built, the twin
is used and a warning is logged, since a scan then runs some hundred times slower.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

PURE_PYTHON_ENV = "FERRY_PURE_PYTHON"

BACKEND: str
if os.environ.get(PURE_PYTHON_ENV) == "1":
    BACKEND = "python"
else:
    try:
        from agent._native import scan as _native  # noqa: F401  (only probing that it exists)

        BACKEND = "native"
    except ImportError as exc:
        log.warning("native page scanner not built (%s); using the pure-Python twin", exc)
        BACKEND = "python"

if BACKEND == "native":
    from agent._native.scan import (
        HASH_SIZE,
        PAGE_SIZE,
        PAGEMAP_ENTRY_SIZE,
        PAGEMAP_SOFT_DIRTY,
        ZERO_PAGE_HASH,
        bitmap_to_indices,
        data_extents,
        extent_pages,
        hash_pages,
        hash_pages_into,
        indices_to_bitmap,
        page_count,
        runs,
        scan,
        soft_dirty_indices,
        zero_pages,
    )
else:
    from agent.memory._scan_py import (
        HASH_SIZE,
        PAGE_SIZE,
        PAGEMAP_ENTRY_SIZE,
        PAGEMAP_SOFT_DIRTY,
        ZERO_PAGE_HASH,
        bitmap_to_indices,
        data_extents,
        extent_pages,
        hash_pages,
        hash_pages_into,
        indices_to_bitmap,
        page_count,
        runs,
        scan,
        soft_dirty_indices,
        zero_pages,
    )

__all__ = [
    "BACKEND",
    "HASH_SIZE",
    "PAGE_SIZE",
    "PAGEMAP_ENTRY_SIZE",
    "PAGEMAP_SOFT_DIRTY",
    "ZERO_PAGE_HASH",
    "bitmap_to_indices",
    "data_extents",
    "extent_pages",
    "hash_pages",
    "hash_pages_into",
    "indices_to_bitmap",
    "page_count",
    "runs",
    "scan",
    "soft_dirty_indices",
    "zero_pages",
]

"""Native index runs (ext/scan.pyx); agent/memory/_scan_py.py is its specification."""

from array import array
from collections.abc import Iterable

def runs(indices: Iterable[int]) -> list[tuple[int, int]]: ...
def run_indices(ranges: Iterable[tuple[int, int]]) -> array[int]: ...

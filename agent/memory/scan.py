"""Index runs in use: native (ext/scan.pyx) unless FERRY_PURE_PYTHON=1 asks for the twin.

BACKEND says which one ("native" or "python"). The disk source lists a chunk's block
indices with run_indices.
"""

from __future__ import annotations

from agent._native import select

BACKEND, _impl = select("scan", "agent.memory._scan_py")

run_indices = _impl.run_indices
runs = _impl.runs

__all__ = ["BACKEND", "run_indices", "runs"]

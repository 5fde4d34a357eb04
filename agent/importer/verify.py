"""Checking an imported disk: per-block hashes of an NBD export, compared with the source's.

The hashes are the batch codec's (XXH3-128 per 64 KiB block, the last block zero-padded),
so the source side's are the ones its encoder recorded while it read the blocks it sent:
verifying costs one read of the target's data, not a second transfer of the source.
Blocks that the export reports as reading zero are not read: their hash is known.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import numpy as np

from agent.batch import codec
from agent.batch.format import HASH_SIZE
from agent.buffers import BufferPool
from agent.storage.nbd import NbdClient
from agent.storage.nbd_proto import BASE_ALLOCATION, AllocationFlag

CHUNK_BLOCKS = 64
"""Blocks per verifying read (4 MiB of 64 KiB blocks)."""
READS_IN_FLIGHT = 4


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of comparing one disk's target with its source."""

    blocks_compared: int
    mismatched: tuple[int, ...]     # indices of the blocks that differ

    @property
    def mismatches(self) -> int:
        return len(self.mismatched)

    @property
    def verified(self) -> bool:
        return not self.mismatched

    def listed(self, most: int = 16) -> str:
        """The first mismatched blocks, for a message."""
        more = self.mismatches - most
        return (", ".join(str(b) for b in self.mismatched[:most])
                + (f" and {more} more" if more > 0 else ""))


def _hash_blocks(data: memoryview, block_size: int, out: memoryview) -> None:
    """Hash each block of `data` (a whole number of blocks) into `out` (worker thread)."""
    for i in range(len(data) // block_size):
        out[i * HASH_SIZE:(i + 1) * HASH_SIZE] = codec.block_hash(
            data[i * block_size:(i + 1) * block_size])


async def export_hashes(nbd: NbdClient, block_size: int) -> bytearray:
    """HASH_SIZE bytes per block of the export `nbd` (connected with BASE_ALLOCATION)."""
    size = nbd.size
    nblocks = -(-size // block_size)
    hashes = bytearray(codec.zero_block_hash(block_size) * nblocks)
    extents = await nbd.block_status(0, size, BASE_ALLOCATION)
    # Blocks that do not lie wholly inside a zero extent are read.
    need = np.ones(nblocks, dtype=bool)
    for extent in extents:
        if extent.flags & AllocationFlag.ZERO:
            first = -(-extent.offset // block_size)
            end = extent.end // block_size if extent.end < size else nblocks
            if end > first:
                need[first:end] = False
    chunks: list[tuple[int, int]] = []
    for start, stop in true_runs(need):
        for first in range(start, stop, CHUNK_BLOCKS):
            chunks.append((first, min(CHUNK_BLOCKS, stop - first)))
    loop = asyncio.get_running_loop()
    out = memoryview(hashes)
    # Each read: (first block, block count, a view of its buffer, the read). The view
    # keeps the buffer out of the pool until the chunk is hashed.
    pending: collections.deque[tuple[int, int, memoryview, asyncio.Future[None]]] = \
        collections.deque()
    upcoming = iter(chunks)
    # The read buffers are reused: fresh memory for every chunk costs a page fault per page.
    pool = BufferPool(READS_IN_FLIGHT + 1)

    def read_ahead() -> None:
        while len(pending) < READS_IN_FLIGHT and (chunk := next(upcoming, None)):
            first, count = chunk
            view = memoryview(pool.take(count * block_size))[:count * block_size]
            valid = min(count * block_size, size - first * block_size)
            # A last block shorter than block_size is hashed zero-padded, as the source's is.
            view[valid:] = bytes(count * block_size - valid)
            pending.append((first, count, view, asyncio.ensure_future(
                nbd.readinto(first * block_size, view[:valid]))))

    try:
        read_ahead()
        while pending:
            first, count, view, read = pending[0]
            await read
            pending.popleft()
            read_ahead()
            with view:
                await loop.run_in_executor(
                    None, _hash_blocks, view, block_size,
                    out[first * HASH_SIZE:(first + count) * HASH_SIZE])
    finally:
        for *_, read in pending:
            read.cancel()
        if pending:
            await asyncio.gather(*(read for *_, read in pending), return_exceptions=True)
    return hashes


def compare(expected: bytes | bytearray, actual: bytes | bytearray) -> Verdict:
    """Which blocks differ between two hash arrays of the same disk."""
    if len(expected) != len(actual):
        raise ValueError(f"hashes of {len(expected)} and {len(actual)} bytes")
    a = np.frombuffer(expected, dtype=np.uint8).reshape(-1, HASH_SIZE)
    b = np.frombuffer(actual, dtype=np.uint8).reshape(-1, HASH_SIZE)
    differ = np.flatnonzero((a != b).any(axis=1))
    return Verdict(blocks_compared=len(a), mismatched=tuple(int(i) for i in differ))


def true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) runs where `mask` is true."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(edges[i]), int(edges[i + 1])) for i in range(0, len(edges), 2)]

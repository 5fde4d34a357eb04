"""Byte layout of an encoded page batch: every size, mask and kind has a name here.

The layout is described in docs/wire-batch.md and in the docstring of agent.batch.codec; the
native codec reads its constants from this module at import so there is one source of truth.
"""

from __future__ import annotations

import enum
import math
import struct

MAGIC = b"FBAT"
VERSION = 2

# magic, version, block size log2, flags, entry count, COPY entry count,
# raw DATA length, DATA length on the wire (== raw unless compressed).
HEADER = struct.Struct("<4sBBHIIII")
HEADER_SIZE = HEADER.size

FLAG_COMPRESSED = 0x0001
"""The DATA section is one zstd frame holding the DATA blocks, then the STORED blocks raw."""
KNOWN_FLAGS = FLAG_COMPRESSED

# An entry is one little-endian u64 word: kind in the top 2 bits, the STORED bit, block index
# below; a COPY entry is followed by a second word holding the source block index.
WORD_SIZE = 8
KIND_SHIFT = 62
STORED_BIT = 1 << 61
"""On a DATA entry of a compressed batch: the block is not in the zstd frame but stored raw
after it (the sender judged it incompressible); invalid anywhere else."""
INDEX_MASK = STORED_BIT - 1
MAX_WORDS_PER_ENTRY = 2

ZERO_OFFSET = (1 << 64) - 1
"""In an encoder's per-entry offsets: the block is all zero and has no bytes in src."""

HASH_SIZE = 16
"""XXH3-128 per block: low 64 bits then high 64 bits, each little-endian."""

# 512 B sectors up to 16 MiB disk chunks; RAM uses 4 KiB pages.
MIN_BLOCK_SHIFT = 9
MAX_BLOCK_SHIFT = 24
PAGE_SHIFT = 12

# Bounds a receiver enforces before allocating or decompressing anything.
MAX_ENTRIES = 1 << 18
MAX_DATA_BYTES = 1 << 26

# What an encoder aims for by default: about 1 MiB of DATA per batch.
DEFAULT_MAX_ENTRIES = 1 << 14
DEFAULT_MAX_DATA_BYTES = 1 << 20
DEFAULT_COMPRESS_LEVEL = 1

# A sender stores a block raw, outside zstd, when the byte entropy of a sample of it is at
# least this many half bits per byte (7.5 bits): random or already compressed data, which zstd
# would only slow down and, sharing a block's Huffman table with text-like pages, inflate.
# A sample of ENTROPY_SAMPLES bytes (every n-th) of a 4 KiB page costs about a microsecond.
STORED_HALF_BITS = 15
ENTROPY_SAMPLES = 1024
# c * log2(c) in 1/65536 bits for every count a sample can hold: integers, so that both
# codecs judge every block alike.
ENTROPY_ONE = 65536
ENTROPY_TABLE = tuple(int(c * math.log2(c) * ENTROPY_ONE + 0.5) if c else 0
                      for c in range(ENTROPY_SAMPLES + 1))


class EntryKind(enum.IntEnum):
    """What the destination does for one block; 0 is not a kind, so zeroed words fail."""

    ZERO = 1
    """Zero the block."""
    COPY = 2
    """Copy the block from another block the destination already holds (next word)."""
    DATA = 3
    """Take the next block_size bytes of the DATA section."""


def block_shift(block_size: int) -> int:
    """log2 of block_size; ValueError unless it is a supported power of two."""
    shift = block_size.bit_length() - 1
    if (block_size <= 0 or block_size != 1 << shift
            or not MIN_BLOCK_SHIFT <= shift <= MAX_BLOCK_SHIFT):
        raise ValueError(f"block size {block_size} is not a power of two between "
                         f"{1 << MIN_BLOCK_SHIFT} and {1 << MAX_BLOCK_SHIFT}")
    return shift

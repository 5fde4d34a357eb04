"""The block hashes a warm import keeps between passes: one compact binary file per disk.

A pass hashes every 64 KiB block it reads (the batch codec's XXH3-128, the same hashes its
encoder compares), and the next pass writes only blocks whose hash differs: there is no CBT
on another hypervisor's disk to say what changed. The file says what the target holds.

Layout (little-endian): header STATE_HEADER (magic b"FWRM", version, log2 block size,
flags, passes done, virtual size, block count, XXH3-64 of the hashes, target path
length), the target
path (UTF-8), then HASH_SIZE bytes per block. Written to a temporary file, synced and
renamed over the old one, so a reader sees the old state or the new one, never a mix.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import xxhash

from agent.batch import codec
from agent.batch.format import HASH_SIZE
from agent.errors import LocalError, UserError

MAGIC = b"FWRM"
VERSION = 1
STATE_HEADER = struct.Struct("<4sHBBIQQQI")
FLAG_IN_PASS = 0x01
"""Set while a pass runs: if the file still says so, that pass died midway and the target
may hold blocks the hashes do not describe."""
UNKNOWN_HASH = b"\xff" * HASH_SIZE
"""A block whose content on the target is not known: it differs from every real block."""


@dataclass
class WarmState:
    """What the target of one warm import holds, block by block."""

    target: Path
    virtual_size: int
    block_size: int
    hashes: bytearray          # HASH_SIZE per block
    passes: int = 0            # passes completed

    @classmethod
    def fresh(cls, target: Path, virtual_size: int, block_size: int) -> WarmState:
        """A new target that reads as zero everywhere."""
        nblocks = -(-virtual_size // block_size)
        return cls(target, virtual_size, block_size,
                   bytearray(codec.zero_block_hash(block_size) * nblocks))

    @property
    def nblocks(self) -> int:
        return len(self.hashes) // HASH_SIZE

    def forget(self, first: int, count: int) -> None:
        """Blocks [first, first + count) may hold anything now (a failed pass wrote there)."""
        self.hashes[first * HASH_SIZE:(first + count) * HASH_SIZE] = UNKNOWN_HASH * count

    def save(self, path: Path, *, in_pass: bool = False) -> None:
        """Replace the file at `path` atomically with this state."""
        name = os.fsencode(self.target)
        header = STATE_HEADER.pack(MAGIC, VERSION, self.block_size.bit_length() - 1,
                                   FLAG_IN_PASS if in_pass else 0, self.passes,
                                   self.virtual_size,
                                   self.nblocks, xxhash.xxh3_64_intdigest(self.hashes),
                                   len(name))
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as out:
                out.write(header)
                out.write(name)
                out.write(self.hashes)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise LocalError(f"cannot write warm import state {path}: {exc}") from exc


def load(path: Path, target: Path, virtual_size: int, block_size: int) -> WarmState:
    """The state at `path` for this target and size; refuses a file that is damaged or
    belongs to another target or disk size. A state left by a pass that died midway
    comes back with every block unknown (the next pass rewrites all of them)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read warm import state {path}: {exc}") from exc
    if len(raw) < STATE_HEADER.size:
        raise UserError(f"warm import state {path} is truncated ({len(raw)} bytes)")
    (magic, version, shift, flags, passes, size, nblocks, digest,
     name_len) = STATE_HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION:
        raise UserError(f"{path} is not a warm import state of this ferry version")
    name = raw[STATE_HEADER.size:STATE_HEADER.size + name_len]
    hashes = bytearray(raw[STATE_HEADER.size + name_len:])
    if (len(hashes) != nblocks * HASH_SIZE or xxhash.xxh3_64_intdigest(hashes) != digest
            or nblocks != -(-size // (1 << shift))):
        raise UserError(f"warm import state {path} is damaged (its checksum or length does "
                        f"not match); remove it and the target {target} to start over")
    if os.fsdecode(name) != str(target):
        raise UserError(f"warm import state {path} belongs to target {os.fsdecode(name)}, "
                        f"not {target}")
    if size != virtual_size or 1 << shift != block_size:
        raise UserError(f"warm import state {path} is for a {size}-byte disk; the source "
                        f"is {virtual_size} bytes now (a resized disk needs a fresh import: "
                        f"remove the state and the target)")
    state = WarmState(target, size, block_size, hashes, passes=passes)
    if flags & FLAG_IN_PASS:
        state.forget(0, state.nblocks)
    return state

"""Native per-block loops of the page-batch codec (ext/codec.pyx); agent/batch/_codec_py.py is
its specification."""

from _typeshed import ReadableBuffer, WriteableBuffer

PROBE_LIMIT: int

def block_hash(block: ReadableBuffer) -> bytes: ...

class DedupIndex:
    nblocks: int
    capacity: int
    def __init__(self, nblocks: int) -> None: ...
    def lookup(self, h: bytes, sent_hashes: ReadableBuffer) -> int: ...
    def insert(self, h: bytes, index: int, sent_hashes: ReadableBuffer) -> None: ...

def encode_blocks(src: ReadableBuffer, base: int, block_size: int, indices: ReadableBuffer,
                  start: int, sent_hashes: WriteableBuffer, index: DedupIndex | None,
                  max_entries: int, data_capacity: int, into: bytearray | None = ...,
                  prefix: int = ..., offsets: ReadableBuffer | None = ...,
                  ) -> tuple[bytearray, int, int, int, int, int, int, int, int, int]: ...
def check_entries(entries: ReadableBuffer, count: int, nblocks: int) -> tuple[int, int, int]: ...
def apply_entries(entries: ReadableBuffer, count: int, data: ReadableBuffer,
                  dst: WriteableBuffer, block_size: int, fd: int = ...) -> None: ...

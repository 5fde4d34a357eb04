"""Native record loop of QEMU's migration-stream codec (ext/qstream.pyx);
agent/qemu/_stream_py.py is its specification."""

from _typeshed import ReadableBuffer, WriteableBuffer

def scan_records(buf: ReadableBuffer, pos: int, end: int, names: ReadableBuffer,
                 npages: ReadableBuffer, main: int, current: int,
                 page_index: WriteableBuffer, page_offset: WriteableBuffer, taken: int,
                 fwd: WriteableBuffer, fwd_len: int) -> tuple[int, int, int, int, int, int]: ...

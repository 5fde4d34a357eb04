"""Pure-Python twin of ext/qstream.pyx: the specification of the RAM record loop.

Same function, same arguments, same results; selected with FERRY_PURE_PYTHON=1 and
compared with the native one on generated streams by the tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.qemu.stream_format import (
    BE64,
    PAGE_SHIFT,
    PAGE_SIZE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    RECORD_FLAGS_MASK,
    ZERO_PAGE_OFFSET,
    Scan,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer


def _block_names(names: bytes) -> dict[bytes, int]:
    table: dict[bytes, int] = {}
    at = 0
    while at < len(names):
        n = names[at]
        table.setdefault(names[at + 1:at + 1 + n], len(table))
        at += 1 + n
    return table


def scan_records(buf: ReadableBuffer, pos: int, end: int, names: ReadableBuffer,
                 npages: ReadableBuffer, main: int, current: int,
                 page_index: WriteableBuffer, page_offset: WriteableBuffer, taken: int,
                 fwd: WriteableBuffer, fwd_len: int) -> tuple[int, int, int, int, int, int]:
    """Walk page records in buf[pos:end]; see ext/qstream.pyx."""
    data = memoryview(buf).cast("B")
    if end > data.nbytes or pos > end:
        raise ValueError(f"range {pos}..{end} outside a buffer of {data.nbytes} bytes")
    sizes = memoryview(npages).cast("B").cast("Q")
    if len(sizes) == 0 or not 0 <= main < len(sizes):
        raise ValueError(f"main block {main} outside a table of {len(sizes)} blocks")
    index_out = memoryview(page_index).cast("B").cast("Q")
    offset_out = memoryview(page_offset).cast("B").cast("Q")
    capacity = min(len(index_out), len(offset_out))
    out = memoryview(fwd).cast("B")
    blocks = _block_names(bytes(names))
    status, detail = Scan.NEED_DATA, 0
    while True:
        if end - pos < 8:
            status = Scan.NEED_DATA
            break
        (word,) = BE64.unpack_from(data, pos)
        flags = word & RECORD_FLAGS_MASK
        if flags & RAM_SAVE_FLAG_EOS:
            status = Scan.EOS if flags == RAM_SAVE_FLAG_EOS else Scan.BAD_FLAGS
            detail = word
            break
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        if kind not in (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE):
            status, detail = Scan.BAD_FLAGS, word
            break
        head = 8
        if flags & RAM_SAVE_FLAG_CONTINUE:
            if current < 0:
                status, detail = Scan.NO_BLOCK, word
                break
            block = current
        else:
            if end - pos < 9 or end - pos < 9 + data[pos + 8]:
                status = Scan.NEED_DATA
                break
            name_len = data[pos + 8]
            found = blocks.get(bytes(data[pos + 9:pos + 9 + name_len]))
            if found is None or found >= len(sizes):
                status, detail = Scan.UNKNOWN_BLOCK, pos
                break
            block = found
            head = 9 + name_len
        size = head + (1 if kind == RAM_SAVE_FLAG_ZERO else PAGE_SIZE)
        if end - pos < size:
            status = Scan.NEED_DATA
            break
        page = (word & ~RECORD_FLAGS_MASK) >> PAGE_SHIFT
        if page >= sizes[block]:
            status, detail = Scan.BEYOND, word
            break
        if kind == RAM_SAVE_FLAG_ZERO and data[pos + head] != 0:
            status, detail = Scan.BAD_FILL, data[pos + head]
            break
        if block == main:
            if taken >= capacity:
                status = Scan.FULL
                break
            index_out[taken] = page
            offset_out[taken] = ZERO_PAGE_OFFSET if kind == RAM_SAVE_FLAG_ZERO else pos + head
            taken += 1
        else:
            if fwd_len + size > out.nbytes:
                status = Scan.FULL
                break
            out[fwd_len:fwd_len + size] = data[pos:pos + size]
            fwd_len += size
        current = block
        pos += size
    return pos, taken, fwd_len, current, int(status), detail

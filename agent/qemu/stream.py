"""Sans-IO reader of a source QEMU's outgoing migration stream (QEMU 7.2, DESIGN §2b).

The source agent serves QEMU's `migrate` on a socket and feeds what arrives to a
StreamParser. Events come out in stream order:

- `Pages`: records of the guest's main RAM block, as page indices and the offsets of
  their 4 KiB in the parser's buffer (ZERO records: ZERO_PAGE_OFFSET); ferry ships them
  as page batches, and they are cut out of the stream.
- `Forward`: everything else, rewritten for a destination QEMU running x-ignore-shared
  over its own shared RAM file (capability announced, block addresses added), to be
  fed to that QEMU only after every page of the Pages events before it is written.
- `RamSetup` after the block list, `RamSection` after each iteration's last byte
  (`END`: RAM is complete; device state follows, forwarded as it is).

No I/O: recv into `space()` and `commit(n)`, or `feed(bytes)`, then call `next_event()`
until it returns None. Anything ferry cannot carry (an unknown section, record flag or
block, a length past a limit, a page outside its block, a stream cut short) raises
StreamError naming what was seen and where; nothing after it is produced.

The per-record loop is native (ext/qstream.pyx) unless FERRY_PURE_PYTHON=1 selects the
twin (agent/qemu/_stream_py.py); BACKEND says which.
"""

from __future__ import annotations

import array
import enum
from collections import deque
from dataclasses import dataclass

from agent._native import select
from agent.errors import QemuError
from agent.qemu.stream_format import (
    BE32,
    BE64,
    BLOCK_ADDRESS,
    HEADER,
    MAGIC,
    MAX_BLOCKS,
    MAX_CONFIG_NAME,
    PAGE_SIZE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SECTION,
    RAM_SECTION_VERSION,
    RECORD_FLAGS_MASK,
    VERSION,
    ZERO_PAGE_OFFSET,
    Scan,
    Section,
    capabilities_subsection,
)

BACKEND, _backend = select("qstream", "agent.qemu._stream_py")

__all__ = ["BACKEND", "ZERO_PAGE_OFFSET", "Forward", "Pages", "RamBlock", "RamSection",
           "RamSetup", "StreamError", "StreamParser"]

DEFAULT_BUFFER_SIZE = 4 << 20
DEFAULT_MAX_PAGES = 2048
# space() compacts the buffer when less than this is free; more than any one item needs
# (a record: 4 KiB and a name; the block list: MAX_BLOCKS names and lengths).
MIN_SPACE = 256 << 10
FORWARD_CAPACITY = 1 << 20
# A section header: type, id, then for START/FULL the name, instance and version.
SECTION_ID = 1 + BE32.size
FOOTER_SIZE = 1 + BE32.size


class StreamError(QemuError):
    """QEMU's migration stream holds something ferry cannot carry; nothing of it was sent."""


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One RAM block of the source, as SECTION_START lists it."""

    name: str
    size: int        # used_length in bytes


@dataclass(frozen=True, slots=True)
class RamSetup:
    """The RAM section began: the blocks of the source (the main one is cut out)."""

    blocks: tuple[RamBlock, ...]


@dataclass(frozen=True, slots=True)
class Pages:
    """Records of the main block: page i = indices[k] holds data[offsets[k]:+4 KiB], or is
    zero where offsets[k] is ZERO_PAGE_OFFSET. Views of the parser's own buffers: valid
    until the next call of next_event, feed or space."""

    indices: memoryview
    offsets: memoryview
    data: memoryview
    section: Section = Section.PART    # END: the last iteration, with the guest stopped

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True, slots=True)
class Forward:
    """Stream bytes for the destination QEMU, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class RamSection:
    """An iteration of RAM ended (its last byte is in the Forward before this event)."""

    kind: Section        # PART, or END: every RAM page has been sent
    number: int          # 1 for the first PART


Event = RamSetup | Pages | Forward | RamSection


class _State(enum.Enum):
    HEADER = "the stream header"
    CONFIGURATION = "the configuration section"
    TOP = "between sections"
    RECORDS = "RAM page records"
    TAIL = "device state"


class StreamParser:
    """One source QEMU's outgoing stream, main block `main_block` of `main_size` bytes."""

    def __init__(self, main_block: str, main_size: int, *,
                 max_pages: int = DEFAULT_MAX_PAGES,
                 buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        if main_size <= 0 or main_size % PAGE_SIZE:
            raise ValueError(f"main block size {main_size} is not a positive number of pages")
        if buffer_size < 2 * MIN_SPACE or max_pages < 1:
            raise ValueError("buffer or page list too small")
        self.main_block = main_block
        self.main_size = main_size
        self._buf = bytearray(buffer_size)
        self._start = 0          # first byte not yet consumed
        self._end = 0            # end of the bytes received
        self._base = 0           # stream offset of _buf[0]
        self._state = _State.HEADER
        self._events: deque[Event] = deque()
        self._fwd = bytearray(FORWARD_CAPACITY)
        self._fwd_len = 0
        self._indices = array.array("Q", bytes(8 * max_pages))
        self._offsets = array.array("Q", bytes(8 * max_pages))
        self._names = b""
        self._npages = array.array("Q")
        self._main = -1
        self._current = -1        # block a CONTINUE record refers to
        self._sid: int | None = None
        self._section = Section.PART
        self.sections = 0         # RAM sections after START (PART and END)
        self.blocks: tuple[RamBlock, ...] = ()
        self.closed = False

    # ------------------------------------------------------------------ input

    @property
    def offset(self) -> int:
        """Bytes of the stream consumed so far."""
        return self._base + self._start

    @property
    def ram_complete(self) -> bool:
        """The RAM END section went by: what follows is device state."""
        return self._state is _State.TAIL

    def space(self) -> memoryview:
        """Free room to receive into (then commit(n)); earlier Pages views end here."""
        if len(self._buf) - self._end < MIN_SPACE:
            kept = self._end - self._start
            self._buf[:kept] = self._buf[self._start:self._end]
            self._base += self._start
            self._start, self._end = 0, kept
        return memoryview(self._buf)[self._end:]

    def commit(self, n: int) -> None:
        """n bytes were written at the start of space()."""
        if not 0 <= n <= len(self._buf) - self._end:
            raise ValueError(f"commit of {n} bytes with {len(self._buf) - self._end} free")
        self._end += n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append data (in pieces of at most what space() offers)."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            room = self.space()
            n = min(room.nbytes, view.nbytes)
            room[:n] = view[:n]
            self.commit(n)
            view = view[n:]
            if view.nbytes:
                self._drain_tail()

    def _drain_tail(self) -> None:
        """Make room while feeding a large piece: only device state can be moved on."""
        if self._state is not _State.TAIL:
            raise ValueError("feed() got more than the buffer holds before next_event()")
        self._forward_tail()

    def close(self) -> None:
        """The stream ended; StreamError unless it ended in the device state."""
        self.closed = True
        if self._state is not _State.TAIL:
            raise StreamError(f"QEMU's migration stream ended in {self._state.value} after "
                              f"{self._base + self._end} bytes")

    # ------------------------------------------------------------------ output

    def next_event(self) -> Event | None:
        """The next event, or None until more bytes arrive."""
        while not self._events:
            if not self._step():
                return None
        return self._events.popleft()

    def _step(self) -> bool:
        """Parse one item; False when it is not all in the buffer yet."""
        if self._state is _State.TAIL:
            return self._forward_tail()
        if self._state is _State.RECORDS:
            return self._records()
        if self._state is _State.HEADER:
            return self._header()
        if self._state is _State.CONFIGURATION:
            return self._configuration()
        return self._section_header()

    def _avail(self) -> int:
        return self._end - self._start

    def _fail(self, what: str, at: int | None = None) -> StreamError:
        where = self._base + (self._start if at is None else at)
        return StreamError(f"QEMU's migration stream: {what} (at byte {where})")

    def _emit_forward(self, *parts: bytes | memoryview) -> None:
        if self._fwd_len:
            self._events.append(Forward(bytes(self._fwd[:self._fwd_len])))
            self._fwd_len = 0
        data = b"".join(parts)
        if data:
            self._events.append(Forward(data))

    # ------------------------------------------------------------------ framing

    def _header(self) -> bool:
        if self._avail() < HEADER.size:
            return False
        magic, version = HEADER.unpack_from(self._buf, self._start)
        if magic != MAGIC or version != VERSION:
            raise self._fail(f"starts with {bytes(self._buf[self._start:self._start + 8])!r},"
                             f" not QEVM version {VERSION}")
        self._emit_forward(self._take(HEADER.size))
        self._state = _State.CONFIGURATION
        return True

    def _configuration(self) -> bool:
        # 07 | be32 len | machine name, then (peeked) no subsection of its own.
        if self._avail() < SECTION_ID:
            return False
        kind = self._buf[self._start]
        if kind != Section.CONFIGURATION:
            raise self._fail(f"section type {kind:#04x} where the configuration section "
                             f"belongs")
        (length,) = BE32.unpack_from(self._buf, self._start + 1)
        if length > MAX_CONFIG_NAME:
            raise self._fail(f"machine name of {length} bytes")
        if self._avail() < SECTION_ID + length + 1:
            return False
        if self._buf[self._start + SECTION_ID + length] == Section.SUBSECTION:
            raise self._fail("the configuration carries subsections (validated capabilities "
                             "or validate-uuid on the source): turn them off",
                             self._start + SECTION_ID + length)
        self._emit_forward(self._take(SECTION_ID + length), capabilities_subsection())
        self._state = _State.TOP
        return True

    def _section_header(self) -> bool:
        if self._avail() < 1:
            return False
        kind = self._buf[self._start]
        if kind in (Section.PART, Section.END):
            if self._avail() < SECTION_ID:
                return False
            (sid,) = BE32.unpack_from(self._buf, self._start + 1)
            if self._sid is None or sid != self._sid:
                raise self._fail(f"section {Section(kind).name} for section id {sid}, "
                                 f"which is not RAM's ({self._sid})")
            self._emit_forward(self._take(SECTION_ID))
            self._section = Section(kind)
            self._state = _State.RECORDS
            return True
        if kind == Section.START:
            return self._section_start()
        if kind in (Section.FULL, Section.EOF):
            raise self._fail(f"{Section(kind).name} before RAM's last section")
        name = Section(kind).name if kind in Section._value2member_map_ else f"{kind:#04x}"
        raise self._fail(f"section type {name} (postcopy, or a capability ferry does not "
                         f"set)" if kind == Section.COMMAND else f"unknown section type {name}")

    def _section_start(self) -> bool:
        # 01 | be32 sid | u8 len idstr | be32 instance | be32 version | RAM block list
        # | EOS | footer; parsed whole or not at all (it is small).
        view = memoryview(self._buf)[self._start:self._end]
        if view.nbytes < SECTION_ID + 1:
            return False
        (sid,) = BE32.unpack_from(view, 1)
        name_len = view[SECTION_ID]
        head = SECTION_ID + 1 + name_len + 8
        if view.nbytes < head:
            return False
        name = bytes(view[SECTION_ID + 1:SECTION_ID + 1 + name_len])
        if name != RAM_SECTION:
            raise self._fail(f"iterative section {name.decode(errors='replace')!r} (block "
                             f"migration or dirty bitmaps on the source): ferry carries RAM "
                             f"and device state only")
        if self._sid is not None:
            raise self._fail("a second RAM section start")
        instance, version = struct_2x32(view, head - 8)
        if instance != 0 or version != RAM_SECTION_VERSION:
            raise self._fail(f"RAM section instance {instance} version {version}, expected "
                             f"0 and {RAM_SECTION_VERSION}")
        if view.nbytes < head + 8:
            return False
        (word,) = BE64.unpack_from(view, head)
        if word & RECORD_FLAGS_MASK != RAM_SAVE_FLAG_MEM_SIZE:
            raise self._fail(f"RAM section starts with {word:#x}, not the block list")
        total = word & ~RECORD_FLAGS_MASK
        at, out = head + 8, [bytes(view[:head + 8])]
        blocks: list[RamBlock] = []
        listed = 0
        while listed < total:
            if len(blocks) >= MAX_BLOCKS:
                raise self._fail(f"more than {MAX_BLOCKS} RAM blocks")
            if view.nbytes < at + 1:
                return False
            n = view[at]
            if view.nbytes < at + 1 + n + 8:
                return False
            block_name = bytes(view[at + 1:at + 1 + n])
            (size,) = BE64.unpack_from(view, at + 1 + n)
            if size == 0 or size % PAGE_SIZE or size > total - listed:
                raise self._fail(f"RAM block {block_name!r} of {size} bytes in a list of "
                                 f"{total}")
            blocks.append(RamBlock(block_name.decode("utf-8", "replace"), size))
            out += [bytes(view[at:at + 1 + n + 8]), BE64.pack(BLOCK_ADDRESS)]
            listed += size
            at += 1 + n + 8
        if view.nbytes < at + 8 + FOOTER_SIZE:
            return False
        (eos,) = BE64.unpack_from(view, at)
        if eos != RAM_SAVE_FLAG_EOS:
            raise self._fail(f"RAM block list ends with {eos:#x}, not EOS")
        self._check_footer(view, at + 8, sid)
        names = [b.name.encode() for b in blocks]
        if len(set(names)) != len(names):
            raise self._fail("RAM block names repeat")
        try:
            self._main = [b.name for b in blocks].index(self.main_block)
        except ValueError:
            raise self._fail(f"no RAM block {self.main_block!r} (blocks: "
                             f"{', '.join(b.name for b in blocks)})") from None
        if blocks[self._main].size != self.main_size:
            raise self._fail(f"RAM block {self.main_block!r} has {blocks[self._main].size} "
                             f"bytes, the VM {self.main_size}")
        out.append(bytes(view[at:at + 8 + FOOTER_SIZE]))
        view.release()
        self._take(at + 8 + FOOTER_SIZE)
        self._names = b"".join(bytes([len(n)]) + n for n in names)
        self._npages = array.array("Q", [b.size // PAGE_SIZE for b in blocks])
        self._sid = sid
        self.blocks = tuple(blocks)
        self._emit_forward(*out)
        self._events.append(RamSetup(self.blocks))
        return True

    def _check_footer(self, view: memoryview, at: int, sid: int) -> None:
        if view[at] != Section.FOOTER or BE32.unpack_from(view, at + 1)[0] != sid:
            raise self._fail(f"section {sid} not closed by its footer (found "
                             f"{bytes(view[at:at + FOOTER_SIZE]).hex()})", self._start + at)

    # ------------------------------------------------------------------ records

    def _records(self) -> bool:
        (pos, taken, self._fwd_len, self._current, status,
         detail) = _backend.scan_records(self._buf, self._start, self._end, self._names,
                                         self._npages, self._main, self._current,
                                         self._indices, self._offsets, 0, self._fwd,
                                         self._fwd_len)
        status = Scan(status)
        record_at = pos
        self._start = pos
        if taken:
            self._events.append(Pages(memoryview(self._indices)[:taken],
                                      memoryview(self._offsets)[:taken],
                                      memoryview(self._buf), self._section))
        if status is Scan.FULL:
            if self._fwd_len:
                self._emit_forward()
            return True
        if status is Scan.NEED_DATA:
            if self._fwd_len:
                self._emit_forward()
            return bool(self._events)   # a Forward alone is an event too
        if status is Scan.EOS:
            return self._end_of_section() or bool(taken)
        raise self._record_error(status, detail, record_at)

    def _end_of_section(self) -> bool:
        if self._avail() < 8 + FOOTER_SIZE:
            return False
        view = memoryview(self._buf)[self._start:self._start + 8 + FOOTER_SIZE]
        assert self._sid is not None
        self._check_footer(view, 8, self._sid)
        view.release()
        self._emit_forward(self._take(8 + FOOTER_SIZE))
        self.sections += 1
        self._events.append(RamSection(self._section, self.sections))
        self._state = _State.TAIL if self._section is Section.END else _State.TOP
        return True

    def _record_error(self, status: Scan, detail: int, at: int) -> StreamError:
        if status is Scan.BAD_FLAGS:
            return self._fail(f"RAM record flags {detail & RECORD_FLAGS_MASK:#x} (XBZRLE, "
                              f"compression or multifd on the source? ferry carries ZERO and "
                              f"PAGE records only)", at)
        if status is Scan.UNKNOWN_BLOCK:
            n = self._buf[detail + 8]
            name = bytes(self._buf[detail + 9:detail + 9 + n]).decode("utf-8", "replace")
            return self._fail(f"RAM record for block {name!r}, which the block list did not "
                              f"name", at)
        if status is Scan.NO_BLOCK:
            return self._fail("RAM record continues a block before any was named", at)
        if status is Scan.BEYOND:
            if not detail & RAM_SAVE_FLAG_CONTINUE:   # the record names its block
                n = self._buf[at + 8]
                block = bytes(self._buf[at + 9:at + 9 + n]).decode("utf-8", "replace")
            else:
                block = self.blocks[self._current].name if self._current >= 0 else "?"
            return self._fail(f"RAM record at offset {detail & ~RECORD_FLAGS_MASK:#x}, past "
                              f"the end of its block {block!r}", at)
        if status is Scan.BAD_FILL:
            return self._fail(f"ZERO record with fill byte {detail:#04x}", at)
        return self._fail(f"record loop stopped with {status!r}", at)

    # ------------------------------------------------------------------ tail

    def _forward_tail(self) -> bool:
        if not self._avail():
            return False
        self._emit_forward(self._take(self._avail()))
        return True

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[self._start:self._start + n])
        self._start += n
        return data


def struct_2x32(view: memoryview, at: int) -> tuple[int, int]:
    """Two be32 words at `at`."""
    return BE32.unpack_from(view, at)[0], BE32.unpack_from(view, at + 4)[0]

"""QEMU 7.2 migration stream codec (agent/qemu/stream.py): captured streams of real QEMU,
a real destination fed the rewritten stream, every split of a small stream, generated
streams on both backends, and hostile input.

Streams are checked against two oracles written here from DESIGN §2b, not from the
parser: `StreamModel` builds a synthetic stream and records what the parser must make of
it; `walk` reads any stream (the captured ones) the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import mmap
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent._native import PURE_PYTHON_ENV, select
from agent.guest import (
    KERNEL_ADDR,
    MAILBOX_PAGE,
    GuestConfig,
    MailboxState,
    build_guest,
    guest_pages,
    read_mailbox,
)
from agent.qemu import _stream_py, qmp, stream
from agent.qemu import stream_format as fmt
from agent.qemu.stream import (
    Forward,
    Pages,
    RamBlock,
    RamSection,
    RamSetup,
    StreamError,
    StreamParser,
)
from agent.qemu.stream_format import PAGE_SIZE, Section

try:
    from agent._native import qstream as native
except ImportError:  # not built: the twin still runs
    native = None

needs_native = pytest.mark.skipif(native is None, reason="native qstream not built")
BACKENDS = [pytest.param(_stream_py, id="python"),
            pytest.param(native, id="native", marks=needs_native)]
IMPLS = [_stream_py] + ([native] if native is not None else [])

MIN_BUFFER = 2 * stream.MIN_SPACE


@contextlib.contextmanager
def use_backend(impl) -> Iterator[None]:
    """Run the parser's record loop on `impl` (hypothesis tests cannot take monkeypatch)."""
    saved = stream._backend
    stream._backend = impl
    try:
        yield
    finally:
        stream._backend = saved


@pytest.fixture(params=BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


def be32(n: int) -> bytes:
    return struct.pack(">I", n)


def be64(n: int) -> bytes:
    return struct.pack(">Q", n)


def lstr(name: bytes) -> bytes:
    return bytes([len(name)]) + name


# ---------------------------------------------------------------------------- oracles

RAM_SID = 3
MACHINE = b"pc-i440fx-7.2"
CAPS = (b"\x05" + lstr(b"configuration/capabilities") + be32(1) + be32(1)
        + lstr(b"x-ignore-shared"))
"""The subsection a real x-ignore-shared source sends (DESIGN §2b), spelt out by hand."""


class StreamModel:
    """Builds a synthetic migration stream and, beside it, what the parser must produce:
    the forward stream (rewritten, main block cut out), the main block's records, the RAM
    section events, and how many forward bytes precede each of them."""

    def __init__(self, blocks: Sequence[tuple[str, int]] = (("pc.ram", 16 * PAGE_SIZE),
                                                              ("pc.bios", 4 * PAGE_SIZE)),
                 main: str = "pc.ram") -> None:
        self.blocks = list(blocks)
        self.main = main
        self.raw = bytearray()
        self.forward = bytearray()
        self.pages: list[tuple[int, bytes | None]] = []
        self.page_marks: list[int] = []       # forward bytes before each main record
        self.sections: list[tuple[Section, int]] = []
        self.section_marks: list[int] = []    # forward bytes up to each section's footer
        self.setup_mark: int | None = None
        self.ram_end: int | None = None       # stream bytes up to RAM's END footer
        self.current: str | None = None
        self.kind = Section.PART
        self._fill = 0

    @property
    def main_size(self) -> int:
        return dict(self.blocks)[self.main]

    def emit(self, data: bytes, *, forward: bool = True) -> StreamModel:
        self.raw += data
        if forward:
            self.forward += data
        return self

    def header(self) -> StreamModel:
        return self.emit(b"QEVM" + be32(3))

    def configuration(self, machine: bytes = MACHINE) -> StreamModel:
        self.emit(b"\x07" + be32(len(machine)) + machine)
        self.forward += CAPS
        return self

    def opening(self) -> StreamModel:
        return self.header().configuration().start()

    def start(self, sid: int = RAM_SID) -> StreamModel:
        self.emit(b"\x01" + be32(sid) + lstr(b"ram") + be32(0) + be32(4))
        self.emit(be64(sum(size for _, size in self.blocks) | 0x04))
        for name, size in self.blocks:
            self.emit(lstr(name.encode()) + be64(size))
            self.forward += be64(0)
        self.emit(be64(0x10) + b"\x7e" + be32(sid))
        self.setup_mark = len(self.forward)
        return self

    def section(self, kind: Section = Section.PART, sid: int = RAM_SID) -> StreamModel:
        self.kind = kind
        return self.emit(bytes([kind]) + be32(sid))

    def fresh_page(self) -> bytes:
        self._fill += 1
        return bytes([self._fill & 0xFF]) * 2048 + struct.pack(">Q", self._fill) * 256

    def record(self, block: str, page: int, data: bytes | None, *,
               cont: bool | None = None) -> StreamModel:
        """A ZERO (data None) or PAGE record; named unless it continues the last block,
        as QEMU does (cont=False names it anyway)."""
        cont = block == self.current if cont is None else cont
        flags = (0x02 if data is None else 0x08) | (0x20 if cont else 0)
        raw = (be64(page * PAGE_SIZE | flags) + (b"" if cont else lstr(block.encode()))
               + (b"\0" if data is None else data))
        if block == self.main:
            self.page_marks.append(len(self.forward))
            self.pages.append((page, data))
            self.emit(raw, forward=False)
        else:
            self.emit(raw)
        self.current = block
        return self

    def zero(self, block: str, page: int, **kwargs) -> StreamModel:
        return self.record(block, page, None, **kwargs)

    def page(self, block: str, page: int, **kwargs) -> StreamModel:
        return self.record(block, page, self.fresh_page(), **kwargs)

    def eos(self, sid: int = RAM_SID) -> StreamModel:
        self.emit(be64(0x10) + b"\x7e" + be32(sid))
        self.sections.append((self.kind, len(self.sections) + 1))
        self.section_marks.append(len(self.forward))
        if self.kind is Section.END:
            self.ram_end = len(self.raw)
        return self

    def device(self, name: bytes = b"timer", body: bytes = b"\x00\x01\x02\x03\x05",
               sid: int = 9) -> StreamModel:
        # The body holds a 0x05 (a subsection byte): device state is carried as it is.
        return self.emit(b"\x04" + be32(sid) + lstr(name) + be32(0) + be32(1) + body
                         + b"\x7e" + be32(sid))

    def tail(self) -> StreamModel:
        self.device().device(b"apic", bytes(range(40)), sid=10)
        self.emit(b"\x00")
        desc = b'{"page_size": 4096, "devices": []}'
        return self.emit(b"\x06" + be32(len(desc)) + desc)

    def setup_blocks(self) -> tuple[RamBlock, ...]:
        return tuple(RamBlock(name, size) for name, size in self.blocks)


def small_stream() -> StreamModel:
    """Named and CONTINUE records of the main block and another one (CONTINUE also across
    sections), PAGE and ZERO of each, an empty iteration, a page sent again as ZERO in
    END, device state, EOF and VMDESC; two PAGE records only, to keep every split cheap."""
    m = StreamModel().opening().section(Section.PART)
    m.page("pc.ram", 1).zero("pc.ram", 0).zero("pc.ram", 2).zero("pc.bios", 0)
    m.zero("pc.bios", 3).zero("pc.ram", 15).eos()
    m.section(Section.PART).zero("pc.ram", 3).zero("pc.bios", 1).zero("pc.bios", 2).eos()
    m.section(Section.PART).eos()  # an iteration with nothing in it
    m.section(Section.END).zero("pc.bios", 2).page("pc.bios", 3).zero("pc.ram", 1)
    m.zero("pc.ram", 4).eos()
    return m.tail()


@dataclass
class Walk:
    """What `walk` read from a stream."""

    forward: bytearray = field(default_factory=bytearray)
    blocks: list[RamBlock] = field(default_factory=list)
    pages: list[tuple[int, int | None]] = field(default_factory=list)  # (index, data at)
    page_marks: list[int] = field(default_factory=list)
    record_bytes: int = 0                 # bytes of the main block's records
    records: Counter[str] = field(default_factory=Counter)   # records per block
    sections: list[tuple[Section, int]] = field(default_factory=list)
    section_marks: list[int] = field(default_factory=list)
    setup_mark: int = 0
    ram_end: int = 0


def walk(data: bytes, main: str) -> Walk:
    """Read a (well-formed) stream per DESIGN §2b, rewriting as the destination needs."""
    w = Walk()
    assert data[:8] == b"QEVM" + be32(3)
    assert data[8] == 0x07
    (n,) = struct.unpack_from(">I", data, 9)
    pos = 13 + n
    assert data[pos] != 0x05, "the captured stream already has a configuration subsection"
    w.forward += data[:pos] + CAPS
    names: list[str] = []
    current = -1
    while True:
        kind = data[pos]
        if kind == 0x01:
            n = data[pos + 5]
            assert data[pos + 6:pos + 6 + n] == b"ram"
            (word,) = struct.unpack_from(">Q", data, pos + 6 + n + 8)
            assert word & 0xFFF == 0x04
            total, at = word & ~0xFFF, pos + 6 + n + 16
            w.forward += data[pos:at]
            while total:
                n = data[at]
                name = data[at + 1:at + 1 + n].decode()
                (size,) = struct.unpack_from(">Q", data, at + 1 + n)
                w.blocks.append(RamBlock(name, size))
                names.append(name)
                w.forward += data[at:at + 9 + n] + be64(0)
                total -= size
                at += 9 + n
            assert data[at:at + 13] == be64(0x10) + b"\x7e" + data[pos + 1:pos + 5]
            w.forward += data[at:at + 13]
            w.setup_mark = len(w.forward)
            pos = at + 13
            continue
        assert kind in (0x02, 0x03), f"section type {kind:#x} at {pos}"
        w.forward += data[pos:pos + 5]
        pos += 5
        while True:
            (word,) = struct.unpack_from(">Q", data, pos)
            if word == 0x10:
                w.forward += data[pos:pos + 13]
                pos += 13
                w.sections.append((Section(kind), len(w.sections) + 1))
                w.section_marks.append(len(w.forward))
                break
            flags, at = word & 0xFFF, pos + 8
            assert flags & ~0x20 in (0x02, 0x08), f"record flags {flags:#x} at {pos}"
            if not flags & 0x20:
                n = data[at]
                current = names.index(data[at + 1:at + 1 + n].decode())
                at += 1 + n
            end = at + (1 if flags & 0x02 else PAGE_SIZE)
            w.records[names[current]] += 1
            if names[current] == main:
                w.pages.append((word >> 12, None if flags & 0x02 else at))
                w.page_marks.append(len(w.forward))
                w.record_bytes += end - pos
            else:
                w.forward += data[pos:end]
            pos = end
        if kind == 0x03:
            break
    w.ram_end = pos
    w.forward += data[pos:]
    return w


# ---------------------------------------------------------------------------- running the parser

@dataclass
class Parsed:
    """Everything a parser produced, copied out of its views as the events came."""

    forward: bytearray = field(default_factory=bytearray)
    pages: list[tuple[int, bytes | None]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    page_marks: list[int] = field(default_factory=list)
    sections: list[tuple[Section, int]] = field(default_factory=list)
    section_marks: list[int] = field(default_factory=list)
    setups: list[tuple[RamBlock, ...]] = field(default_factory=list)
    setup_marks: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def result(self) -> tuple:
        """What must not depend on chunking or backend (event boundaries may)."""
        return (bytes(self.forward), self.pages, self.sections, self.setups,
                self.section_marks, self.setup_marks)


class Collector:
    """Feeds a parser and drains it after every piece, as the source agent does."""

    def __init__(self, parser: StreamParser) -> None:
        self.parser = parser
        self.out = Parsed()

    def take(self, event) -> None:
        out = self.out
        if isinstance(event, Pages):
            assert len(event.indices) == len(event.offsets) == len(event) > 0
            for index, offset in zip(event.indices, event.offsets, strict=True):
                out.page_marks.append(len(out.forward))
                out.offsets.append(offset)
                if offset == fmt.ZERO_PAGE_OFFSET:
                    out.pages.append((index, None))
                else:
                    page = bytes(event.data[offset:offset + PAGE_SIZE])
                    assert len(page) == PAGE_SIZE
                    out.pages.append((index, page))
            out.events.append("pages")
        elif isinstance(event, Forward):
            assert isinstance(event.data, bytes) and event.data
            out.forward += event.data
            out.events.append("forward")
        elif isinstance(event, RamSection):
            out.sections.append((event.kind, event.number))
            out.section_marks.append(len(out.forward))
            out.events.append(event.kind.name)
        else:
            assert isinstance(event, RamSetup)
            out.setups.append(event.blocks)
            out.setup_marks.append(len(out.forward))
            out.events.append("setup")

    def drain(self) -> None:
        while (event := self.parser.next_event()) is not None:
            self.take(event)
        # None means nothing more without more bytes: not an event held back.
        assert self.parser.next_event() is None, "next_event() said None with an event ready"

    def push(self, piece: bytes, *, via_space: bool = False) -> None:
        if via_space:   # as a recv_into(space()) would
            room = self.parser.space()
            assert len(room) >= len(piece)
            room[:len(piece)] = piece
            self.parser.commit(len(piece))
        else:
            self.parser.feed(piece)
        self.drain()


def cut(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    """data in pieces of the given sizes, repeated (0 means: the rest)."""
    pieces: list[bytes] = []
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= len(data):
            return pieces
        size = size or len(data)
        pieces.append(data[pos:pos + size])
        pos += size
    raise AssertionError  # unreachable


def parse(data: bytes, pieces: Sequence[bytes] | None = None, *, main: str = "pc.ram",
          main_size: int, close: bool = True, alternate: bool = False,
          **kwargs) -> Parsed:
    """Parse data (whole, into a buffer that holds it, unless pieces are given)."""
    if pieces is None:
        pieces = [data]
        kwargs.setdefault("buffer_size", max(MIN_BUFFER, len(data) + stream.MIN_SPACE))
    assert b"".join(pieces) == data
    collector = Collector(StreamParser(main, main_size, **kwargs))
    for k, piece in enumerate(pieces):
        collector.push(piece, via_space=alternate and k % 2 == 1)
    if close:
        collector.parser.close()
        assert collector.parser.ram_complete
    return collector.out


def expect_model(out: Parsed, m: StreamModel) -> None:
    """The parser's output is exactly what the model says, in an allowed order."""
    assert bytes(out.forward) == bytes(m.forward)
    assert out.pages == m.pages
    assert out.sections == m.sections
    assert out.setups == [m.setup_blocks()]
    assert out.setup_marks == [m.setup_mark]
    assert out.section_marks == m.section_marks
    # A page reaches the caller before any forward byte that follows it in the stream.
    assert all(got <= limit for got, limit in zip(out.page_marks, m.page_marks, strict=True))


# ---------------------------------------------------------------------------- synthetic streams

def test_backend_selection(monkeypatch):
    pure = os.environ.get(PURE_PYTHON_ENV) == "1"
    assert stream.BACKEND == ("native" if native is not None and not pure else "python")
    assert stream._backend is (native if stream.BACKEND == "native" else _stream_py)
    monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    assert select("qstream", "agent.qemu._stream_py") == ("python", _stream_py)


def test_capabilities_rewrite_is_what_a_real_source_sends():
    assert fmt.capabilities_subsection() == CAPS
    assert len(b"configuration/capabilities") == 0x1A


def test_walk_agrees_with_the_model():
    """The two oracles describe the same stream the same way."""
    m = small_stream()
    w = walk(bytes(m.raw), "pc.ram")
    assert w.forward == m.forward
    assert [(i, None if at is None else bytes(m.raw[at:at + PAGE_SIZE])) for i, at in w.pages] \
        == m.pages
    assert (w.sections, w.section_marks, w.page_marks, w.setup_mark, w.ram_end) == \
        (m.sections, m.section_marks, m.page_marks, m.setup_mark, m.ram_end)


def test_small_stream_whole(backend):
    m = small_stream()
    out = parse(bytes(m.raw), main_size=m.main_size)
    expect_model(out, m)
    assert [s for s, _ in out.sections] == [Section.PART] * 3 + [Section.END]
    # Fed whole into a buffer that holds it, offsets are stream offsets.
    w = walk(bytes(m.raw), "pc.ram")
    assert out.offsets == [fmt.ZERO_PAGE_OFFSET if at is None else at for _, at in w.pages]
    assert out.events[0] == "forward" and out.events[-1] == "forward"


@pytest.mark.parametrize("max_pages", [1, 2])
def test_small_stream_with_tiny_outputs(backend, max_pages):
    """A page list of one or two entries fills up (FULL) and the loop resumes."""
    m = small_stream()
    data = bytes(m.raw)
    expect_model(parse(data, main_size=m.main_size, max_pages=max_pages), m)
    expect_model(parse(data, cut(data, [3, 4099]), main_size=m.main_size,
                       max_pages=max_pages, buffer_size=MIN_BUFFER), m)


def test_every_split_gives_the_same_events():
    """Two pieces, split at every byte offset, on both backends: the same forward bytes,
    pages and section events as the whole stream; after the first piece, a prefix of
    them, and RAM complete exactly when the END footer was in it."""
    m = small_stream()
    data = bytes(m.raw)
    assert m.ram_end is not None
    whole = {}
    for impl in IMPLS:
        with use_backend(impl):
            whole[impl] = parse(data, main_size=m.main_size).result()
    assert len(set(map(repr, whole.values()))) == 1
    want = whole[_stream_py]
    for impl in IMPLS:
        with use_backend(impl):
            for k in range(len(data) + 1):
                collector = Collector(StreamParser("pc.ram", m.main_size,
                                                   buffer_size=MIN_BUFFER))
                collector.push(data[:k])
                first = collector.out
                assert want[0].startswith(first.forward), k
                assert first.pages == want[1][:len(first.pages)], k
                assert first.sections == want[2][:len(first.sections)], k
                assert collector.parser.ram_complete == (k >= m.ram_end), k
                collector.push(data[k:], via_space=k % 2 == 1)
                collector.parser.close()
                assert collector.out.result() == want, k


def test_truncated_at_every_point():
    """close() refuses a stream that ends before RAM's END footer, and only then (on the
    selected backend; the split test above checks both up to ram_complete)."""
    m = small_stream()
    data = bytes(m.raw)
    for k in range(len(data) + 1):
        parser = StreamParser("pc.ram", m.main_size, buffer_size=MIN_BUFFER)
        parser.feed(data[:k])
        while parser.next_event() is not None:
            pass
        if k >= m.ram_end:
            parser.close()
            continue
        with pytest.raises(StreamError, match=f"ended in .* after {k} bytes"):
            parser.close()


def test_forward_buffer_fills_and_resumes(backend):
    """More of other blocks' records in one go than the forward buffer holds (1 MiB)."""
    n = stream.FORWARD_CAPACITY // PAGE_SIZE + 20
    m = StreamModel([("pc.ram", 16 * PAGE_SIZE), ("vga.vram", n * PAGE_SIZE)]).opening()
    m.section(Section.PART)
    for i in range(n):
        m.page("vga.vram", i)
        if i % 97 == 0:
            m.page("pc.ram", i % 16)
    m.eos().section(Section.END).eos().tail()
    data = bytes(m.raw)
    expect_model(parse(data, main_size=m.main_size), m)
    expect_model(parse(data, cut(data, [stream.MIN_SPACE - 1]), main_size=m.main_size,
                       buffer_size=MIN_BUFFER), m)


def test_pages_views_point_into_the_buffer_until_the_next_call(backend):
    m = StreamModel().opening().section(Section.PART).page("pc.ram", 5).page("pc.ram", 6)
    m.eos()
    parser = StreamParser("pc.ram", m.main_size)
    parser.feed(bytes(m.raw))
    events = []
    while (event := parser.next_event()) is not None:
        if isinstance(event, Pages):
            assert list(event.indices) == [5, 6]
            assert [bytes(event.data[o:o + PAGE_SIZE]) for o in event.offsets] == \
                [data for _, data in m.pages]
            assert event.data.obj is parser._buf   # no copy of the page bytes
        if not events or events[-1] != type(event).__name__:
            events.append(type(event).__name__)
    assert events == ["Forward", "RamSetup", "Forward", "Pages", "Forward", "RamSection"]
    assert not parser.ram_complete


def test_parser_arguments_checked():
    with pytest.raises(ValueError, match="pages"):
        StreamParser("pc.ram", 4095)
    with pytest.raises(ValueError, match="pages"):
        StreamParser("pc.ram", 0)
    with pytest.raises(ValueError, match="too small"):
        StreamParser("pc.ram", PAGE_SIZE, max_pages=0)
    with pytest.raises(ValueError, match="too small"):
        StreamParser("pc.ram", PAGE_SIZE, buffer_size=MIN_BUFFER - 1)
    parser = StreamParser("pc.ram", PAGE_SIZE, buffer_size=MIN_BUFFER)
    with pytest.raises(ValueError, match="commit"):
        parser.commit(len(parser.space()) + 1)
    with pytest.raises(ValueError, match="more than the buffer holds"):
        parser.feed(bytes(MIN_BUFFER + 1))


def test_device_state_of_any_size_is_forwarded(backend):
    """Past RAM's END, feed() takes pieces larger than the buffer and forwards them."""
    m = small_stream()
    big = bytes(range(256)) * (3 * MIN_BUFFER // 256)
    m.emit(big)
    out = parse(bytes(m.raw), [bytes(m.raw[:m.ram_end]), bytes(m.raw[m.ram_end:])],
                main_size=m.main_size, buffer_size=MIN_BUFFER)
    expect_model(out, m)


# ---------------------------------------------------------------------------- generated streams

@st.composite
def streams(draw) -> StreamModel:
    """Random blocks, sections and records of the main and other blocks, as a model."""
    nblocks = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 6)) * PAGE_SIZE for _ in range(nblocks)]
    names = ["pc.ram"] + [draw(st.sampled_from(["pc.bios", "pc.rom", "/rom@etc/acpi/rsdp",
                                                "vga.vram", "x" * 255, "r"]))
                          for _ in range(nblocks - 1)]
    names = list(dict.fromkeys(names))
    order = draw(st.permutations(range(len(names))))
    blocks = [(names[i], sizes[i]) for i in order]
    m = StreamModel(blocks, main="pc.ram").opening()
    for kind in [Section.PART] * draw(st.integers(0, 3)) + [Section.END]:
        m.section(kind)
        for _ in range(draw(st.integers(0, 6))):
            name, size = draw(st.sampled_from(blocks))
            page = draw(st.integers(0, size // PAGE_SIZE - 1))
            named = m.current != name or draw(st.booleans())  # QEMU may name it again
            m.record(name, page, draw(st.sampled_from([None, m.fresh_page()])),
                     cont=not named)
        m.eos()
    if draw(st.booleans()):
        m.tail()
    return m


@needs_native
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=streams(), data=st.data())
def test_generated_streams_native_and_twin_agree_with_the_model(m, data):
    raw = bytes(m.raw)
    sizes = data.draw(st.lists(st.integers(1, 9000), min_size=1, max_size=8))
    max_pages = data.draw(st.integers(1, 5))
    results = []
    for impl in (native, _stream_py):
        with use_backend(impl):
            out = parse(raw, cut(raw, sizes), main_size=m.main_size, max_pages=max_pages,
                        buffer_size=MIN_BUFFER, alternate=True)
        expect_model(out, m)
        results.append((out.result(), out.events, out.page_marks))
    assert results[0] == results[1]


def scan(impl, buf, pos, end, names, npages, main, current, capacity, fwd_size):
    index, offset = [bytearray(8 * capacity) for _ in range(2)]
    fwd = bytearray(fwd_size)
    result = impl.scan_records(buf, pos, end, names, npages, main, current,
                               memoryview(index).cast("Q"), memoryview(offset).cast("Q"), 0,
                               fwd, 0)
    return result, bytes(index), bytes(offset), bytes(fwd)


@needs_native
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_record_loops_agree_on_any_bytes(data):
    """scan_records of native and twin agree on arbitrary buffers: well-formed records,
    garbage, short buffers, names of any length, full outputs."""
    names = data.draw(st.lists(st.binary(min_size=0, max_size=5), min_size=1, max_size=4,
                               unique=True))
    npages = [data.draw(st.integers(0, 3)) for _ in names]
    pieces = []
    for _ in range(data.draw(st.integers(0, 6))):
        flags = data.draw(st.sampled_from([0x02, 0x08, 0x22, 0x28, 0x10, 0x12, 0x40, 0x80,
                                           0x100, 0x00, 0x04, 0x20, 0x30]))
        word = data.draw(st.integers(0, 4)) * PAGE_SIZE | flags
        name = b"" if flags & 0x20 else lstr(data.draw(st.sampled_from(names + [b"zz"])))
        body = bytes([data.draw(st.sampled_from([0, 0, 1]))]) if flags & 0x02 else \
            data.draw(st.binary(min_size=0, max_size=8)).ljust(PAGE_SIZE, b"p")
        pieces.append(be64(word) + name + body)
    raw = data.draw(st.binary(max_size=3)) + b"".join(pieces) + data.draw(st.binary(max_size=12))
    pos = data.draw(st.integers(0, 3))
    end = data.draw(st.integers(pos, len(raw))) if len(raw) >= pos else len(raw)
    pos = min(pos, end)
    table = b"".join(lstr(n) for n in names)
    args = (raw, pos, end, table, array("Q", npages),
            data.draw(st.integers(0, len(names) - 1)), data.draw(st.integers(-1, len(names) - 1)),
            data.draw(st.integers(1, 3)), data.draw(st.sampled_from([0, 5000, 20000])))
    assert scan(native, *args) == scan(_stream_py, *args)


# ---------------------------------------------------------------------------- hostile streams

@dataclass
class Hostile:
    """A stream whose bad part starts at `bad`; what precedes it is `good`."""

    data: bytes
    good: StreamModel          # the model of the stream up to the bad part
    bad: int
    main_size: int


def hostile(build, bad_bytes: bytes | None = None, *, after: bool = True) -> Hostile:
    """A model's stream, then bad_bytes, then (after) more valid records and the tail."""
    m = build()
    good = copy.deepcopy(m)
    if bad_bytes is not None:
        m.emit(bad_bytes)
    if after:
        m.emit(be64(7 * PAGE_SIZE | 0x08) + lstr(b"pc.ram") + b"\xaa" * PAGE_SIZE)
        m.emit(be64(0x10) + b"\x7e" + be32(RAM_SID) + b"\x03" + be32(RAM_SID) + be64(0x10)
               + b"\x7e" + be32(RAM_SID) + b"\x00")
    return Hostile(bytes(m.raw), good, len(good.raw), m.main_size)


def in_records(*records) -> StreamModel:
    m = StreamModel().opening().section(Section.PART).page("pc.ram", 2).page("pc.bios", 1)
    for name, page in records:
        m.zero(name, page)
    return m


def configured() -> StreamModel:
    return StreamModel().header().configuration()


def ram_start(*, blocks=None, total=None, tail=b"") -> bytes:
    """A hand-written RAM START section (tail: what follows the block list)."""
    entries = blocks if blocks is not None else [(b"pc.ram", 16 * PAGE_SIZE)]
    total = sum(size for _, size in entries) if total is None else total
    return (b"\x01" + be32(RAM_SID) + lstr(b"ram") + be32(0) + be32(4) + be64(total | 4)
            + b"".join(lstr(n) + be64(s) for n, s in entries) + tail)


EOS_FOOTER = be64(0x10) + b"\x7e" + be32(RAM_SID)

HOSTILE = {
    "bad magic": (lambda: hostile(StreamModel, b"QEVN" + be32(3)), r"starts with b'QEVN"),
    "bad version": (lambda: hostile(StreamModel, b"QEVM" + be32(4)),
                    r"b'QEVM\\x00\\x00\\x00\\x04', not QEVM version 3"),
    "no configuration": (lambda: hostile(StreamModel().header, b"\x01" + be32(RAM_SID)),
                         "section type 0x01 where the configuration section belongs"),
    "machine name too long": (lambda: hostile(StreamModel().header, b"\x07" + be32(100000)),
                              "machine name of 100000 bytes"),
    "configuration subsection": (
        lambda: hostile(lambda: StreamModel().header().emit(b"\x07" + be32(13) + MACHINE),
                        CAPS[:30]), "the configuration carries subsections"),
    "unknown section type": (lambda: hostile(StreamModel().opening, b"\x09" + be32(RAM_SID)),
                             "unknown section type 0x09"),
    "subsection at top level": (lambda: hostile(StreamModel().opening, b"\x05" + bytes(8)),
                                "unknown section type SUBSECTION"),
    "command section": (lambda: hostile(StreamModel().opening, b"\x08" + be32(2) + be32(0)),
                        "section type COMMAND"),
    "iterative section not ram": (
        lambda: hostile(lambda: StreamModel().header().configuration(),
                        b"\x01" + be32(2) + lstr(b"block") + be32(0) + be32(1) + be64(0x02)),
        "iterative section 'block'"),
    "second ram start": (lambda: hostile(StreamModel().opening,
                                         bytes(StreamModel().start().raw)),
                         "a second RAM section start"),
    "ram version": (
        lambda: hostile(lambda: StreamModel().header().configuration(),
                        b"\x01" + be32(RAM_SID) + lstr(b"ram") + be32(0) + be32(5) + bytes(8)),
        "instance 0 version 5"),
    "ram start without block list": (
        lambda: hostile(configured, b"\x01" + be32(RAM_SID) + lstr(b"ram") + be32(0) + be32(4)
                        + EOS_FOOTER + EOS_FOOTER),
        "RAM section starts with 0x10, not the block list"),
    "part before start": (lambda: hostile(lambda: StreamModel().header().configuration(),
                                          b"\x02" + be32(RAM_SID)),
                          "section PART for section id 3, which is not RAM's \\(None\\)"),
    "part of another section": (lambda: hostile(StreamModel().opening, b"\x02" + be32(7)),
                                "section PART for section id 7, which is not RAM's \\(3\\)"),
    "end of another section": (lambda: hostile(StreamModel().opening, b"\x03" + be32(2)),
                               "section END for section id 2"),
    "device state before ram end": (lambda: hostile(StreamModel().opening, b"\x04" + be32(9)),
                                    "FULL before RAM's last section"),
    "eof before ram end": (lambda: hostile(StreamModel().opening, b"\x00"),
                           "EOF before RAM's last section"),
    "bad footer of a part": (lambda: hostile(lambda: in_records(), be64(0x10) + b"\x7e"
                                             + be32(RAM_SID + 1)),
                             "section 3 not closed by its footer \\(found 7e00000004\\)"),
    "missing footer of a part": (lambda: hostile(lambda: in_records(), be64(0x10) + b"\x02"
                                                 + be32(RAM_SID)),
                                 "section 3 not closed by its footer \\(found 0200000003\\)"),
    "bad footer of the block list": (
        lambda: hostile(configured, ram_start(tail=be64(0x10) + b"\x7f" + be32(RAM_SID))),
        "section 3 not closed by its footer \\(found 7f00000003\\)"),
    "block list without eos": (lambda: hostile(configured, ram_start(tail=be64(0x11) + bytes(5))),
                               "RAM block list ends with 0x11, not EOS"),
    "xbzrle record": (lambda: hostile(in_records, be64(0x40 | 0x20) + bytes(20)),
                      "RAM record flags 0x60"),
    "hook record": (lambda: hostile(in_records, be64(0x80) + bytes(20)),
                    "RAM record flags 0x80"),
    "compressed page": (lambda: hostile(in_records, be64(PAGE_SIZE | 0x100) + bytes(20)),
                        "RAM record flags 0x100"),
    "old compress flag": (lambda: hostile(in_records, be64(0x01) + bytes(20)),
                          "RAM record flags 0x1 "),
    "page and zero at once": (lambda: hostile(in_records, be64(0x0A | 0x20) + bytes(20)),
                              "RAM record flags 0x2a"),
    "mem size in a part": (lambda: hostile(in_records, be64(0x04) + bytes(20)),
                           "RAM record flags 0x4 "),
    "eos with extra flags": (lambda: hostile(in_records, be64(0x10 | 0x08) + bytes(20)),
                             "RAM record flags 0x18"),
    "eos with continue": (lambda: hostile(in_records, be64(0x10 | 0x20) + bytes(20)),
                          "RAM record flags 0x30"),
    "unknown block": (lambda: hostile(in_records, be64(0x02) + lstr(b"pc.ra") + b"\0"),
                      "RAM record for block 'pc.ra', which the block list did not name"),
    "continue before any block": (
        lambda: hostile(StreamModel().opening().section, be64(0x22) + b"\0"),
        "RAM record continues a block before any was named"),
    "continue before any block after a section": (
        lambda: hostile(lambda: StreamModel().opening().section().eos().section(),
                        be64(0x28) + bytes(PAGE_SIZE)),
        "RAM record continues a block before any was named"),
    "page past its block": (lambda: hostile(in_records, be64(4 * PAGE_SIZE | 0x22) + b"\0"),
                            "RAM record at offset 0x4000, past the end of its block"),
    "page past the main block": (
        lambda: hostile(in_records, be64(16 * PAGE_SIZE | 0x08) + lstr(b"pc.ram")
                        + bytes(PAGE_SIZE)),
        "RAM record at offset 0x10000, past the end of its block"),
    "page far past its block": (lambda: hostile(in_records, be64(~0xFFF & (2**64 - 1) | 0x22)
                                                + b"\0"),
                                "RAM record at offset 0xfffffffffffff000, past the end"),
    "zero record with fill byte": (lambda: hostile(in_records, be64(0x22) + b"\x5a"),
                                   "ZERO record with fill byte 0x5a"),
    "zero record of the main block with fill byte": (
        lambda: hostile(lambda: in_records(("pc.ram", 0)), be64(PAGE_SIZE | 0x22) + b"\x01"),
        "ZERO record with fill byte 0x01"),
    "block over the total": (
        lambda: hostile(configured, ram_start(blocks=[(b"pc.ram", 16 * PAGE_SIZE),
                                                     (b"pc.bios", 2 * PAGE_SIZE)],
                                             total=17 * PAGE_SIZE)),
        "RAM block b'pc.bios' of 8192 bytes in a list of 69632"),
    "huge block": (lambda: hostile(configured, ram_start(blocks=[(b"pc.ram", 2**63)],
                                                        total=16 * PAGE_SIZE)),
                   "RAM block b'pc.ram' of 9223372036854775808 bytes in a list of 65536"),
    "empty block": (lambda: hostile(configured, ram_start(blocks=[(b"pc.ram", 16 * PAGE_SIZE),
                                                                 (b"x", 0)],
                                                         total=17 * PAGE_SIZE)),
                    "RAM block b'x' of 0 bytes"),
    "block of part of a page": (
        lambda: hostile(configured, ram_start(blocks=[(b"pc.ram", 100)], total=16 * PAGE_SIZE)),
        "RAM block b'pc.ram' of 100 bytes"),
    "too many blocks": (
        lambda: hostile(configured, ram_start(
            blocks=[(b"b%d" % i, PAGE_SIZE) for i in range(fmt.MAX_BLOCKS + 1)],
            total=2**40)),
        f"more than {fmt.MAX_BLOCKS} RAM blocks"),
    "repeated block": (
        lambda: hostile(configured, ram_start(blocks=[(b"pc.ram", 16 * PAGE_SIZE),
                                                     (b"pc.ram", 16 * PAGE_SIZE)],
                                             tail=EOS_FOOTER)),
        "RAM block names repeat"),
    "no main block": (
        lambda: hostile(configured, ram_start(blocks=[(b"ram0", 16 * PAGE_SIZE),
                                                     (b"pc.bios", PAGE_SIZE)],
                                             tail=EOS_FOOTER)),
        "no RAM block 'pc.ram' \\(blocks: ram0, pc.bios\\)"),
    "main block of another size": (
        lambda: hostile(configured, ram_start(blocks=[(b"pc.ram", 32 * PAGE_SIZE)],
                                             tail=EOS_FOOTER)),
        "RAM block 'pc.ram' has 131072 bytes, the VM 65536"),
}


def error_position(h: Hostile, message: str) -> int:
    return int(message.rsplit("at byte ", 1)[1].rstrip(")"))


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
@pytest.mark.parametrize("chunking", ["whole", "small"])
def test_hostile_stream_refused(backend, case, chunking):
    """StreamError naming what was seen; nothing at or after the bad part comes out, not
    even when the caller asks again; the error stays."""
    build, match = HOSTILE[case]
    h = build()
    pieces = [h.data] if chunking == "whole" else cut(h.data, [1, 2, 5, 11, 31])
    collector = Collector(StreamParser("pc.ram", h.main_size, buffer_size=MIN_BUFFER))
    with pytest.raises(StreamError, match=match) as caught:
        for piece in pieces:
            collector.push(piece)
    message = str(caught.value)
    assert message.startswith("QEMU's migration stream: ")
    assert h.bad <= error_position(h, message) < len(h.data)
    if h.good.setup_mark is not None:
        assert collector.out.setups == [h.good.setup_blocks()]
    for _ in range(3):   # asking again gives nothing new and the same refusal
        with contextlib.suppress(StreamError):
            while (event := collector.parser.next_event()) is not None:
                collector.take(event)
    out = collector.out
    assert bytes(h.good.forward).startswith(out.forward)
    assert out.pages == h.good.pages[:len(out.pages)]
    assert out.sections == h.good.sections[:len(out.sections)]
    with pytest.raises(StreamError, match=match) as again:
        collector.parser.next_event()
    assert str(again.value) == message
    with pytest.raises(StreamError, match="ended in"):
        collector.parser.close()


def test_hostile_positions(backend):
    """The position in the message is the bad record's or section's first byte."""
    for case in ("xbzrle record", "unknown block", "page past its block",
                 "part of another section", "command section", "eos with extra flags"):
        h = HOSTILE[case][0]()
        with pytest.raises(StreamError) as caught:
            parse(h.data, main_size=h.main_size)
        assert error_position(h, str(caught.value)) == h.bad, case
    h = HOSTILE["zero record with fill byte"][0]()
    with pytest.raises(StreamError) as caught:
        parse(h.data, main_size=h.main_size)
    assert error_position(h, str(caught.value)) == h.bad


def test_block_list_that_never_completes_waits(backend):
    """A block list whose total is not reached yet is more data to come, not an error,
    until it lists more blocks than allowed."""
    start = ram_start(blocks=[(b"pc.ram", 16 * PAGE_SIZE)] + [(b"b%d" % i, PAGE_SIZE)
                                                             for i in range(1, 10)],
                      total=2**50)
    m = configured()
    collector = Collector(StreamParser("pc.ram", 16 * PAGE_SIZE, buffer_size=MIN_BUFFER))
    for piece in cut(bytes(m.raw) + start, [1000]):
        collector.push(piece)
    assert collector.out.forward == m.forward   # header and configuration only
    assert collector.out.setups == []
    with pytest.raises(StreamError, match="ended in between sections"):
        collector.parser.close()
    for i in range(10, fmt.MAX_BLOCKS - 1):
        collector.push(lstr(b"b%d" % i) + be64(PAGE_SIZE))
    # The 256th block does not reach the total: a 257th would be needed.
    with pytest.raises(StreamError, match=f"more than {fmt.MAX_BLOCKS} RAM blocks"):
        collector.push(lstr(b"last") + be64(PAGE_SIZE))
    assert collector.out.setups == []


# ---------------------------------------------------------------------------- real QEMU 7.2

MAIN_SIZE = 65544 * 1024
MAIN_PAGES = MAIN_SIZE // PAGE_SIZE
COMMON_ARGS = ["-accel", "tcg", "-cpu", "max", "-display", "none", "-nodefaults",
               "-no-user-config"]
VARIANTS = {
    "guest": (),
    "devices": ("-device", "VGA", "-device", "e1000"),   # VGA memory and two option ROMs
}
RUN_BEFORE_MIGRATE = 1.0     # seconds of guest run time before the capture
SETTLE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Capture:
    """A stream a real source QEMU sent, and the oracle's reading of it."""

    variant: str
    data: bytes
    kernel: Path
    extra: tuple[str, ...]
    walk: Walk


async def wait_socket(path: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"QEMU exited: {log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"QEMU opened no socket {path}")
        await asyncio.sleep(0.01)


async def migration_settled(q: qmp.Qmp) -> dict:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while (info := await q.execute("query-migrate")).get("status") not in (
            "completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"migration still {info}"
        await asyncio.sleep(0.01)
    return info


@contextlib.contextmanager
def qemu(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def capture(directory: Path, variant: str, kernel: Path) -> Capture:
    directory.mkdir()
    sock, out, log = directory / "qmp.sock", directory / "stream.bin", directory / "qemu.log"
    extra = VARIANTS[variant]
    argv = ["qemu-system-x86_64", "-machine", "pc", "-m", "65544K", *COMMON_ARGS,
            "-kernel", str(kernel), "-qmp", f"unix:{sock},server=on,wait=off", *extra]
    with qemu(argv, log) as proc:
        await wait_socket(sock, proc, log)
        async with qmp.connect(sock) as q:
            await q.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]})
            await q.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
            await asyncio.sleep(RUN_BEFORE_MIGRATE)  # the guest's mailbox is checked below
            await q.execute("migrate", {"uri": f"exec:cat > {out}"})
            info = await migration_settled(q)
            assert info["status"] == "completed", info
    data = out.read_bytes()
    return Capture(variant, data, kernel, extra, walk(data, "pc.ram"))


@pytest.fixture(scope="session")
def captures() -> Iterator[dict[str, Capture]]:
    """One stream per variant, captured once per session (both QEMUs at the same time)."""
    kernel = build_guest(GuestConfig())
    directory = Path(tempfile.mkdtemp(prefix="ferry-stream-"))
    try:
        async def both() -> list[Capture]:
            return await asyncio.gather(*(capture(directory / v, v, kernel)
                                          for v in VARIANTS))

        yield {c.variant: c for c in asyncio.run(both())}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=list(VARIANTS))
def captured(request, captures) -> Capture:
    return captures[request.param]


def main_image(parsed: Parsed) -> bytearray:
    """The main block as the records leave it, applied in stream order."""
    image = bytearray(MAIN_SIZE)
    for index, page in parsed.pages:
        image[index * PAGE_SIZE:(index + 1) * PAGE_SIZE] = page or bytes(PAGE_SIZE)
    return image


def expect_walk(out: Parsed, c: Capture) -> None:
    w, data = c.walk, c.data
    assert bytes(out.forward) == bytes(w.forward)
    assert out.pages == [(i, None if at is None else data[at:at + PAGE_SIZE])
                         for i, at in w.pages]
    assert out.setups == [tuple(w.blocks)] and out.setup_marks == [w.setup_mark]
    assert out.sections == w.sections and out.section_marks == w.section_marks
    assert all(got <= limit for got, limit in zip(out.page_marks, w.page_marks, strict=True))


@pytest.mark.qemu
def test_captured_stream_fed_whole(captured, backend):
    c, w = captured, captured.walk
    out = parse(c.data, main_size=MAIN_SIZE)
    expect_walk(out, c)
    # Each offset is where that record's 4 KiB sit in the stream (the buffer held it all).
    assert out.offsets == [fmt.ZERO_PAGE_OFFSET if at is None else at for _, at in w.pages]
    # The first pass sends every page of the main block; some come again later.
    assert {i for i, _ in out.pages} == set(range(MAIN_PAGES))
    assert len(out.pages) >= MAIN_PAGES
    # Every input byte is a main-block record or forwarded; the forward stream adds only
    # the capabilities subsection and a be64 address per block.
    added = len(CAPS) + 8 * len(w.blocks)
    assert len(out.forward) + w.record_bytes == len(c.data) + added
    # Sections: PARTs, then END last, then device state; RAM complete.
    kinds = [kind for kind, _ in out.sections]
    assert kinds[-1] is Section.END and set(kinds[:-1]) <= {Section.PART}
    assert [n for _, n in out.sections] == list(range(1, len(kinds) + 1))
    assert out.events[-1] == "forward" and "END" in out.events
    assert c.data[w.ram_end] == Section.FULL and bytes(out.forward).endswith(c.data[w.ram_end:])


@pytest.mark.qemu
def test_captured_stream_fed_in_odd_chunks(captured, backend):
    """Chunks of odd sizes through feed() and space()/commit(), a small buffer (it moves
    its contents down) and a short page list: the same output as fed whole."""
    c = captured
    whole = parse(c.data, main_size=MAIN_SIZE)
    for sizes, max_pages in (([1, 4093, 7, 4103, 65537, 13], 7),
                             ([stream.MIN_SPACE, 9973], stream.DEFAULT_MAX_PAGES)):
        out = parse(c.data, cut(c.data, sizes), main_size=MAIN_SIZE, max_pages=max_pages,
                    buffer_size=MIN_BUFFER, alternate=True)
        assert out.result() == whole.result()
        expect_walk(out, c)


@pytest.mark.qemu
def test_captured_blocks_and_guest_state(captures):
    guest, devices = captures["guest"], captures["devices"]
    names = {v: [b.name for b in c.walk.blocks] for v, c in captures.items()}
    for v in VARIANTS:
        assert names[v][0] == "pc.ram" and c_size(captures[v], "pc.ram") == MAIN_SIZE
        assert {"pc.bios", "pc.rom", "/rom@etc/acpi/tables"} <= set(names[v])
    assert not any("vga" in n for n in names["guest"])
    vram = [n for n in names["devices"] if n.endswith("/vga.vram")]
    assert vram and c_size(devices, vram[0]) == 16 << 20
    roms = [n for n in names["devices"] if n.endswith(".rom") and n != "pc.rom"]
    assert any(n.endswith("/vga.rom") for n in roms) and any("e1000" in n for n in roms)
    # VGA memory and ROM pages are carried in the forward stream (and walk put them there).
    assert all(devices.walk.records[n] > 0 for n in [vram[0], *roms])
    assert guest.walk.records["pc.bios"] > 0


@pytest.mark.qemu
def test_captured_main_block_pages(captured):
    """The pages of pc.ram: each sent once in the first pass, again only where the guest
    wrote meanwhile (its working set and mailbox); the image they leave is a running
    guest's."""
    out = parse(captured.data, main_size=MAIN_SIZE)
    sent = Counter(index for index, _ in out.pages)
    assert set(sent) == set(range(MAIN_PAGES))
    again = {index for index, n in sent.items() if n > 1}
    assert MAILBOX_PAGE in again and again <= guest_pages(GuestConfig())
    image = main_image(out)
    assert all(any(image[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
               for i in [*GuestConfig().ws_pages_range, MAILBOX_PAGE, KERNEL_ADDR // PAGE_SIZE])
    state = read_mailbox(image)
    assert state.running and state.errors == 0 and state.heartbeat > 0


def c_size(c: Capture, name: str) -> int:
    return {b.name: b.size for b in c.walk.blocks}[name]


@pytest.mark.qemu
def test_destination_qemu_takes_the_forward_stream(captured):
    """A destination with x-ignore-shared over its own RAM file gets the main block's pages
    there and the forward stream on its socket: it completes, and the guest runs on."""
    c = captured
    out = parse(c.data, cut(c.data, [65536]), main_size=MAIN_SIZE)
    image = main_image(out)
    directory = Path(tempfile.mkdtemp(prefix="ferry-dst-"))
    ram = Path("/dev/shm") / f"ferry-stream-test-{os.getpid()}-{secrets.token_hex(4)}.ram"
    try:
        with open(ram, "wb") as f:   # a fresh file: ZERO pages stay holes
            f.truncate(MAIN_SIZE)
            for i in range(MAIN_PAGES):
                page = image[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                if any(page):
                    f.seek(i * PAGE_SIZE)
                    f.write(page)
        with open(ram, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            asyncio.run(run_destination(directory, ram, view, c, bytes(out.forward),
                                        read_mailbox(image)))
    finally:
        ram.unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)


async def run_destination(directory: Path, ram: Path, view: mmap.mmap, c: Capture,
                          forward: bytes, expected: MailboxState) -> None:
    sock, incoming, log = directory / "qmp.sock", directory / "in.sock", directory / "qemu.log"
    argv = ["qemu-system-x86_64", "-machine", "pc,memory-backend=pc.ram", "-m", "65544K",
            "-object", f"memory-backend-file,id=pc.ram,size=65544K,mem-path={ram},share=on",
            *COMMON_ARGS, "-kernel", str(c.kernel),
            "-qmp", f"unix:{sock},server=on,wait=off", *c.extra, "-S", "-incoming", "defer"]
    with qemu(argv, log) as proc:
        await wait_socket(sock, proc, log)
        async with qmp.connect(sock) as q:
            await q.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": True}]})
            await q.execute("migrate-incoming", {"uri": f"unix:{incoming}"})
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(incoming))
                await asyncio.get_running_loop().run_in_executor(None, s.sendall, forward)
            info = await migration_settled(q)
            assert info["status"] == "completed", (info, log.read_text(errors="replace"))
            before = read_mailbox(view)
            assert before == expected   # QEMU loaded the rest without touching the RAM file
            await q.execute("cont")
            assert (await q.execute("query-status"))["status"] == "running"
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while (now := read_mailbox(view)).heartbeat < before.heartbeat + 100:
                assert time.monotonic() < deadline, f"the guest does not run on: {now}"
                await asyncio.sleep(0.01)
            assert now.running and now.errors == 0 and now.passes >= before.passes
        assert proc.poll() is None

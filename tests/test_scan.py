"""The native page scanner against its pure-Python twin, on generated pages."""

from __future__ import annotations

import mmap
import random
from array import array

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from agent._native import scan as native
from agent.memory import _scan_py as twin
from agent.memory import scan as selected

PAGE = twin.PAGE_SIZE
HASH = twin.HASH_SIZE
BACKENDS = [pytest.param(native, id="native"), pytest.param(twin, id="python")]
# The same non-zero pattern for every "same" page, so equal pages get equal hashes.
SAME_PAGE = bytes(range(256)) * (PAGE // 256)


def make_page(kind: tuple) -> bytes:
    """A page from a generated description: zero, same, random(seed), or one byte set."""
    if kind[0] == "zero":
        return bytes(PAGE)
    if kind[0] == "same":
        return SAME_PAGE
    if kind[0] == "random":
        return random.Random(kind[1]).randbytes(PAGE)
    page = bytearray(PAGE)
    page[kind[1]] = kind[2]
    return bytes(page)


page_kinds = st.one_of(
    st.just(("zero",)),
    st.just(("same",)),
    st.tuples(st.just("random"), st.integers(0, 2**32)),
    # A zero page but for one byte: the zero check must look at every byte.
    st.tuples(st.just("one-byte"), st.integers(0, PAGE - 1), st.integers(1, 255)),
)
sent_kinds = st.sampled_from(["match", "zero", "random"])


@st.composite
def scan_inputs(draw):
    """(page kinds, what sent holds per page, data ranges or None, threads): small to print."""
    kinds = draw(st.lists(page_kinds, min_size=1, max_size=24))
    sent = draw(st.lists(st.one_of(st.sampled_from(["match", "zero"]),
                                   st.binary(min_size=HASH, max_size=HASH)),
                         min_size=len(kinds), max_size=len(kinds)))
    ranges = None
    if draw(st.booleans()):
        data = draw(st.lists(st.booleans(), min_size=len(kinds), max_size=len(kinds)))
        ranges = twin.runs(page for page, has_data in enumerate(data) if has_data)
    return kinds, sent, ranges, draw(st.integers(1, 4))


def build(kinds, sent_spec=()):
    """The buffer and sent hashes a generated description stands for."""
    buf = b"".join(make_page(kind) for kind in kinds)
    sent = bytearray()
    for page, how in enumerate(sent_spec):
        if how == "match":
            sent += expected_hash(buf[page * PAGE:(page + 1) * PAGE])
        elif how == "zero":
            sent += twin.ZERO_PAGE_HASH
        else:
            sent += how
    return buf, bytes(sent)


def expected_hash(page: bytes) -> bytes:
    return xxhash.xxh3_128_intdigest(page).to_bytes(HASH, "little")


@settings(max_examples=150, deadline=None)
@given(scan_inputs())
def test_scan_native_matches_twin(inputs):
    kinds, sent_spec, ranges, threads = inputs
    buf, sent = build(kinds, sent_spec)
    npages = len(buf) // PAGE
    current_native = bytearray(npages * HASH)
    current_twin = bytearray(npages * HASH)
    dirty_native = native.scan(buf, sent, current_native, threads=threads, ranges=ranges)
    dirty_twin = twin.scan(buf, sent, current_twin, threads=threads, ranges=ranges)
    assert current_native == current_twin
    assert dirty_native == dirty_twin
    assert dirty_native.typecode == "Q"
    # The twin itself against the definition: holes hash as zero pages.
    data_ranges = [(0, npages)] if ranges is None else ranges
    holes = set(range(npages)) - {p for first, n in data_ranges for p in range(first, first + n)}
    for page in range(npages):
        content = bytes(PAGE) if page in holes else buf[page * PAGE:(page + 1) * PAGE]
        assert current_twin[page * HASH:(page + 1) * HASH] == expected_hash(content)
    hashes = [(current_twin[p * HASH:(p + 1) * HASH], sent[p * HASH:(p + 1) * HASH])
              for p in range(npages)]
    assert list(dirty_twin) == [p for p, (now, then) in enumerate(hashes) if now != then]


@settings(max_examples=60, deadline=None)
@given(scan_inputs())
def test_hash_and_zero_pages_native_match_twin(inputs):
    kinds, _, _, threads = inputs
    buf, _ = build(kinds)
    npages = len(buf) // PAGE
    assert native.hash_pages(buf, threads=threads) == twin.hash_pages(buf, threads=threads)
    out = bytearray(npages * HASH)
    native.hash_pages_into(buf, out, threads=threads)
    assert out == twin.hash_pages(buf)
    assert native.zero_pages(buf) == twin.zero_pages(buf)
    some = [p for p in range(npages) if p % 3 != 1][::-1]
    assert native.zero_pages(buf, some) == twin.zero_pages(buf, some)


def test_many_pages_with_holes_over_threads():
    rng = random.Random(7)
    npages = 333
    buf = b"".join(make_page(rng.choice([("zero",), ("same",), ("random", rng.random())]))
                   for _ in range(npages))
    sent = twin.hash_pages(buf)
    for page in rng.sample(range(npages), 40):
        sent[page * HASH:(page + 1) * HASH] = bytes(HASH)
    # Data only in the last third: the threads must still share out those pages.
    ranges = [(5, 3), (222, npages - 222)]
    expected_current = bytearray(npages * HASH)
    expected = twin.scan(buf, sent, expected_current, ranges=ranges)
    for threads in (1, 2, 3, 4, 64):
        current = bytearray(npages * HASH)
        assert native.scan(buf, sent, current, threads=threads, ranges=ranges) == expected
        assert current == expected_current


def test_hash_layout_is_xxh3_128_low64_then_high64():
    page = random.Random(1).randbytes(PAGE)
    digest = xxhash.xxh3_128_intdigest(page)
    for backend in (native, twin):
        h = bytes(backend.hash_pages(page))
        assert int.from_bytes(h[:8], "little") == digest & (2**64 - 1)
        assert int.from_bytes(h[8:], "little") == digest >> 64
        assert backend.ZERO_PAGE_HASH == expected_hash(bytes(PAGE))


def test_selector_names_its_backend():
    assert selected.BACKEND in ("native", "python")
    expected = native if selected.BACKEND == "native" else twin
    assert selected.scan is expected.scan


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, PAGE - 1, PAGE + 1, 3 * PAGE + 8])
def test_partial_pages_rejected(backend, length):
    buf = bytes(length)
    npages = length // PAGE
    with pytest.raises(ValueError):
        backend.page_count(buf)
    with pytest.raises(ValueError):
        backend.hash_pages(buf)
    with pytest.raises(ValueError):
        backend.scan(buf, bytes(npages * HASH), bytearray(npages * HASH))
    with pytest.raises(ValueError):
        backend.zero_pages(buf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_rejected(backend):
    buf = bytes(4 * PAGE)
    hashes = bytes(4 * HASH)
    with pytest.raises(ValueError):
        backend.scan(buf, hashes[:-1], bytearray(4 * HASH))
    with pytest.raises(ValueError):
        backend.scan(buf, hashes, bytearray(5 * HASH))
    with pytest.raises(ValueError):
        backend.hash_pages(buf, threads=0)
    with pytest.raises(ValueError):
        backend.hash_pages_into(buf, bytearray(3 * HASH))
    for bad_ranges in ([(0, 5)], [(2, 1), (1, 1)], [(0, 2), (1, 2)], [(3, -1)]):
        with pytest.raises(ValueError):
            backend.scan(buf, hashes, bytearray(4 * HASH), ranges=bad_ranges)
    with pytest.raises(ValueError):
        backend.zero_pages(buf, [4])
    with pytest.raises(ValueError):
        backend.indices_to_bitmap([9], 9)
    with pytest.raises(ValueError):
        backend.bitmap_to_indices(b"\x00", 9)
    with pytest.raises(ValueError):
        backend.runs([3, 3])
    with pytest.raises(ValueError):
        backend.runs([3, 1])
    with pytest.raises(ValueError):
        backend.soft_dirty_indices(bytes(12))
    with pytest.raises(ValueError):
        backend.extent_pages([(8192, 10), (0, 10)], 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_buffer_has_no_pages(backend):
    assert backend.page_count(b"") == 0
    assert backend.hash_pages(b"", threads=4) == bytearray()
    assert backend.scan(b"", b"", bytearray(), threads=3) == array("Q")
    assert backend.zero_pages(b"") == array("Q")


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_mmap_accepted(backend, tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(bytes(PAGE) + SAME_PAGE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as ram:
        assert backend.zero_pages(ram) == array("Q", [0])
        assert backend.scan(ram, bytes(2 * HASH), bytearray(2 * HASH), threads=2) == \
            array("Q", [0, 1])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 199), unique=True).map(sorted), st.integers(200, 220))
def test_bitmaps_and_runs_native_match_twin(indices, npages):
    bitmap = native.indices_to_bitmap(indices, npages)
    assert bitmap == twin.indices_to_bitmap(indices, npages)
    assert len(bitmap) == (npages + 7) // 8
    assert list(native.bitmap_to_indices(bitmap, npages)) == indices
    assert twin.bitmap_to_indices(bitmap, npages) == native.bitmap_to_indices(bitmap, npages)
    assert native.runs(indices) == twin.runs(indices)
    assert native.run_indices(native.runs(indices)) == array("Q", indices)
    assert twin.run_indices(twin.runs(indices)) == array("Q", indices)
    assert [p for first, n in native.runs(indices) for p in range(first, first + n)] == indices


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_indices_lists_every_page_of_each_run(backend):
    assert backend.run_indices([(3, 2), (10, 0), (7, 3)]) == array("Q", [3, 4, 7, 8, 9])
    assert backend.run_indices(iter([])) == array("Q")
    assert len(backend.run_indices([(1 << 40, 100_000)])) == 100_000
    with pytest.raises(OverflowError):
        backend.run_indices([(-1, 2)])


def test_bitmap_bits_past_npages_ignored():
    for backend in (native, twin):
        assert backend.bitmap_to_indices(b"\xff\xff", 10) == array("Q", range(10))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3 * PAGE), st.integers(0, 3 * PAGE)), max_size=8),
       st.integers(0, 40))
def test_extent_pages_native_matches_twin(gaps_and_lengths, npages):
    extents = []
    offset = 0
    for gap, length in gaps_and_lengths:
        offset += gap
        extents.append((offset, length))
        offset += length
    pages = native.extent_pages(extents, npages)
    assert pages == twin.extent_pages(extents, npages)
    covered = {p for first, n in pages for p in range(first, first + n)}
    for offset, length in extents:
        for byte in (offset, offset + length - 1):
            if length and byte // PAGE < npages:
                assert byte // PAGE in covered


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=64))
def test_soft_dirty_indices_native_matches_twin(entries):
    pagemap = b"".join(e.to_bytes(8, "little") for e in entries)
    expected = array("Q", [i for i, e in enumerate(entries) if e >> 55 & 1])
    assert native.soft_dirty_indices(pagemap) == expected
    assert twin.soft_dirty_indices(pagemap) == expected

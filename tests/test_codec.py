"""Page-batch codec: roundtrips over many rounds, COPY order, strict parsing, twin equivalence."""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import random
import struct
from array import array
from contextlib import contextmanager

import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.batch import _codec_py, codec
from agent.batch import format as fmt
from agent.errors import BatchError, ProtocolError

try:
    from agent._native import codec as native
except ImportError:  # not built: the twin still runs
    native = None

needs_native = pytest.mark.skipif(native is None, reason="native codec not built")
BACKENDS = [pytest.param(_codec_py, id="python"),
            pytest.param(native, id="native", marks=needs_native)]


@contextmanager
def use_backend(impl):
    saved = codec._backend
    codec._backend = impl
    try:
        yield
    finally:
        codec._backend = saved


@pytest.fixture(params=BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


def fresh_sent(nblocks: int, bs: int) -> bytearray:
    return bytearray(codec.zero_block_hash(bs) * nblocks)


def text_block(rng: random.Random, bs: int) -> bytes:
    words = [b"kernel", b"page", b"the", b"ferry", b"migrate", b"0x7f", b"\n", b"lorem"]
    out = b" ".join(rng.choice(words) for _ in range(bs // 3))
    return out[:bs].ljust(bs, b".")


def guest_block(rng: random.Random, bs: int, src: bytearray, nblocks: int) -> bytes:
    """Zero, random, text, sparse or a duplicate of another block: what guest RAM holds."""
    kind = rng.randrange(5)
    if kind == 0:
        return bytes(bs)
    if kind == 1:
        return rng.randbytes(bs)
    if kind == 2:
        return text_block(rng, bs)
    if kind == 3:
        return rng.randbytes(16).ljust(bs, b"\0")
    j = rng.randrange(nblocks)
    return bytes(src[j * bs:(j + 1) * bs])


def sync(encoder: codec.BatchEncoder, indices, dst, nblocks: int, bs: int):
    """Encode, decode and apply every batch for indices; the batches in order."""
    out = []
    pos = 0
    while pos < len(indices):
        batch, pos = encoder.encode(indices, pos)
        decoded = codec.decode_batch(batch.payload, nblocks, bs)
        codec.apply_batch(decoded, dst)
        out.append((batch, decoded))
    return out


def kinds(decoded: codec.DecodedBatch) -> list[tuple[str, int, int | None]]:
    return [(e.kind.name, e.block, e.source) for e in decoded]


# ---- hashes -----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", BACKENDS)
def test_block_hash_is_xxh3_128_low_then_high_little_endian(impl):
    for block in (b"", b"abc", bytes(4096), random.Random(1).randbytes(65536)):
        want = xxhash.xxh3_128_intdigest(block).to_bytes(16, "little")
        assert impl.block_hash(block) == want


def test_zero_block_hash_per_block_size():
    for bs in (512, 4096, 65536):
        assert codec.zero_block_hash(bs) == xxhash.xxh3_128_intdigest(bytes(bs)).to_bytes(
            16, "little")
    with pytest.raises(ValueError):
        codec.zero_block_hash(3000)


@needs_native
def test_native_probe_window_matches_twin():
    assert native.PROBE_LIMIT == _codec_py.PROBE_LIMIT


def test_batch_error_is_a_protocol_error():
    assert issubclass(BatchError, ProtocolError)


# ---- roundtrips -------------------------------------------------------------------------

@pytest.mark.parametrize("bs", [512, 4096])
@pytest.mark.parametrize("dedup", [True, False])
def test_many_rounds_keep_destination_equal_to_source(backend, bs, dedup):
    rng = random.Random(bs + dedup)
    nblocks = 48
    src = bytearray(nblocks * bs)
    dst = bytearray(nblocks * bs)
    sent = fresh_sent(nblocks, bs)
    encoder = codec.BatchEncoder(src, bs, sent, dedup=dedup, max_data_bytes=5 * bs,
                                 max_entries=9)
    for _ in range(25):
        changed = rng.sample(range(nblocks), rng.randrange(1, nblocks // 2))
        for i in changed:
            src[i * bs:(i + 1) * bs] = guest_block(rng, bs, src, nblocks)
        # The scan may report unchanged blocks and the same block twice, in any order.
        dirty = changed + rng.sample(range(nblocks), 5) + changed[:2]
        rng.shuffle(dirty)
        batches = sync(encoder, array("Q", dirty), dst, nblocks, bs)
        assert dst == src
        assert sent == b"".join(codec.block_hash(src[i * bs:(i + 1) * bs])
                                for i in range(nblocks))
        for batch, decoded in batches:
            assert batch.entry_count <= 9 and batch.data_count * bs <= 5 * bs
            assert decoded.entry_count == batch.entry_count
            if not dedup:
                assert batch.copy_count == 0


def test_round_zero_skips_zero_blocks_and_dedups(backend):
    bs, nblocks = 4096, 16
    rng = random.Random(3)
    a, b = rng.randbytes(bs), text_block(rng, bs)
    src = bytearray(nblocks * bs)
    for i, content in {1: a, 2: b, 5: a, 9: a, 11: b}.items():
        src[i * bs:(i + 1) * bs] = content
    sent = fresh_sent(nblocks, bs)
    dst = bytearray(nblocks * bs)
    [(batch, decoded)] = sync(codec.BatchEncoder(src, bs, sent), array("Q", range(nblocks)),
                              dst, nblocks, bs)
    assert dst == src
    assert (batch.unchanged_count, batch.zero_count) == (11, 0)
    assert kinds(decoded) == [("DATA", 1, None), ("DATA", 2, None), ("COPY", 5, 1),
                              ("COPY", 9, 5), ("COPY", 11, 2)]


def test_unchanged_blocks_produce_no_entries(backend):
    bs, nblocks = 512, 8
    src = bytearray(random.Random(4).randbytes(nblocks * bs))
    sent = fresh_sent(nblocks, bs)
    encoder = codec.BatchEncoder(src, bs, sent)
    dst = bytearray(nblocks * bs)
    sync(encoder, array("Q", range(nblocks)), dst, nblocks, bs)
    batch, pos = encoder.encode(array("Q", [3, 3, 0, 7]))
    assert (batch.entry_count, batch.unchanged_count, pos) == (0, 4, 4)
    assert codec.decode_batch(batch.payload, nblocks, bs).entry_count == 0


def test_copy_waits_for_its_source_in_the_same_batch(backend):
    bs, nblocks = 512, 4
    rng = random.Random(5)
    a, b = rng.randbytes(bs), rng.randbytes(bs)
    src = bytearray(nblocks * bs)
    src[0:bs] = a
    sent = fresh_sent(nblocks, bs)
    dst = bytearray(nblocks * bs)
    encoder = codec.BatchEncoder(src, bs, sent)
    sync(encoder, array("Q", [0]), dst, nblocks, bs)
    # Block 1 takes block 0's old content while block 0 changes.
    src[bs:2 * bs], src[0:bs] = a, b
    [(_, decoded)] = sync(encoder, array("Q", [1, 0]), dst, nblocks, bs)
    assert kinds(decoded) == [("COPY", 1, 0), ("DATA", 0, None)]
    assert dst == src
    # Other order: block 0 no longer holds a when block 1 is encoded, so no COPY from it.
    src[2 * bs:3 * bs], src[0:bs] = b, a
    [(_, decoded)] = sync(encoder, array("Q", [0, 2]), dst, nblocks, bs)
    assert kinds(decoded) == [("COPY", 0, 1), ("DATA", 2, None)]
    assert dst == src


def test_copy_source_changed_in_a_later_batch(backend):
    bs, nblocks = 512, 4
    rng = random.Random(6)
    a, b = rng.randbytes(bs), rng.randbytes(bs)
    src = bytearray(nblocks * bs)
    src[0:bs] = a
    sent = fresh_sent(nblocks, bs)
    dst = bytearray(nblocks * bs)
    encoder = codec.BatchEncoder(src, bs, sent, max_entries=1)
    sync(encoder, array("Q", [0]), dst, nblocks, bs)
    src[bs:2 * bs], src[0:bs] = a, b
    batches = sync(encoder, array("Q", [1, 0]), dst, nblocks, bs)
    assert [kinds(d) for _, d in batches] == [[("COPY", 1, 0)], [("DATA", 0, None)]]
    assert dst == src
    # Block 1 changes again: a later COPY of its old content must not come from it.
    src[bs:2 * bs], src[3 * bs:] = b, a
    batches = sync(encoder, array("Q", [1, 3]), dst, nblocks, bs)
    assert [kinds(d) for _, d in batches] == [[("COPY", 1, 0)], [("DATA", 3, None)]]
    assert dst == src


def test_compression_only_when_it_shrinks(backend):
    bs, nblocks = 4096, 8
    rng = random.Random(7)
    src = bytearray(b"".join(text_block(rng, bs) for _ in range(4)) + rng.randbytes(4 * bs))
    for level, indices, compressed in ((1, range(4), True), (1, range(4, 8), False),
                                       (None, range(4), False)):
        sent = fresh_sent(nblocks, bs)
        dst = bytearray(nblocks * bs)
        [(batch, decoded)] = sync(codec.BatchEncoder(src, bs, sent, compress_level=level),
                                  array("Q", indices), dst, nblocks, bs)
        assert batch.compressed is compressed is decoded.compressed
        assert batch.raw_data_bytes == 4 * bs
        assert (batch.nbytes < 4 * bs) is compressed
        assert dst[indices[0] * bs:(indices[-1] + 1) * bs] == src[indices[0] * bs:
                                                                  (indices[-1] + 1) * bs]


def test_budget_cuts_batches_and_resumes(backend):
    bs, nblocks = 512, 40
    src = bytearray(random.Random(8).randbytes(nblocks * bs))
    sent = fresh_sent(nblocks, bs)
    dst = bytearray(nblocks * bs)
    encoder = codec.BatchEncoder(src, bs, sent, max_data_bytes=3 * bs + 100,
                                 compress_level=None)
    batches = sync(encoder, array("Q", range(nblocks)), dst, nblocks, bs)
    assert [b.data_count for b, _ in batches] == [3] * 13 + [1]
    assert all(b.nbytes == fmt.HEADER_SIZE + b.data_count * (8 + bs) for b, _ in batches)
    # The buffer behind a payload holds the payload only, no unused (uninitialised) room.
    assert all(len(b.payload.obj) == b.nbytes for b, _ in batches)
    assert dst == src


def test_disk_blocks_from_an_extent_buffer(backend):
    bs, nblocks = 65536, 8
    rng = random.Random(9)
    disk = bytearray(rng.randbytes(nblocks * bs))
    disk[2 * bs:3 * bs] = bytes(bs)
    disk[5 * bs:6 * bs] = disk[3 * bs:4 * bs]
    sent = bytearray(codec.block_hash(b"\1" * bs) * nblocks)  # destination image unknown
    encoder = codec.BatchEncoder(None, bs, sent)
    target = bytearray(b"\1" * nblocks * bs)
    extent = bytes(disk[2 * bs:6 * bs])  # as read over NBD
    batch, pos = encoder.encode(array("Q", [2, 3, 4, 5]), src=extent, base=2)
    assert pos == 4
    decoded = codec.decode_batch(bytes(batch.payload), nblocks, bs)
    assert kinds(decoded) == [("ZERO", 2, None), ("DATA", 3, None), ("DATA", 4, None),
                              ("COPY", 5, 3)]
    for entry in decoded:  # what an NBD writer does with the entries
        at = entry.block * bs
        if entry.kind == codec.EntryKind.ZERO:
            target[at:at + bs] = bytes(bs)
        elif entry.kind == codec.EntryKind.COPY:
            target[at:at + bs] = target[entry.source * bs:(entry.source + 1) * bs]
        else:
            target[at:at + bs] = entry.data
    assert target[2 * bs:6 * bs] == disk[2 * bs:6 * bs]
    with pytest.raises(ValueError):
        encoder.encode(array("Q", [6]), src=extent, base=2)


@pytest.mark.parametrize("level", [None, 1])
def test_encode_into_a_reused_buffer_with_a_prefix(backend, level):
    """The payload is the prefix then the same batch as without a buffer; the buffer is
    reused for the next batch; compressed batches are new bytes, also with the prefix."""
    bs, nblocks = 4096, 12
    rng = random.Random(10)
    src = bytearray(b"".join(text_block(rng, bs) for _ in range(6)) + rng.randbytes(6 * bs))
    src[3 * bs:4 * bs] = bytes(bs)
    src[8 * bs:9 * bs] = src[7 * bs:8 * bs]

    def encoder():
        return codec.BatchEncoder(src, bs, fresh_sent(nblocks, bs), compress_level=level,
                                  max_data_bytes=4 * bs, max_entries=5)

    plain, into_encoder = encoder(), encoder()
    prefix = b"\x07\x00"
    into = bytearray(b"\xee" * into_encoder.buffer_size(prefix))
    indices = array("Q", range(nblocks))
    position = into_position = 0
    while position < nblocks:
        expected, position = plain.encode(indices, position)
        batch, into_position = into_encoder.encode(indices, into_position, into=into,
                                                   prefix=prefix)
        assert into_position == position
        assert bytes(batch.payload) == prefix + bytes(expected.payload)
        if not batch.compressed:
            assert batch.payload.obj is into and batch.payload.readonly
        del batch  # nothing views the buffer: it can take the next batch
    small = bytearray(into_encoder.buffer_size(prefix) - 1)
    with pytest.raises(ValueError, match="a batch needs"):
        encoder().encode(indices, 0, into=small, prefix=prefix)


def test_encode_in_place_from_the_buffers_own_data_section(backend):
    """Blocks read into `into` at data_offset() are encoded there: DATA moves down past
    the ZERO, COPY and unchanged blocks, and the batch rebuilds every block."""
    bs, nblocks, base = 4096, 16, 5
    rng = random.Random(11)
    disk = bytearray(rng.randbytes(nblocks * bs))
    disk[2 * bs:3 * bs] = bytes(bs)                      # ZERO
    disk[7 * bs:8 * bs] = disk[4 * bs:5 * bs]            # COPY of a block before it
    total = base + nblocks
    sent = fresh_sent(total, bs)
    sent[(base + 10) * fmt.HASH_SIZE:(base + 11) * fmt.HASH_SIZE] = \
        codec.block_hash(bytes(disk[10 * bs:11 * bs]))  # unchanged: already there
    sent[(base + 2) * fmt.HASH_SIZE:(base + 3) * fmt.HASH_SIZE] = \
        codec.block_hash(b"\1" * bs)                     # not zero there yet
    encoder = codec.BatchEncoder(None, bs, sent, compress_level=None,
                                 max_data_bytes=nblocks * bs, max_entries=nblocks)
    prefix = b"\x01\x00"
    into = bytearray(encoder.buffer_size(prefix))
    at = encoder.data_offset(prefix)
    into[at:at + nblocks * bs] = disk
    with memoryview(into)[at:at + nblocks * bs] as blocks:
        batch, position = encoder.encode(array("Q", range(base, total)), src=blocks, base=base,
                                         into=into, prefix=prefix)
    assert position == nblocks and batch.payload.obj is into
    assert (batch.zero_count, batch.copy_count, batch.data_count) == (1, 1, 13)
    target = bytearray(b"\1" * total * bs)
    target[(base + 10) * bs:(base + 11) * bs] = disk[10 * bs:11 * bs]
    codec.decode_and_apply(bytes(batch.payload)[len(prefix):], target, total, bs)
    assert target[base * bs:] == disk


def test_bad_index_ends_the_batch_before_it(backend):
    bs, nblocks = 512, 4
    src = bytearray(random.Random(10).randbytes(nblocks * bs))
    sent = fresh_sent(nblocks, bs)
    encoder = codec.BatchEncoder(src, bs, sent)
    batch, pos = encoder.encode(array("Q", [0, 1, 9, 2]))
    assert (batch.entry_count, pos) == (2, 2)
    before = bytes(sent)
    with pytest.raises(ValueError):
        encoder.encode(array("Q", [0, 1, 9, 2]), pos)
    assert sent == before


# ---- blocks at offsets in a stream buffer (QEMU's page records) -------------------------

ZERO_OFFSET = fmt.ZERO_OFFSET


def offsets_of(*values: int) -> array:
    return array("Q", values)


def test_offsets_place_blocks_anywhere_in_src(backend):
    """Blocks at unaligned offsets among other bytes, ZERO_OFFSET blocks with no bytes at
    all, a block given twice (the later one wins): decode_and_apply rebuilds them."""
    bs, nblocks = 4096, 8
    rng = random.Random(20)
    a, b, c = rng.randbytes(bs), text_block(rng, bs), rng.randbytes(bs)
    # As in a stream: a record header before each page, pages not on any block boundary.
    src = b"\x11" * 13 + a + b"\x22" * 9 + b + b"\x33" * 3 + c + b + b"\x44" * 5
    at_a, at_b = 13, 13 + bs + 9
    at_c = at_b + bs + 3
    indices = array("Q", [3, 0, 5, 6, 3, 7, 1, 2])
    offsets = offsets_of(at_a, ZERO_OFFSET, at_b, at_c + bs, at_c, ZERO_OFFSET, at_b,
                         ZERO_OFFSET)
    sent = fresh_sent(nblocks, bs)
    dirty = codec.block_hash(b"\x01" * bs)
    for i in (0, 7):   # the destination holds something else there: ZERO entries needed
        sent[i * fmt.HASH_SIZE:(i + 1) * fmt.HASH_SIZE] = dirty
    dst = bytearray(b"\x01" * bs) + bytearray(6 * bs) + bytearray(b"\x01" * bs)
    encoder = codec.BatchEncoder(None, bs, sent, compress_level=None)
    batch, pos = encoder.encode(indices, src=src, offsets=offsets)
    assert pos == len(indices)
    # 0 and 7 ZERO; 3 DATA then DATA again (new content); 5 DATA; 6 COPY of 5 (b again);
    # 1 COPY of 5 too; 2 was zero there already: unchanged.
    assert (batch.zero_count, batch.copy_count, batch.data_count, batch.unchanged_count) == \
        (2, 2, 3, 1)
    assert codec.decode_and_apply(bytes(batch.payload), dst, nblocks, bs) == batch.entry_count
    want = [bytes(bs), b, bytes(bs), c, bytes(bs), b, b, bytes(bs)]
    assert [bytes(dst[i * bs:(i + 1) * bs]) for i in range(nblocks)] == want


def test_zero_offset_needs_no_source_bytes(backend):
    bs, nblocks = 512, 4
    sent = fresh_sent(nblocks, bs)
    sent[fmt.HASH_SIZE:2 * fmt.HASH_SIZE] = codec.block_hash(b"\x07" * bs)
    encoder = codec.BatchEncoder(None, bs, sent)
    batch, pos = encoder.encode(array("Q", [0, 1, 2, 1]), src=b"",
                                offsets=offsets_of(*[ZERO_OFFSET] * 4))
    assert pos == 4 and (batch.entry_count, batch.zero_count, batch.unchanged_count) == (1, 1, 3)
    dst = bytearray(nblocks * bs)
    dst[bs:2 * bs] = b"\x07" * bs
    codec.decode_and_apply(bytes(batch.payload), dst, nblocks, bs)
    assert dst == bytes(nblocks * bs) and sent == fresh_sent(nblocks, bs)


@pytest.mark.parametrize("bad", [None, 3 * 4096 + 100, 2**62, ZERO_OFFSET - 1,
                                 ZERO_OFFSET - 4096])
def test_offset_past_src_ends_the_batch(backend, bad):
    """An offset whose block does not fit in src ends the batch before it; ValueError if
    it is the first one, and nothing changes then."""
    bs, nblocks = 4096, 4
    rng = random.Random(21)
    src = rng.randbytes(3 * bs + 100)
    end = len(src) - bs  # the last offset that fits
    offsets = offsets_of(0, end, end + 1 if bad is None else bad, 100)
    indices = array("Q", [0, 1, 2, 3])
    sent = fresh_sent(nblocks, bs)
    encoder = codec.BatchEncoder(None, bs, sent)
    batch, pos = encoder.encode(indices, src=src, offsets=offsets)
    assert (pos, batch.data_count) == (2, 2)
    before = bytes(sent)
    with pytest.raises(ValueError, match="outside the source"):
        encoder.encode(indices, pos, src=src, offsets=offsets)
    assert sent == before
    batch, pos = encoder.encode(indices, 3, src=src, offsets=offsets)   # skipping it
    assert (pos, batch.data_count) == (4, 1)
    dst = bytearray(nblocks * bs)
    codec.decode_and_apply(bytes(batch.payload), dst, nblocks, bs)
    assert dst[3 * bs:] == src[100:100 + bs]


def test_offsets_checked_against_indices_and_hashes(backend):
    bs, nblocks = 512, 4
    encoder = codec.BatchEncoder(None, bs, fresh_sent(nblocks, bs))
    with pytest.raises(ValueError, match="2 offsets for 3 indices"):
        encoder.encode(array("Q", [0, 1, 2]), src=bytes(bs), offsets=offsets_of(0, 0))
    with pytest.raises(ValueError, match="outside the source"):   # block 4 of 4
        encoder.encode(array("Q", [4]), src=bytes(bs), offsets=offsets_of(ZERO_OFFSET))
    batch, pos = encoder.encode(array("Q", [1, 4]), src=b"\1" * bs, offsets=offsets_of(0, 0))
    assert (pos, batch.data_count) == (1, 1)


@needs_native
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_twin_and_native_encode_identical_bytes_with_offsets(data):
    """Random pages at random offsets of a stream-like buffer, ZERO_OFFSET entries and
    offsets past the end: the same batches, positions and hashes from native and twin, and
    applying them rebuilds every block the batches consumed."""
    bs = data.draw(st.sampled_from([512, 4096]))
    nblocks = data.draw(st.integers(1, 16))
    dedup = data.draw(st.booleans())
    level = data.draw(st.sampled_from([None, 1]))
    max_entries = data.draw(st.integers(1, 10))
    max_data = data.draw(st.integers(1, 5 * bs))
    contents = pool(bs)
    encoders, sents, dsts = [], [], []
    for impl in (native, _codec_py):
        with use_backend(impl):
            sents.append(fresh_sent(nblocks, bs))
            encoders.append(codec.BatchEncoder(None, bs, sents[-1], dedup=dedup,
                                               compress_level=level, max_data_bytes=max_data,
                                               max_entries=max_entries))
            dsts.append(bytearray(nblocks * bs))
    model = bytearray(nblocks * bs)
    for _ in range(data.draw(st.integers(1, 3))):
        src, indices, offsets = bytearray(), array("Q"), array("Q")
        for _ in range(data.draw(st.integers(1, 14))):
            src += bytes(data.draw(st.integers(0, 17)))     # a record header, say
            indices.append(data.draw(st.integers(0, nblocks - 1)))
            kind = data.draw(st.integers(0, len(contents) + 1))
            if kind == len(contents):
                offsets.append(ZERO_OFFSET)
            elif kind == len(contents) + 1:    # somewhere in what is already there
                offsets.append(data.draw(st.integers(0, len(src) + bs)))
            else:
                offsets.append(len(src))
                src += contents[kind]
        src += bytes(data.draw(st.integers(0, bs)))
        pos = [0, 0]
        while pos[0] < len(indices):
            outs = []
            for k, impl in enumerate((native, _codec_py)):
                try:
                    batch, pos[k] = encoders[k].encode(indices, pos[k], src=bytes(src),
                                                       offsets=offsets)
                except ValueError as exc:
                    outs.append(("refused", "outside the source" in str(exc)))
                    continue
                with use_backend(impl):
                    codec.decode_and_apply(bytes(batch.payload), dsts[k], nblocks, bs)
                outs.append((bytes(batch.payload), batch.entry_count, batch.zero_count,
                             batch.copy_count, batch.data_count, batch.unchanged_count,
                             batch.compressed))
            assert outs[0] == outs[1] and pos[0] == pos[1]
            assert sents[0] == sents[1]
            done = pos[0]
            if isinstance(outs[0][0], str):   # both refused the block at pos
                assert outs[0] == ("refused", True)
                off = offsets[done]
                assert off != ZERO_OFFSET and off + bs > len(src)
                done += 1                        # skip the bad one, as a caller would
                pos = [done, done]
        for i, off in zip(indices, offsets, strict=True):
            if off == ZERO_OFFSET:
                model[i * bs:(i + 1) * bs] = bytes(bs)
            elif off + bs <= len(src):
                model[i * bs:(i + 1) * bs] = src[off:off + bs]
        assert dsts[0] == dsts[1] == model


# ---- strict parsing ---------------------------------------------------------------------

BS, NBLOCKS = 512, 16


def sample_batches():
    """A destination after one round and two batches (raw and zstd) for the next round."""
    rng = random.Random(11)
    first = bytearray(NBLOCKS * BS)
    for i in range(8):
        first[i * BS:(i + 1) * BS] = rng.randbytes(BS)
    second = bytearray(first)
    second[3 * BS:4 * BS] = bytes(BS)
    second[4 * BS:5 * BS] = second[0:BS]
    second[5 * BS:6 * BS] = text_block(rng, BS)
    second[9 * BS:10 * BS] = text_block(rng, BS)
    out = []
    for level in (None, 1):
        src = bytearray(first)
        dst = bytearray(NBLOCKS * BS)
        encoder = codec.BatchEncoder(src, BS, fresh_sent(NBLOCKS, BS), compress_level=level)
        sync(encoder, array("Q", range(8)), dst, NBLOCKS, BS)
        src[:] = second
        batch, _ = encoder.encode(array("Q", [3, 4, 5, 9]))
        assert batch.compressed is (level is not None)
        assert (batch.zero_count, batch.copy_count, batch.data_count) == (1, 1, 2)
        out.append(bytes(batch.payload))
    return dst, out


def expect_refused(payload, dst, match=None, **kwargs):
    before = bytes(dst)
    with pytest.raises(BatchError, match=match):
        codec.apply_batch(codec.decode_batch(payload, NBLOCKS, BS, **kwargs), dst)
    assert dst == before


def with_header(payload: bytes, **changes) -> bytes:
    names = ("magic", "version", "shift", "flags", "entries", "copies", "raw", "wire")
    fields = dict(zip(names, fmt.HEADER.unpack_from(payload), strict=True))
    fields.update(changes)
    return fmt.HEADER.pack(*fields.values()) + payload[fmt.HEADER_SIZE:]


def with_word(payload: bytes, word_index: int, value: int) -> bytes:
    at = fmt.HEADER_SIZE + word_index * fmt.WORD_SIZE
    return payload[:at] + struct.pack("<Q", value) + payload[at + fmt.WORD_SIZE:]


def test_samples_apply(backend):
    dst, samples = sample_batches()
    for payload in samples:
        out = bytearray(dst)
        codec.apply_batch(codec.decode_batch(payload, NBLOCKS, BS), out)
        assert out[3 * BS:4 * BS] == bytes(BS) and out[4 * BS:5 * BS] == dst[0:BS]


def test_truncated_at_every_offset_or_extended(backend):
    dst, samples = sample_batches()
    for payload in samples:
        for end in range(len(payload)):
            expect_refused(payload[:end], dst)
        expect_refused(payload + b"\0", dst)


def test_header_fields_checked(backend):
    dst, samples = sample_batches()
    raw, packed = samples
    expect_refused(with_header(raw, magic=b"FBAX"), dst)
    expect_refused(with_header(raw, version=fmt.VERSION + 1), dst)
    expect_refused(with_header(raw, version=fmt.VERSION - 1), dst)
    expect_refused(with_header(raw, shift=12), dst)
    expect_refused(with_header(raw, shift=255), dst)
    expect_refused(with_header(raw, flags=0x8000), dst)
    expect_refused(with_header(raw, flags=fmt.FLAG_COMPRESSED), dst)
    expect_refused(with_header(packed, flags=0), dst)
    expect_refused(with_header(raw, entries=fmt.MAX_ENTRIES + 1), dst)
    expect_refused(with_header(raw, copies=5), dst)
    expect_refused(with_header(raw, raw=3 * BS, wire=3 * BS), dst)  # lengths disagree
    expect_refused(raw, dst, max_data_bytes=BS)


def test_entries_checked(backend):
    dst, samples = sample_batches()
    raw = samples[0]
    # Words: ZERO 3, COPY 4 <- 0, DATA 5, DATA 9.
    words = struct.unpack_from("<5Q", raw, fmt.HEADER_SIZE)
    assert [w >> fmt.KIND_SHIFT for w in words[:1] + words[1:2] + words[3:]] == [1, 2, 3, 3]
    expect_refused(with_word(raw, 0, 3), dst)  # kind 0
    expect_refused(with_word(raw, 0, (1 << fmt.KIND_SHIFT) | NBLOCKS), dst)  # index range
    expect_refused(with_word(raw, 2, NBLOCKS), dst)  # copy source range
    expect_refused(with_word(raw, 2, 4), dst)  # copy onto itself
    expect_refused(with_word(raw, 2, 1 << 63), dst)
    expect_refused(with_word(raw, 3, (1 << fmt.KIND_SHIFT) | 5), dst)  # DATA -> ZERO: data left
    expect_refused(with_word(raw, 0, (3 << fmt.KIND_SHIFT) | 3), dst)  # ZERO -> DATA: data short


def test_decompression_bombs_and_bad_frames(backend):
    dst, samples = sample_batches()
    raw, packed = samples
    head = raw[:fmt.HEADER_SIZE + 5 * fmt.WORD_SIZE]
    data = raw[len(head):]

    def with_frame(frame: bytes) -> bytes:
        return with_header(head, flags=fmt.FLAG_COMPRESSED, wire=len(frame)) + frame

    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 24))  # 16 MiB in 531 bytes
    expect_refused(with_frame(bomb), dst, match="declares 16777216 bytes")
    expect_refused(with_header(with_frame(bomb), raw=1 << 24), dst,
                   match="DATA entries need")
    expect_refused(with_frame(zstandard.ZstdCompressor().compress(data + bytes(BS))), dst,
                   match="declares")
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    expect_refused(with_frame(no_size), dst, match="declares -1")
    good = zstandard.ZstdCompressor().compress(data)
    codec.decode_batch(with_frame(good), NBLOCKS, BS)
    expect_refused(with_frame(good + b"\0"), dst, match="not a valid zstd frame")
    expect_refused(with_frame(good + good), dst, match="not a valid zstd frame")
    # A frame that declares one block but holds two, for a batch of one DATA entry.
    assert good[4] == 0x60  # single segment, 2-byte content size (value - 256)
    lying = good[:5] + struct.pack("<H", BS - 256) + good[7:]
    one_data = with_word(head, 4, (1 << fmt.KIND_SHIFT) | 9)
    expect_refused(with_header(one_data, flags=fmt.FLAG_COMPRESSED, raw=BS, wire=len(lying))
                   + lying, dst, match="not a valid zstd frame")
    frame = packed[len(head):]
    expect_refused(with_frame(frame[:-3] + bytes([frame[-3] ^ 0xFF]) + frame[-2:]), dst)


@pytest.mark.parametrize("which", ["raw", "zstd"])
def test_bit_flips_refused_or_harmless(backend, which):
    dst, samples = sample_batches()
    payload = samples[which == "zstd"]
    refused = 0
    for bit in range(len(payload) * 8):
        bad = bytearray(payload)
        bad[bit // 8] ^= 1 << (bit % 8)
        out = bytearray(dst)
        try:
            decoded = codec.decode_batch(bad, NBLOCKS, BS)
        except BatchError:
            refused += 1
            continue
        codec.apply_batch(decoded, out)  # a still well-formed batch applies cleanly
    assert refused >= fmt.HEADER_SIZE * 8 // 2


def test_apply_checks_again_and_writes_nothing(backend):
    dst, samples = sample_batches()
    decoded = codec.decode_batch(samples[0], NBLOCKS, BS)
    bad = bytearray(decoded.entries)
    bad[-8:] = struct.pack("<Q", (3 << fmt.KIND_SHIFT) | NBLOCKS)
    forged = codec.DecodedBatch(BS, NBLOCKS, decoded.entry_count, memoryview(bad),
                                decoded.data, 1, 1, 2, False)
    before = bytes(dst)
    with pytest.raises(BatchError):
        codec.apply_batch(forged, dst)
    assert dst == before
    with pytest.raises(ValueError):
        codec.apply_batch(decoded, bytearray(BS))
    with pytest.raises(ValueError):
        codec.apply_batch(decoded, bytes(dst))


@pytest.mark.parametrize("pwrite_data", [True, False], ids=["pwrite", "mapped"])
def test_apply_through_the_file_punches_zero_runs(backend, pwrite_data):
    """Into a shared file mapping with its fd: the result is what a plain buffer gets, and
    blocks that became zero are holes again (no memory held for them)."""
    bs, nblocks = 4096, 64
    rng = random.Random(8)
    guest = bytearray(nblocks * bs)
    for k in range(32):
        guest[k * bs:(k + 1) * bs] = rng.randbytes(bs)
    encoder = codec.BatchEncoder(guest, bs, fresh_sent(nblocks, bs))
    first, _ = encoder.encode(array("Q", range(nblocks)))
    guest[:16 * bs] = bytes(16 * bs)                       # a ZERO run over held blocks
    for k in range(40, 48):                                # a DATA run into holes
        guest[k * bs:(k + 1) * bs] = rng.randbytes(bs)
    guest[50 * bs:51 * bs] = guest[20 * bs:21 * bs]        # a COPY of a held block
    second, _ = encoder.encode(array("Q", range(nblocks)))
    assert second.entry_count == 16 + 8 + 1
    fd = os.memfd_create("ferry-test-ram")
    try:
        os.ftruncate(fd, nblocks * bs)
        with mmap.mmap(fd, nblocks * bs) as ram:
            for batch in (first, second):
                codec.decode_and_apply(bytes(batch.payload), ram, nblocks, bs, fd,
                                       pwrite_data=pwrite_data)
            # before anything reads the holes (a read through a mapping fills one in)
            assert os.fstat(fd).st_blocks * 512 == (16 + 8 + 1) * bs
            assert ram[:] == guest
    finally:
        os.close(fd)


# ---- stored blocks ----------------------------------------------------------------------

def letters_block(rng: random.Random, bs: int) -> bytes:
    """Random letters a..p: 4 bits of entropy per byte, what zstd halves."""
    return bytes(97 + (b & 15) for b in rng.randbytes(bs))


def stored_sample() -> tuple[bytearray, bytes]:
    """The guest (blocks 2, 5, 7: text, random, letters) and a compressed batch of those
    three DATA blocks that stores the random one raw after the frame."""
    rng = random.Random(21)
    src = bytearray(NBLOCKS * BS)
    src[2 * BS:3 * BS] = text_block(rng, BS)
    src[5 * BS:6 * BS] = rng.randbytes(BS)
    src[7 * BS:8 * BS] = letters_block(rng, BS)
    encoder = codec.BatchEncoder(src, BS, fresh_sent(NBLOCKS, BS))
    batch, _ = encoder.encode(array("Q", [2, 5, 7]))
    assert batch.compressed and batch.data_count == 3
    return src, bytes(batch.payload)


@pytest.mark.parametrize("bs", [512, 4096, 1 << 16])
def test_entropy_judge_stores_random_blocks_only(bs):
    rng = random.Random(bs)
    for impl in filter(None, (_codec_py, native)):
        assert impl.incompressible(rng.randbytes(bs))
        assert impl.incompressible(zstandard.ZstdCompressor().compress(
            letters_block(rng, 4 * bs))[:bs])  # already compressed data
        for block in (bytes(bs), text_block(rng, bs), letters_block(rng, bs),
                      rng.randbytes(bs // 2).ljust(bs, b"\0")):
            assert not impl.incompressible(block)


def test_stored_blocks_travel_raw_after_the_frame(backend):
    src, payload = stored_sample()
    words = struct.unpack_from("<3Q", payload, fmt.HEADER_SIZE)
    assert [bool(w & fmt.STORED_BIT) for w in words] == [False, True, False]
    assert payload.endswith(bytes(src[5 * BS:6 * BS]))
    frame = payload[fmt.HEADER_SIZE + 3 * fmt.WORD_SIZE:-BS]
    assert zstandard.ZstdDecompressor().decompress(frame) == src[2 * BS:3 * BS] + src[7 * BS:8 * BS]
    dst = bytearray(NBLOCKS * BS)
    decoded = codec.decode_batch(payload, NBLOCKS, BS)
    assert [entry.block for entry in decoded] == [2, 5, 7]
    codec.apply_batch(decoded, dst)
    assert dst == src
    for end in range(len(payload)):
        expect_refused(payload[:end], dst)


def test_stored_bits_checked(backend):
    dst, samples = sample_batches()
    raw = samples[0]
    # Words: ZERO 3, COPY 4 <- 0, DATA 5, DATA 9: STORED only fits a compressed DATA entry.
    expect_refused(with_word(raw, 0, (1 << fmt.KIND_SHIFT) | fmt.STORED_BIT | 3), dst,
                   match="marked stored")
    expect_refused(with_word(raw, 1, (2 << fmt.KIND_SHIFT) | fmt.STORED_BIT | 4), dst,
                   match="marked stored")
    expect_refused(with_word(raw, 3, (3 << fmt.KIND_SHIFT) | fmt.STORED_BIT | 5), dst,
                   match="uncompressed batch")
    _, payload = stored_sample()
    target = bytearray(NBLOCKS * BS)
    unmark = with_word(payload, 1, (3 << fmt.KIND_SHIFT) | 5)   # frame then holds too little
    expect_refused(unmark, target, match="declares")
    remark = with_word(payload, 0, (3 << fmt.KIND_SHIFT) | fmt.STORED_BIT | 2)
    expect_refused(remark, target, match="frame")
    all_stored = with_word(with_word(remark, 2, (3 << fmt.KIND_SHIFT) | fmt.STORED_BIT | 7),
                           1, words_of(payload)[1])
    expect_refused(all_stored, target, match="leaving a frame")


def words_of(payload: bytes) -> tuple[int, ...]:
    (_, _, _, _, entries, copies, _, _) = fmt.HEADER.unpack_from(payload)
    return struct.unpack_from(f"<{entries + copies}Q", payload, fmt.HEADER_SIZE)


# ---- twin equivalence -------------------------------------------------------------------

POOL_SEED = random.Random(12)


def pool(bs: int) -> list[bytes]:
    rng = random.Random(bs)
    return [bytes(bs), rng.randbytes(bs), rng.randbytes(bs), text_block(rng, bs),
            rng.randbytes(8).ljust(bs, b"\0")]


@needs_native
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_twin_and_native_encode_identical_bytes(data):
    bs = data.draw(st.sampled_from([512, 1024]))
    nblocks = data.draw(st.integers(1, 20))
    dedup = data.draw(st.booleans())
    level = data.draw(st.sampled_from([None, 1, 3]))
    max_entries = data.draw(st.integers(1, 12))
    max_data = data.draw(st.integers(1, 6 * bs))
    contents = pool(bs)
    src = bytearray(nblocks * bs)
    encoders, sents, dsts = [], [], []
    for impl in (native, _codec_py):
        with use_backend(impl):
            sents.append(fresh_sent(nblocks, bs))
            encoders.append(codec.BatchEncoder(src, bs, sents[-1], dedup=dedup,
                                               compress_level=level, max_data_bytes=max_data,
                                               max_entries=max_entries))
            dsts.append(bytearray(nblocks * bs))
    for _ in range(data.draw(st.integers(1, 4))):
        changes = data.draw(st.lists(st.tuples(st.integers(0, nblocks - 1),
                                               st.integers(0, len(contents))), max_size=12))
        for i, c in changes:
            j = (i * 7 + c) % nblocks
            src[i * bs:(i + 1) * bs] = contents[c] if c < len(contents) else src[j * bs:
                                                                                 (j + 1) * bs]
        extra = data.draw(st.lists(st.integers(0, nblocks - 1), max_size=10))
        indices = array("Q", [i for i, _ in changes] + extra)
        pos = [0, 0]
        while pos[0] < len(indices):
            outs = []
            for k, impl in enumerate((native, _codec_py)):
                batch, pos[k] = encoders[k].encode(indices, pos[k])
                with use_backend(impl):
                    codec.apply_batch(codec.decode_batch(batch.payload, nblocks, bs), dsts[k])
                outs.append((bytes(batch.payload), batch.entry_count, batch.zero_count,
                             batch.copy_count, batch.data_count, batch.unchanged_count,
                             batch.compressed))
            assert outs[0] == outs[1] and pos[0] == pos[1]
            assert sents[0] == sents[1]
        assert dsts[0] == dsts[1] == src


@needs_native
@settings(max_examples=80, deadline=None)
@given(nblocks=st.integers(1, 8), ops=st.lists(st.tuples(
    st.sampled_from(["put", "stale", "find"]), st.integers(0, 7), st.integers(0, 40)),
    max_size=60))
def test_twin_and_native_dedup_index_agree(nblocks, ops):
    def key(n: int) -> bytes:
        # Few distinct home slots and tags so probing, staleness and eviction all happen.
        return struct.pack("<QQ", n % 5, n % 3)

    indexes = [native.DedupIndex(nblocks), _codec_py.DedupIndex(nblocks)]
    sents = [bytearray(16 * nblocks), bytearray(16 * nblocks)]
    assert indexes[0].capacity == indexes[1].capacity
    for op, block, n in ops:
        block %= nblocks
        results = []
        for index, sent in zip(indexes, sents, strict=True):
            if op == "find":
                results.append(index.lookup(key(n), sent))
                continue
            sent[16 * block:16 * (block + 1)] = key(n)
            if op == "put":
                index.insert(key(n), block, sent)
        assert results[:1] == results[1:]
        if op == "find" and results[0] >= 0:
            assert sents[0][16 * results[0]:16 * (results[0] + 1)] == key(n)


@needs_native
@pytest.mark.parametrize("seed", range(2))
def test_twin_and_native_dedup_index_agree_when_windows_fill(seed):
    rng = random.Random(seed)
    nblocks = 8
    indexes = [native.DedupIndex(nblocks), _codec_py.DedupIndex(nblocks)]
    sents = [bytearray(16 * nblocks), bytearray(16 * nblocks)]
    for _ in range(3000):
        # Tags that collide and homes 0..2 only: every window overlaps, live keys outnumber
        # a window, and a changed block keeps its tag, so full windows and evictions happen.
        n = rng.randrange(24)
        h = struct.pack("<QQ", n % 4, n % 3)
        block = rng.randrange(nblocks)
        results = []
        for index, sent in zip(indexes, sents, strict=True):
            sent[16 * block:16 * (block + 1)] = h
            index.insert(h, block, sent)
            results.append([index.lookup(struct.pack("<QQ", m % 4, m % 3), sent)
                            for m in range(12)])
        assert results[0] == results[1]


@needs_native
@settings(max_examples=150, deadline=None)
@given(words=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12)), max_size=10),
       count=st.integers(0, 11), nblocks=st.integers(0, 12))
def test_twin_and_native_check_entries_agree(words, count, nblocks):
    packed = struct.pack(f"<{len(words)}Q", *((k << fmt.KIND_SHIFT) | i for k, i in words))
    results = []
    for impl in (native, _codec_py):
        try:
            results.append(impl.check_entries(packed, count, nblocks))
        except BatchError as exc:
            results.append(str(exc))
    assert results[0] == results[1]


def test_read_only_mmap_source_and_shared_mmap_destination(backend, tmp_path):
    bs, nblocks = 4096, 32
    rng = random.Random(13)
    content = b"".join(guest_block(rng, bs, bytearray(nblocks * bs), nblocks)
                       for _ in range(nblocks))
    (tmp_path / "src.ram").write_bytes(content)
    (tmp_path / "dst.ram").write_bytes(bytes(nblocks * bs))
    with open(tmp_path / "src.ram", "rb") as fs, open(tmp_path / "dst.ram", "r+b") as fd, \
            mmap.mmap(fs.fileno(), 0, access=mmap.ACCESS_READ) as src, \
            mmap.mmap(fd.fileno(), 0) as dst:
        encoder = codec.BatchEncoder(src, bs, fresh_sent(nblocks, bs), max_data_bytes=8 * bs)
        sync(encoder, array("Q", range(nblocks)), dst, nblocks, bs)
        assert dst[:] == content


def test_compress_batch_later_in_worker_threads_gives_the_same_bytes(backend):
    """A batch encoded raw and packed afterwards (in another thread, as the source's zstd
    workers do) is byte for byte what encoding it compressed gives, and decodes to it."""
    bs, nblocks = 4096, 64
    rng = random.Random(11)
    src = bytearray(b"".join(text_block(rng, bs) if k % 3 else rng.randbytes(bs)
                             for k in range(nblocks)))
    prefix = b"PFX!"

    def encode(compress: bool) -> codec.EncodedBatch:
        encoder = codec.BatchEncoder(src, bs, fresh_sent(nblocks, bs))
        batch, end = encoder.encode(array("Q", range(nblocks)), prefix=prefix,
                                    into=bytearray(encoder.buffer_size(prefix)),
                                    compress=compress)
        assert end == nblocks
        return batch

    inline = encode(True)
    raw = encode(False)
    assert inline.compressed and not raw.compressed
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        packed = list(pool.map(lambda _: codec.compress_batch(raw, 1, len(prefix)), range(8)))
    for batch in packed:
        assert batch.compressed and bytes(batch.payload) == bytes(inline.payload)
        assert (batch.entry_count, batch.raw_data_bytes) == (raw.entry_count,
                                                             raw.raw_data_bytes)
    dst = bytearray(nblocks * bs)
    codec.decode_and_apply(memoryview(packed[0].payload)[len(prefix):], dst, nblocks, bs)
    assert dst == src
    # Nothing to gain, nothing to do: incompressible, already packed, or no DATA at all.
    noise = bytearray(rng.randbytes(4 * bs))
    encoder = codec.BatchEncoder(noise, bs, fresh_sent(4, bs))
    random_batch, _ = encoder.encode(array("Q", range(4)), compress=False)
    assert codec.compress_batch(random_batch, 1) is random_batch
    assert codec.compress_batch(packed[0], 1, len(prefix)) is packed[0]
    empty, _ = encoder.encode(array("Q", range(4)), compress=False)   # all UNCHANGED now
    assert codec.compress_batch(empty, 1) is empty


@needs_native
@settings(max_examples=100, deadline=None)
@given(kinds=st.lists(st.integers(0, 4), max_size=24), shift=st.sampled_from([9, 12]),
       seed=st.integers(0, 2**32))
def test_twin_and_native_split_and_merge_stored_agree(kinds, shift, seed):
    """Same verdicts, words and blocks on both sides; merging undoes the split."""
    bs, rng = 1 << shift, random.Random(seed)
    nblocks = len(kinds) + 1
    makers = (lambda: bytes(bs), lambda: rng.randbytes(bs), lambda: text_block(rng, bs),
              lambda: letters_block(rng, bs), lambda: rng.randbytes(bs // 4).ljust(bs, b"\0"))
    src = bytearray(b"".join(makers[k]() for k in kinds) + bytes(bs))
    encoder = codec.BatchEncoder(src, bs, fresh_sent(nblocks, bs), dedup=False)
    batch, _ = encoder.encode(array("Q", range(len(kinds))), compress=False)
    view = memoryview(batch.payload)
    entries = view[fmt.HEADER_SIZE:len(view) - batch.raw_data_bytes]
    data = view[len(view) - batch.raw_data_bytes:]
    split = [impl.split_stored(entries, batch.entry_count, data, bs)
             for impl in (native, _codec_py)]
    assert split[0] == split[1]
    words, blocks, stored = split[0]
    # Only random blocks are stored; with a 4 KiB block's 1024 samples every one of them
    # is, while 512 samples may judge a random 512-byte block just below the bound.
    randoms = sum(1 for k in kinds if k == 1)
    assert stored == randoms if shift == 12 else stored <= randoms
    packed_len = len(blocks) - stored * bs
    for impl in (native, _codec_py):
        merged = impl.merge_stored(words, batch.entry_count, blocks[:packed_len],
                                   blocks[packed_len:], bs)
        assert merged == data
        with pytest.raises(BatchError):
            impl.merge_stored(words, batch.entry_count, blocks[:packed_len] + bytes(bs),
                              blocks[packed_len:], bs)

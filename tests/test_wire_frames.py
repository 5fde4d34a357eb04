"""Transport frames: sealing, decoding at every split, and every way a frame can be bad."""

from __future__ import annotations

import itertools
import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.buffers import has_views
from agent.errors import FrameError, LocalError, WireCode, WireError
from agent.wire import frames
from agent.wire.frames import (
    HEADER,
    HEADER_LEN,
    MAX_PAYLOAD,
    SCRATCH_SIZE,
    Frame,
    FrameDecoder,
    FrameSealer,
)
from agent.wire.noise import TAGLEN, aesgcm_nonce, rekey

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def stream_of(payloads, *, key=KEY, type_code=0x80, **rekey):
    sealer = FrameSealer(key, **rekey)
    return [b"".join(sealer.seal(type_code, p)) for p in payloads]


def drain(decoder):
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_header_layout_and_nonce_follow_the_spec():
    sealer = FrameSealer(KEY)
    header, ciphertext = sealer.seal(0x81, b"hello")
    assert header == HEADER.pack(5 + TAGLEN, 0x81, 0)
    assert HEADER_LEN == 13
    assert ciphertext == AESGCM(KEY).encrypt(aesgcm_nonce(0), b"hello", header)
    header, ciphertext = sealer.seal(0x10, b"{}")
    assert ciphertext == AESGCM(KEY).encrypt(aesgcm_nonce(1), b"{}", header)
    assert sealer.sequence == 2


@pytest.mark.parametrize("size", [0, 1, 100, SCRATCH_SIZE - HEADER_LEN - TAGLEN,
                                  SCRATCH_SIZE - HEADER_LEN - TAGLEN + 1, SCRATCH_SIZE,
                                  1 << 20, MAX_PAYLOAD])
def test_roundtrip_sizes(size):
    payload = os.urandom(size)
    decoder = FrameDecoder(KEY)
    decoder.receive_data(b"".join(stream_of([payload, b"next"])))
    assert drain(decoder) == [Frame(0x80, payload), Frame(0x80, b"next")]
    assert decoder.buffered == 0 and decoder.at_frame_boundary


def test_payload_may_be_a_reused_buffer():
    buf = bytearray(b"a" * 1000)
    sealer = FrameSealer(KEY)
    first = b"".join(sealer.seal(0x80, memoryview(buf)))
    buf[:] = b"b" * 1000
    second = b"".join(sealer.seal(0x80, buf))
    decoder = FrameDecoder(KEY)
    decoder.receive_data(first + second)
    assert [f.payload for f in drain(decoder)] == [b"a" * 1000, b"b" * 1000]


def test_every_split_offset_of_small_frames():
    payloads = [b"", b"x", os.urandom(200), b"{}", os.urandom(3000)]
    stream = b"".join(stream_of(payloads))
    expected = [Frame(0x80, p) for p in payloads]
    for offset in range(len(stream) + 1):
        decoder = FrameDecoder(KEY)
        decoder.receive_data(stream[:offset])
        got = drain(decoder)
        decoder.receive_data(stream[offset:])
        got += drain(decoder)
        assert got == expected, offset


def test_split_offsets_of_a_large_frame():
    payload = os.urandom(300_000)
    stream = b"".join(stream_of([b"small", payload, b"after"]))
    offsets = set(range(200)) | set(range(len(stream) - 200, len(stream) + 1))
    offsets |= set(range(0, len(stream), 4099))
    offsets |= {SCRATCH_SIZE + d for d in range(-20, 20)}
    for offset in sorted(offsets):
        decoder = FrameDecoder(KEY)
        decoder.receive_data(stream[:offset])
        got = drain(decoder)
        decoder.receive_data(stream[offset:])
        got += drain(decoder)
        assert [f.payload for f in got] == [b"small", payload, b"after"], offset


def test_byte_at_a_time():
    payloads = [os.urandom(n) for n in (0, 5, 70_000, 17)]
    stream = b"".join(stream_of(payloads))
    decoder = FrameDecoder(KEY)
    got = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i:i + 1])
        got += drain(decoder)
    assert [f.payload for f in got] == payloads


def test_get_buffer_in_place_with_random_reads():
    rng = random.Random(7)
    payloads = [os.urandom(rng.choice([0, 10, 5000, 70_000, 1 << 20])) for _ in range(30)]
    stream = memoryview(b"".join(stream_of(payloads)))
    decoder = FrameDecoder(KEY)
    got, pos = [], 0
    while pos < len(stream):
        target = decoder.get_buffer()
        assert len(target) > 0
        n = min(len(target), rng.randint(1, 200_000), len(stream) - pos)
        target[:n] = stream[pos:pos + n]
        decoder.buffer_updated(n)
        pos += n
        got += drain(decoder)
    assert [f.payload for f in got] == payloads


def test_large_frames_land_in_their_own_buffer():
    payload = os.urandom(1 << 20)
    stream = b"".join(stream_of([payload]))
    decoder = FrameDecoder(KEY)
    first = decoder.get_buffer()
    assert len(first) == SCRATCH_SIZE
    first[:SCRATCH_SIZE] = stream[:SCRATCH_SIZE]
    decoder.buffer_updated(SCRATCH_SIZE)
    rest = decoder.get_buffer()
    assert len(rest) == len(stream) - SCRATCH_SIZE  # exactly the rest of this frame
    rest[:] = stream[SCRATCH_SIZE:]
    decoder.buffer_updated(len(rest))
    assert drain(decoder) == [Frame(0x80, payload)]


def test_oversized_length_is_refused_from_the_header_alone():
    decoder = FrameDecoder(KEY)
    decoder.receive_data(HEADER.pack(MAX_PAYLOAD + TAGLEN + 1, 0x80, 0))
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code is WireCode.FRAME_TOO_LARGE
    assert decoder.buffered == 0


def test_a_smaller_limit_can_be_set():
    decoder = FrameDecoder(KEY, max_payload=1000)
    decoder.receive_data(b"".join(stream_of([bytes(1000), bytes(1001)])))
    assert decoder.next_frame() == Frame(0x80, bytes(1000))
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code is WireCode.FRAME_TOO_LARGE


def test_frame_shorter_than_its_tag():
    decoder = FrameDecoder(KEY)
    decoder.receive_data(HEADER.pack(TAGLEN - 1, 0x80, 0) + bytes(TAGLEN - 1))
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code is WireCode.FRAME_TOO_SHORT


def test_every_tampered_byte_is_detected_and_nothing_delivered():
    good, bad_one, after = stream_of([b"first", b"the payload", b"after"])
    for position in range(len(bad_one)):
        tampered = bytearray(bad_one)
        tampered[position] ^= 0x04
        decoder = FrameDecoder(KEY)
        decoder.receive_data(good + bytes(tampered) + after)
        assert decoder.next_frame() == Frame(0x80, b"first")
        with pytest.raises(FrameError) as info:
            if decoder.next_frame() is None:
                # A longer length makes the decoder wait for more bytes: give it some.
                decoder.receive_data(bytes(1 << 19))
                decoder.next_frame()
        assert info.value.code in (WireCode.AUTH_FAILED, WireCode.REPLAYED,
                                   WireCode.OUT_OF_ORDER, WireCode.FRAME_TOO_LARGE)
        with pytest.raises(FrameError):  # and it stays dead
            decoder.next_frame()


def test_tampered_payload_byte_is_an_authentication_failure():
    (frame,) = stream_of([b"x" * 100])
    tampered = bytearray(frame)
    tampered[HEADER_LEN + 50] ^= 1
    decoder = FrameDecoder(KEY)
    decoder.receive_data(bytes(tampered))
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code is WireCode.AUTH_FAILED


def test_truncated_length_prefix_rewritten_is_detected():
    # Shrinking the length and the data together still fails: the length is authenticated.
    (frame,) = stream_of([b"0123456789"])
    length, type_code, seq = HEADER.unpack_from(frame)
    forged = HEADER.pack(length - 1, type_code, seq) + frame[HEADER_LEN:-1]
    decoder = FrameDecoder(KEY)
    decoder.receive_data(forged)
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code is WireCode.AUTH_FAILED


def test_changed_type_code_is_detected():
    (frame,) = stream_of([b"{}"], type_code=0x10)
    forged = bytearray(frame)
    forged[4] = 0x80
    decoder = FrameDecoder(KEY)
    decoder.receive_data(bytes(forged))
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code is WireCode.AUTH_FAILED


def test_replayed_frame():
    f0, f1 = stream_of([b"a", b"b"])
    decoder = FrameDecoder(KEY)
    decoder.receive_data(f0 + f1 + f1)
    assert [f.payload for f in (decoder.next_frame(), decoder.next_frame())] == [b"a", b"b"]
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code is WireCode.REPLAYED


def test_reordered_and_dropped_frames():
    f0, f1, f2 = stream_of([b"a", b"b", b"c"])
    for stream in (f1 + f0, f0 + f2):
        decoder = FrameDecoder(KEY)
        decoder.receive_data(stream)
        got = []
        with pytest.raises(FrameError) as info:
            while decoder.next_frame() is not None:
                got.append(1)
        assert info.value.code is WireCode.OUT_OF_ORDER


def test_wrong_key_is_an_authentication_failure():
    decoder = FrameDecoder(OTHER_KEY)
    decoder.receive_data(b"".join(stream_of([b"secret"])))
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code is WireCode.AUTH_FAILED


def test_frames_before_a_bad_header_are_delivered_first():
    f0, f1 = stream_of([b"a", b"b"])
    decoder = FrameDecoder(KEY)
    decoder.receive_data(f0 + f1 + HEADER.pack(1 << 30, 0x80, 2))
    assert decoder.next_frame().payload == b"a"
    assert decoder.next_frame().payload == b"b"
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_nothing_after_an_authentication_failure_is_delivered():
    f0, f1, f2 = stream_of([b"a", b"b", b"c"])
    bad = bytearray(f1)
    bad[-1] ^= 1
    decoder = FrameDecoder(KEY)
    decoder.receive_data(f0 + bytes(bad) + f2)
    assert decoder.next_frame().payload == b"a"
    for _ in range(3):
        with pytest.raises(FrameError):
            decoder.next_frame()
    decoder.receive_data(b"more bytes")
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_rekey_after_frames_on_both_ends():
    payloads = [b"%d" % i for i in range(10)]
    stream = b"".join(stream_of(payloads, rekey_after_frames=3))
    decoder = FrameDecoder(KEY, rekey_after_frames=3)
    decoder.receive_data(stream)
    assert [f.payload for f in drain(decoder)] == payloads
    assert decoder.rekeys == 3
    # The key really changed: frame 3 is sealed under REKEY(KEY), not KEY.
    sealer = FrameSealer(KEY, rekey_after_frames=3)
    for p in payloads[:3]:
        sealer.seal(0x80, p)
    header, ciphertext = sealer.seal(0x80, b"3")
    assert ciphertext == AESGCM(rekey(KEY)).encrypt(aesgcm_nonce(3), b"3", header)


def test_rekey_after_bytes():
    payloads = [bytes(1000)] * 10
    stream = b"".join(stream_of(payloads, rekey_after_bytes=2500))
    decoder = FrameDecoder(KEY, rekey_after_bytes=2500)
    decoder.receive_data(stream)
    assert len(drain(decoder)) == 10
    assert decoder.rekeys == 3  # after frames 3, 6 and 9 (3 * 1016 bytes >= 2500)


def test_rekey_schedules_must_agree():
    stream = b"".join(stream_of([b"a"] * 5, rekey_after_frames=2))
    decoder = FrameDecoder(KEY)
    decoder.receive_data(stream)
    assert [f.payload for f in (decoder.next_frame(), decoder.next_frame())] == [b"a", b"a"]
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code is WireCode.AUTH_FAILED


def test_default_rekey_limits_stay_far_below_gcm_limits():
    blocks_per_key = frames.REKEY_AFTER_BYTES // 16
    assert blocks_per_key <= 2**30
    assert frames.REKEY_AFTER_FRAMES <= 2**20


def test_sealer_refuses_what_cannot_be_framed():
    sealer = FrameSealer(KEY)
    with pytest.raises(LocalError):
        sealer.seal(0x80, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(LocalError):
        sealer.seal(256, b"")


def test_open_out_of_order_is_a_local_bug():
    decoder = FrameDecoder(KEY)
    decoder.receive_data(b"".join(stream_of([b"a", b"b"])))
    first, second = decoder.take_sealed(), decoder.take_sealed()
    with pytest.raises(LocalError):
        decoder.open(second)
    assert decoder.open(first).payload == b"a"


def test_buffering_is_capped_at_one_partial_frame():
    payloads = [os.urandom(1 << 20) for _ in range(3)]
    stream = b"".join(stream_of(payloads))
    decoder = FrameDecoder(KEY)
    pos = 0
    while pos < len(stream):
        # Feed without ever taking a frame: only what get_buffer offers.
        target = decoder.get_buffer()
        n = min(len(target), len(stream) - pos)
        target[:n] = stream[pos:pos + n]
        decoder.buffer_updated(n)
        pos += n
        incomplete = decoder.buffered - sum(HEADER_LEN + len(p) + TAGLEN
                                            for p in payloads[:_complete(decoder)])
        assert incomplete <= frames.MAX_FRAME
    assert [f.payload for f in drain(decoder)] == payloads


def _complete(decoder):
    return len(decoder._ready)


# ---- fuzzing: the decoder raises nothing but WireError, and never delivers a forged frame ----

REFERENCE = [b"", b"a", b"{}", bytes(100), os.urandom(700), os.urandom(70_000), b"last"]
REFERENCE_STREAM = b"".join(stream_of(REFERENCE))


def _feed_and_collect(decoder, chunks):
    delivered = []
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
            while (frame := decoder.next_frame()) is not None:
                delivered.append(frame.payload)
    except WireError:
        pass
    return delivered


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_random_bytes(chunks):
    decoder = FrameDecoder(KEY)
    assert _feed_and_collect(decoder, chunks) == []  # random bytes never authenticate


@st.composite
def mutated_streams(draw):
    data = bytearray(REFERENCE_STREAM)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate",
                                     "swap"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 40))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "duplicate":
            end = min(len(data), pos + draw(st.integers(1, 2000)))
            data[pos:pos] = data[pos:end]
        elif kind == "swap" and pos < len(data):
            other = draw(st.integers(0, len(data) - 1))
            data[pos], data[other] = data[other], data[pos]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    bounds = [0, *cuts, len(data)]
    return [bytes(data[a:b]) for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_streams())
def test_fuzz_mutated_streams_deliver_only_authentic_frames(chunks):
    decoder = FrameDecoder(KEY)
    delivered = _feed_and_collect(decoder, chunks)
    # Whatever got through is exactly a prefix of what was sent, in order.
    assert delivered == REFERENCE[:len(delivered)]


# ---- large payloads: read-only views of reused buffers ----


def test_held_payloads_are_never_overwritten():
    payloads = [os.urandom(200_000) for _ in range(12)]
    decoder = FrameDecoder(KEY)
    decoder.receive_data(b"".join(stream_of(payloads)))
    held = drain(decoder)  # every payload kept alive while later ones are decrypted
    assert [bytes(f.payload) for f in held] == payloads
    for frame in held:
        assert isinstance(frame.payload, memoryview) and frame.payload.readonly
        with pytest.raises(TypeError):
            frame.payload[0] = 0


def test_plaintext_buffers_are_reused_once_released():
    decoder = FrameDecoder(KEY)
    sealer = FrameSealer(KEY)
    seen = set()
    for i in range(20):
        payload = bytes([i]) * 100_000
        decoder.receive_data(b"".join(sealer.seal(0x80, payload)))
        frame = decoder.next_frame()
        assert frame.payload == payload
        seen.add(id(frame.payload.obj))
        del frame  # the application lets go of it
    assert len(seen) == 1
    # A slice kept alive pins its buffer: the next payload goes elsewhere.
    decoder.receive_data(b"".join(sealer.seal(0x80, b"a" * 100_000)))
    kept = decoder.next_frame().payload[10:20]
    decoder.receive_data(b"".join(sealer.seal(0x80, b"b" * 100_000)))
    other = decoder.next_frame().payload
    assert other.obj is not kept.obj and bytes(kept) == b"a" * 10


def test_small_payloads_are_bytes():
    decoder = FrameDecoder(KEY)
    decoder.receive_data(b"".join(stream_of([b"x" * (frames.PLAINTEXT_POOL_MIN - 1)])))
    assert type(decoder.next_frame().payload) is bytes


def test_strided_views_can_be_sent():
    data = memoryview(bytes(range(200)))[::-1]
    decoder = FrameDecoder(KEY)
    sealer = FrameSealer(KEY)
    decoder.receive_data(b"".join(sealer.seal(0x80, data)))
    out = bytearray(1000)
    decoder.receive_data(sealer.seal_into(0x80, data, out))
    assert [bytes(f.payload) for f in drain(decoder)] == [bytes(data)] * 2


def test_has_views_probe():
    buffer = bytearray(b"abc")
    assert not has_views(buffer) and buffer == b"abc"
    view = memoryview(buffer)[1:]
    assert has_views(buffer)
    del view
    assert not has_views(buffer)

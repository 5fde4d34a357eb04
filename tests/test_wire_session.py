"""Two in-memory session endpoints: handshake, trust, messages, and every way a peer can
misbehave."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import (
    FrameError,
    HandshakeError,
    LocalError,
    MessageError,
    NotFerryPeerError,
    PeerReportedError,
    ProtocolError,
    RefusedByPeerError,
    StreamEndError,
    UntrustedPeerError,
    VersionMismatchError,
    WireCode,
)
from agent.wire.frames import HEADER_LEN, MAX_PAYLOAD
from agent.wire.keys import encode_key, fingerprint
from agent.wire.messages import Goodbye, Message, MsgType, Opened
from agent.wire.noise import public_bytes
from agent.wire.session import (
    HANDSHAKE_LENGTH,
    MAGIC,
    PREAMBLE,
    TRANSITIONS,
    WIRE_VERSION,
    Session,
    State,
    preamble,
)


def _fixed_key(n: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes([n]) * 32)


A_STATIC, B_STATIC = _fixed_key(1), _fixed_key(2)
A_KEY, B_KEY = public_bytes(A_STATIC), public_bytes(B_STATIC)


def make_pair(*, a_trusts=True, b_trusts=True, fixed=True, a_version=WIRE_VERSION,
              b_version=WIRE_VERSION, expected_key=None, **kwargs):
    """Initiator A and responder B; fixed ephemerals make every byte reproducible."""
    a = Session(initiator=True, static_key=A_STATIC, version=a_version,
                is_trusted=lambda k: a_trusts and k == B_KEY, expected_key=expected_key,
                ephemeral_key=_fixed_key(3) if fixed else None, **kwargs)
    b = Session(initiator=False, static_key=B_STATIC, version=b_version,
                is_trusted=lambda k: b_trusts and k == A_KEY,
                ephemeral_key=_fixed_key(4) if fixed else None, **kwargs)
    return a, b


def transfer(src, dst):
    data = b"".join(src.data_to_send())
    dst.receive_data(data)
    return data


def events(session):
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
        if isinstance(event, Goodbye):
            break
    return out


def handshake(a, b):
    """Run the handshake; returns (bytes A sent, bytes B sent)."""
    a_sent, b_sent = bytearray(), bytearray()
    for _ in range(3):
        a_sent += transfer(a, b)
        assert_none_or_opened(events(b))
        b_sent += transfer(b, a)
        assert_none_or_opened(events(a))
    return bytes(a_sent), bytes(b_sent)


def assert_none_or_opened(evs):
    assert all(isinstance(e, Opened) for e in evs)


def open_pair(**kwargs):
    a, b = make_pair(**kwargs)
    handshake(a, b)
    assert a.state is State.OPEN and b.state is State.OPEN
    return a, b


# ---- the happy path ----


def test_handshake_opens_both_sides_with_each_others_keys():
    a, b = make_pair(fixed=False)
    a_sent = transfer(a, b)
    assert a_sent.startswith(preamble())
    assert events(b) == []
    transfer(b, a)
    assert events(a) == []          # A sent message 3 and waits for the verdict
    assert a.state is State.VERDICT
    transfer(a, b)
    assert events(b) == [Opened(A_KEY)]
    transfer(b, a)                  # ACCEPT
    assert events(a) == [Opened(B_KEY)]
    assert a.peer_key == B_KEY and b.peer_key == A_KEY
    assert a.handshake_hash == b.handshake_hash


def test_messages_both_ways_and_goodbye():
    a, b = open_pair()
    a.send(MsgType.DATA, b"raw bytes")
    a.send_control(MsgType.PREPARE, {"vm": "web01", "ram": 1 << 30})
    a.send(MsgType.RAM_PAGES, memoryview(bytes(MAX_PAYLOAD)))
    transfer(a, b)
    got = events(b)
    assert got[0] == Message(MsgType.DATA, b"raw bytes")
    assert got[1].type is MsgType.PREPARE and got[1].control() == {"vm": "web01", "ram": 1 << 30}
    assert got[2] == Message(MsgType.RAM_PAGES, bytes(MAX_PAYLOAD))
    msg_type, payload = got[0]
    assert (msg_type, payload) == (MsgType.DATA, b"raw bytes")
    b.send(MsgType.DATA, b"reply")
    transfer(b, a)
    assert events(a) == [Message(MsgType.DATA, b"reply")]
    a.close()
    transfer(a, b)
    assert events(b) == [Goodbye()]
    assert a.state is State.CLOSED and b.state is State.CLOSED
    b.receive_eof()
    assert b.next_event() is None


def test_whole_conversation_fed_split_at_every_offset():
    """Every byte offset of everything A sends (handshake and frames) is a split point."""
    a, b = make_pair()
    a_sent, b_sent = handshake(a, b)
    a.send(MsgType.DATA, b"x" * 300)
    a.send_control(MsgType.CONTROL, {"k": "v"})
    a.send(MsgType.DATA, b"")
    a.close()
    a_stream = a_sent + transfer(a, b)
    reference = events(b)
    assert [type(e) for e in reference] == [Message, Message, Message, Goodbye]
    for offset in range(len(a_stream) + 1):
        _, fresh_b = make_pair()
        fresh_b.receive_data(a_stream[:offset])
        got = events(fresh_b)
        fresh_b.receive_data(a_stream[offset:])
        got += events(fresh_b)
        assert got == [Opened(A_KEY)] + reference, offset
        assert b"".join(fresh_b.data_to_send()) == b_sent
    # And the other direction: everything B sends, split at every offset, into a fresh A.
    for offset in range(len(b_sent) + 1):
        fresh_a, _ = make_pair()
        fresh_a.receive_data(b_sent[:offset])
        got = events(fresh_a)
        fresh_a.receive_data(b_sent[offset:])
        got += events(fresh_a)
        assert got == [Opened(B_KEY)], offset


def test_byte_at_a_time_both_ways():
    a, b = make_pair(fixed=False)
    opened = []
    for _ in range(3):
        for src, dst in ((a, b), (b, a)):
            for chunk in src.data_to_send():
                for i in range(len(chunk)):
                    dst.receive_data(chunk[i:i + 1])
                    opened += events(dst)
    assert sorted(e.peer_key for e in opened) == sorted([A_KEY, B_KEY])
    payload = os.urandom(100_000)
    a.send(MsgType.DATA, payload)
    (header, ciphertext) = a.data_to_send()
    got = []
    for i in range(len(header)):
        b.receive_data(header[i:i + 1])
    for i in range(0, len(ciphertext), 7):
        b.receive_data(ciphertext[i:i + 7])
        got += events(b)
    assert got == [Message(MsgType.DATA, payload)]


def test_rekeying_sessions_agree():
    a, b = open_pair(rekey_after_frames=4)
    for i in range(20):
        a.send(MsgType.DATA, b"%d" % i)
        b.send(MsgType.DATA, b"%d" % i)
    transfer(a, b)
    transfer(b, a)
    assert len(events(b)) == 20 and len(events(a)) == 20
    assert a.rekeys == (5, 5) and b.rekeys == (5, 5)  # ACCEPT counts as a frame too


# ---- trust ----


def test_untrusted_initiator_is_refused_on_both_sides():
    a, b = make_pair(b_trusts=False)
    transfer(a, b)
    events(b)
    transfer(b, a)
    events(a)
    transfer(a, b)
    with pytest.raises(UntrustedPeerError) as refused:
        b.next_event()
    text = str(refused.value)
    assert fingerprint(A_KEY) in text and "ferry trust" in text and encode_key(A_KEY) in text
    transfer(b, a)  # the REFUSE frame
    with pytest.raises(RefusedByPeerError) as info:
        a.next_event()
    assert fingerprint(A_KEY) in str(info.value) and "ferry trust" in str(info.value)
    assert a.state is State.FAILED and b.state is State.FAILED


def test_untrusted_responder_is_refused_on_both_sides():
    a, b = make_pair(a_trusts=False)
    transfer(a, b)
    events(b)
    transfer(b, a)
    with pytest.raises(UntrustedPeerError) as refused:
        a.next_event()
    assert fingerprint(B_KEY) in str(refused.value)
    transfer(a, b)  # message 3 still goes out, carrying the verdict
    with pytest.raises(RefusedByPeerError):
        b.next_event()
    assert b.data_to_send() == []  # no ACCEPT


def test_neither_trusts_the_other():
    a, b = make_pair(a_trusts=False, b_trusts=False)
    transfer(a, b)
    events(b)
    transfer(b, a)
    with pytest.raises(UntrustedPeerError):
        a.next_event()
    transfer(a, b)
    with pytest.raises(UntrustedPeerError):
        b.next_event()


def test_expected_key_mismatch():
    a, b = make_pair(expected_key=bytes(32))
    transfer(a, b)
    events(b)
    transfer(b, a)
    with pytest.raises(UntrustedPeerError) as info:
        a.next_event()
    assert "not the key expected" in str(info.value)


def test_errors_stay_raised():
    a, b = make_pair(a_trusts=False)
    transfer(a, b)
    events(b)
    transfer(b, a)
    for _ in range(2):
        with pytest.raises(UntrustedPeerError):
            a.next_event()
    with pytest.raises(UntrustedPeerError):
        a.send(MsgType.DATA, b"")


# ---- garbage, versions, truncation ----


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01",
                                     b"SSH-2.0-OpenSSH_9.2\r\n", b"F"])
def test_garbage_before_the_handshake(garbage):
    for side in make_pair():
        side.receive_data(garbage if garbage != b"F" else b"FX")
        with pytest.raises(NotFerryPeerError) as info:
            side.next_event()
        assert info.value.code is WireCode.NOT_FERRY


def test_a_partial_preamble_waits():
    _, b = make_pair()
    b.receive_data(MAGIC[:3])
    assert b.next_event() is None


def test_version_mismatch_is_named_on_both_sides():
    a, b = make_pair(b_version=WIRE_VERSION + 1)
    transfer(a, b)
    transfer(b, a)
    for side, peer_version in ((a, WIRE_VERSION + 1), (b, WIRE_VERSION)):
        with pytest.raises(VersionMismatchError) as info:
            side.next_event()
        assert info.value.code is WireCode.VERSION_MISMATCH
        assert info.value.peer_version == peer_version


def test_rewritten_preamble_version_breaks_the_handshake():
    # A middleman making a v2 initiator look like v1 cannot: the preamble is the prologue.
    a, b = make_pair(a_version=2, b_version=1)
    data = b"".join(a.data_to_send())
    b.receive_data(preamble(1) + data[PREAMBLE.size:])
    assert b.next_event() is None
    b_data = b"".join(b.data_to_send())
    a.receive_data(preamble(2) + b_data[PREAMBLE.size:])
    with pytest.raises(HandshakeError):
        a.next_event()


def test_oversized_handshake_message():
    _, b = make_pair()
    b.receive_data(preamble() + HANDSHAKE_LENGTH.pack(0xFFFF))
    with pytest.raises(HandshakeError):
        b.next_event()


def test_unexpected_payload_in_message_one():
    _, b = make_pair()
    b.receive_data(preamble() + HANDSHAKE_LENGTH.pack(40) + os.urandom(32) + b"payload!")
    with pytest.raises(HandshakeError):
        b.next_event()


@pytest.mark.parametrize("which", ["message 2", "message 3"])
def test_tampered_handshake_byte(which):
    a, b = make_pair()
    a_first = b"".join(a.data_to_send())
    b.receive_data(a_first)
    events(b)
    b_first = bytearray(b"".join(b.data_to_send()))
    if which == "message 2":
        b_first[-5] ^= 1
        a.receive_data(bytes(b_first))
        with pytest.raises(HandshakeError):
            a.next_event()
    else:
        a.receive_data(bytes(b_first))
        events(a)
        msg3 = bytearray(b"".join(a.data_to_send()))
        msg3[10] ^= 1
        b.receive_data(bytes(msg3))
        with pytest.raises(HandshakeError):
            b.next_event()


def test_eof_during_handshake():
    a, _ = make_pair()
    a.receive_eof()
    with pytest.raises(StreamEndError) as info:
        a.next_event()
    assert info.value.code is WireCode.TRUNCATED


def test_eof_without_goodbye_and_inside_a_frame():
    a, b = open_pair()
    b.receive_eof()
    with pytest.raises(StreamEndError, match="without GOODBYE"):
        b.next_event()
    a, b = open_pair()
    a.send(MsgType.DATA, b"0123456789")
    b.receive_data(b"".join(a.data_to_send())[:-3])
    b.receive_eof()
    with pytest.raises(StreamEndError, match="inside a frame"):
        b.next_event()


def test_trailing_data_after_goodbye():
    a, b = open_pair()
    a.close()
    b.receive_data(b"".join(a.data_to_send()) + b"junk")
    with pytest.raises(StreamEndError) as info:
        events(b)
    assert info.value.code is WireCode.TRAILING_DATA
    a, b = open_pair()
    a.close()
    transfer(a, b)
    assert events(b) == [Goodbye()]
    b.receive_data(b"late")
    with pytest.raises(StreamEndError):
        b.next_event()


def test_garbage_after_the_handshake_is_reported_to_the_peer():
    a, b = open_pair()
    b.receive_data(os.urandom(5000))
    with pytest.raises(FrameError) as info:
        events(b)
    transfer(b, a)  # B's ERROR frame
    with pytest.raises(PeerReportedError) as reported:
        a.next_event()
    assert reported.value.code == info.value.code


def test_tampered_transport_byte():
    a, b = open_pair()
    a.send(MsgType.DATA, b"guest memory")
    data = bytearray(b"".join(a.data_to_send()))
    data[HEADER_LEN + 3] ^= 0x10
    b.receive_data(bytes(data))
    with pytest.raises(FrameError) as info:
        b.next_event()
    assert info.value.code is WireCode.AUTH_FAILED


def test_replayed_and_reordered_transport_frames():
    a, b = open_pair()
    a.send(MsgType.DATA, b"one")
    first = b"".join(a.data_to_send())
    a.send(MsgType.DATA, b"two")
    second = b"".join(a.data_to_send())
    b.receive_data(first + first)
    assert b.next_event() == Message(MsgType.DATA, b"one")
    with pytest.raises(FrameError) as info:
        b.next_event()
    assert info.value.code is WireCode.REPLAYED
    a, b = open_pair()
    a.send(MsgType.DATA, b"one")
    first = b"".join(a.data_to_send())
    a.send(MsgType.DATA, b"two")
    second = b"".join(a.data_to_send())
    b.receive_data(second + first)
    with pytest.raises(FrameError) as info:
        b.next_event()
    assert info.value.code is WireCode.OUT_OF_ORDER


def _forge(a, type_code, payload):
    """A frame A's keys seal with any type code (as a buggy or hostile peer would)."""
    return b"".join(a._sealer.seal(type_code, payload))


@pytest.mark.parametrize("type_code, payload, code", [
    (0x7E, b"{}", WireCode.UNKNOWN_TYPE),
    (0xFE, b"", WireCode.UNKNOWN_TYPE),
    (MsgType.CONTROL, b"not json", WireCode.MALFORMED_MESSAGE),
    (MsgType.CONTROL, b"[1, 2]", WireCode.MALFORMED_MESSAGE),
    (MsgType.CONTROL, b"\xff\xfe", WireCode.MALFORMED_MESSAGE),
    (MsgType.ACCEPT, b"{}", WireCode.UNEXPECTED_MESSAGE),
    (MsgType.REFUSE, b"{}", WireCode.UNEXPECTED_MESSAGE),
    (MsgType.ERROR, b"{}", WireCode.MALFORMED_MESSAGE),
])
def test_bad_messages_from_the_peer(type_code, payload, code):
    a, b = open_pair()
    b.receive_data(_forge(a, type_code, payload))
    with pytest.raises(MessageError) as info:
        b.next_event()
    assert info.value.code is code


def test_peer_error_message():
    a, b = open_pair()
    b.receive_data(_forge(a, MsgType.ERROR, b'{"code": 7, "message": "bad tag"}'))
    with pytest.raises(PeerReportedError) as info:
        b.next_event()
    assert info.value.code == 7 and "bad tag" in str(info.value)


def test_what_the_application_may_not_send():
    a, _ = make_pair()
    with pytest.raises(LocalError):
        a.send(MsgType.DATA, b"too early")
    a, _ = open_pair()
    for channel_type in (MsgType.ACCEPT, MsgType.REFUSE, MsgType.GOODBYE, MsgType.ERROR):
        with pytest.raises(LocalError):
            a.send(channel_type, b"{}")
    with pytest.raises(LocalError):
        a.send(MsgType.DATA, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(LocalError):
        a.send(MsgType.CONTROL, b"not json")
    with pytest.raises(LocalError):
        a.send_control(MsgType.DATA, {})
    with pytest.raises(LocalError):
        a.send(0x80, b"")  # a bare int is not a MsgType
    a.close()
    with pytest.raises(LocalError):
        a.send(MsgType.DATA, b"after close")


def test_state_table_is_complete_and_enforced():
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.FAILED] == frozenset()
    a, _ = make_pair()
    with pytest.raises(LocalError):
        a._enter(State.OPEN)  # PREAMBLE -> OPEN skips the handshake


def test_message_dataclass_validates():
    with pytest.raises(ValueError):
        Message(MsgType.GOODBYE, b"")
    with pytest.raises(TypeError):
        Message(0x80, b"")
    with pytest.raises(ValueError):
        Message(MsgType.DATA, b"").control()


# ---- fuzzing the whole session ----

_A, _B = make_pair()
REF_A_SENT, REF_B_SENT = handshake(_A, _B)
_A.send(MsgType.DATA, b"d" * 2000)
_A.send_control(MsgType.CONTROL, {"x": 1})
_A.close()
REF_STREAM = REF_A_SENT + transfer(_A, _B)
REF_EVENTS = [Opened(A_KEY)] + events(_B)


def _run_responder(chunks):
    _, b = make_pair()
    got = []
    try:
        for chunk in chunks:
            b.receive_data(chunk)
            got += events(b)
    except ProtocolError:
        pass
    return got


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_fuzz_random_bytes_into_a_responder(chunks):
    assert _run_responder([preamble() + c for c in chunks[:1]] + chunks[1:]) == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_conversation(data):
    stream = bytearray(REF_STREAM)
    for _ in range(data.draw(st.integers(1, 3))):
        if not stream:
            break
        pos = data.draw(st.integers(0, len(stream) - 1))
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if kind == "flip":
            stream[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "insert":
            stream[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del stream[pos:pos + data.draw(st.integers(1, 16))]
        else:
            del stream[pos:]
    cut = data.draw(st.integers(0, len(stream)))
    got = _run_responder([bytes(stream[:cut]), bytes(stream[cut:])])
    assert got == REF_EVENTS[:len(got)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_fuzz_random_bytes_into_an_initiator(chunks):
    a, _ = make_pair()
    got = []
    try:
        for chunk in [preamble() + c for c in chunks[:1]] + chunks[1:]:
            a.receive_data(chunk)
            got += events(a)
    except ProtocolError:
        pass
    assert got == []


def test_a_flood_during_the_handshake_is_capped_and_refused():
    _, b = make_pair()
    b.receive_data(preamble())
    for _ in range(1000):  # 4 MB that never forms a handshake message
        b.receive_data(HANDSHAKE_LENGTH.pack(100) + bytes(4000))
    assert b.buffered <= 8192
    with pytest.raises(HandshakeError):
        events(b)

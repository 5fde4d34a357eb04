"""The sans-IO NBD client protocol: handshake, requests, replies split at every byte, and a
hostile server that must get a protocol error, never a write outside the caller's buffer."""

from __future__ import annotations

import itertools
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import (
    NbdError,
    NbdOptionError,
    NbdProtocolError,
    NbdRequestError,
    NotNbdServerError,
)
from agent.storage import nbd_proto as P
from agent.storage.nbd_proto import (
    BlockSizes,
    ClientFlag,
    ClientProtocol,
    Command,
    CommandFlag,
    Extent,
    HandshakeDone,
    HandshakeFlag,
    Info,
    NbdErrno,
    Option,
    OptionReply,
    Phase,
    ReplyDone,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

FLAGS = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
         | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
         | TransmissionFlag.SEND_DF | TransmissionFlag.SEND_FAST_ZERO)
SIZE = 1 << 20
CONTEXTS = ("base:allocation", "qemu:dirty-bitmap:bm0")
DONE = ReplyFlag.DONE


# ------------------------------------------------------------------ a server, as bytes


class Server:
    """Builds what an NBD server sends (test side only; no checks of its own)."""

    @staticmethod
    def greeting(flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
        return P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, flags)

    @staticmethod
    def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
        return P.OPTION_REPLY_HEADER.pack(P.OPTION_REPLY_MAGIC, option, reply, len(data)) + data

    @classmethod
    def meta_context(cls, context_id: int, name: str) -> bytes:
        return cls.option_reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT,
                                struct.pack(">I", context_id) + name.encode())

    @classmethod
    def info_export(cls, size: int = SIZE, flags: int = FLAGS) -> bytes:
        return cls.option_reply(Option.GO, OptionReply.INFO,
                                struct.pack(">HQH", Info.EXPORT, size, flags))

    @classmethod
    def info_block_size(cls, minimum: int = 1, preferred: int = 4096,
                        maximum: int = 32 << 20) -> bytes:
        return cls.option_reply(Option.GO, OptionReply.INFO,
                                struct.pack(">HIII", Info.BLOCK_SIZE, minimum, preferred,
                                            maximum))

    @classmethod
    def handshake(cls, contexts: tuple[str, ...] = CONTEXTS, *, size: int = SIZE,
                  flags: int = FLAGS, block_sizes: tuple[int, int, int] = (1, 4096, 32 << 20),
                  structured: bool = True) -> bytes:
        out = [cls.greeting()]
        if structured:
            out.append(cls.option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK))
        else:
            out.append(cls.option_reply(Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP))
        if contexts:
            out += [cls.meta_context(i * 3 + 1, name) for i, name in enumerate(contexts)]
            out.append(cls.option_reply(Option.SET_META_CONTEXT, OptionReply.ACK))
        out += [cls.info_block_size(*block_sizes),
                cls.option_reply(Option.GO, OptionReply.INFO,
                                 struct.pack(">H", Info.NAME) + b"disk0"),
                cls.info_export(size, flags),
                cls.option_reply(Option.GO, OptionReply.ACK)]
        return b"".join(out)

    @staticmethod
    def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
        return P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, error, cookie) + data

    @staticmethod
    def chunk(cookie: int, kind: int, payload: bytes = b"", flags: int = 0) -> bytes:
        return P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, flags, kind, cookie,
                                       len(payload)) + payload

    @classmethod
    def data(cls, cookie: int, offset: int, data: bytes, flags: int = 0) -> bytes:
        return cls.chunk(cookie, ReplyType.OFFSET_DATA, struct.pack(">Q", offset) + data, flags)

    @classmethod
    def hole(cls, cookie: int, offset: int, size: int, flags: int = 0) -> bytes:
        return cls.chunk(cookie, ReplyType.OFFSET_HOLE, struct.pack(">QI", offset, size), flags)

    @classmethod
    def none(cls, cookie: int) -> bytes:
        return cls.chunk(cookie, ReplyType.NONE, b"", DONE)

    @classmethod
    def status(cls, cookie: int, context_id: int, extents: list[tuple[int, int]],
               flags: int = 0) -> bytes:
        payload = struct.pack(">I", context_id) + b"".join(
            struct.pack(">II", length, state) for length, state in extents)
        return cls.chunk(cookie, ReplyType.BLOCK_STATUS, payload, flags)

    @classmethod
    def error(cls, cookie: int, error: int, message: str = "", offset: int | None = None,
              flags: int = DONE) -> bytes:
        raw = message.encode()
        payload = struct.pack(">IH", error, len(raw)) + raw
        kind = ReplyType.ERROR
        if offset is not None:
            payload += struct.pack(">Q", offset)
            kind = ReplyType.ERROR_OFFSET
        return cls.chunk(cookie, kind, payload, flags)


def events(proto: ClientProtocol) -> list[P.Event]:
    out = []
    while (event := proto.next_event()) is not None:
        out.append(event)
    return out


def connected(contexts: tuple[str, ...] = CONTEXTS, **kwargs: object) -> ClientProtocol:
    proto = ClientProtocol("disk0", contexts)
    proto.receive_data(Server.handshake(contexts, **kwargs))  # type: ignore[arg-type]
    (done,) = events(proto)
    assert isinstance(done, HandshakeDone)
    proto.data_to_send()
    return proto


def fail_with(proto: ClientProtocol, data: bytes, match: str = "") -> NbdError:
    proto.receive_data(data)
    with pytest.raises(NbdProtocolError, match=match) as info:
        events(proto)
    return info.value


# ------------------------------------------------------------------ handshake


def test_handshake_sends_flags_structured_replies_meta_contexts_and_go():
    proto = ClientProtocol("disk0", CONTEXTS)
    assert proto.data_to_send() == b""   # the server speaks first
    proto.receive_data(Server.greeting())
    out = proto.data_to_send()
    assert out[:4] == struct.pack(">I", ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
    assert out[4:] == P.OPTION_HEADER.pack(P.IHAVEOPT, Option.STRUCTURED_REPLY, 0)
    proto.receive_data(Server.option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK))
    out = proto.data_to_send()
    magic, option, length = P.OPTION_HEADER.unpack_from(out)
    assert (magic, option, length) == (P.IHAVEOPT, Option.SET_META_CONTEXT, len(out) - 16)
    body = out[16:]
    assert body == (struct.pack(">I", 5) + b"disk0" + struct.pack(">I", 2)
                    + struct.pack(">I", 15) + b"base:allocation"
                    + struct.pack(">I", 21) + b"qemu:dirty-bitmap:bm0")
    assert proto.phase is Phase.META_CONTEXT
    proto.receive_data(Server.meta_context(7, "qemu:dirty-bitmap:bm0")
                       + Server.meta_context(0, "base:allocation"))
    assert proto.data_to_send() == b""
    proto.receive_data(Server.option_reply(Option.SET_META_CONTEXT, OptionReply.ACK))
    out = proto.data_to_send()
    assert out == (P.OPTION_HEADER.pack(P.IHAVEOPT, Option.GO, 4 + 5 + 2 + 2)
                   + struct.pack(">I", 5) + b"disk0" + struct.pack(">HH", 1, Info.BLOCK_SIZE))
    proto.receive_data(Server.info_export(12345, FLAGS | TransmissionFlag.READ_ONLY)
                       + Server.info_block_size(512, 4096, 1 << 20))
    assert events(proto) == []
    proto.receive_data(Server.option_reply(Option.GO, OptionReply.ACK))
    (done,) = events(proto)
    assert isinstance(done, HandshakeDone)
    export = done.export
    assert (export.name, export.size, export.read_only) == ("disk0", 12345, True)
    assert export.block_sizes == BlockSizes(512, 4096, 1 << 20)
    assert export.contexts == {"qemu:dirty-bitmap:bm0": 7, "base:allocation": 0}
    assert export.structured_replies
    assert proto.phase is Phase.TRANSMISSION


def test_handshake_without_contexts_goes_straight_to_go_and_defaults_block_sizes():
    proto = ClientProtocol()
    proto.receive_data(Server.greeting(HandshakeFlag.FIXED_NEWSTYLE))
    assert proto.data_to_send()[:4] == struct.pack(">I", ClientFlag.FIXED_NEWSTYLE)
    proto.receive_data(Server.option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK))
    out = proto.data_to_send()
    assert P.OPTION_HEADER.unpack_from(out)[1] == Option.GO
    assert out[16:20] == struct.pack(">I", 0)   # the default export: empty name
    proto.receive_data(Server.info_export(4096) + Server.option_reply(Option.GO, OptionReply.ACK))
    (done,) = events(proto)
    assert done.export.block_sizes == BlockSizes()
    assert done.export.contexts == {}


def test_old_server_without_structured_replies_still_reads_with_simple_replies():
    proto = connected((), structured=False)
    assert not proto.export.structured_replies
    buf = bytearray(8)
    cookie, _ = proto.read(100, memoryview(buf))
    proto.receive_data(Server.simple(cookie, 0, b"abcdefgh"))
    (done,) = events(proto)
    assert done.error == 0 and buf == b"abcdefgh"
    with pytest.raises(NbdRequestError, match="metadata context"):
        proto.block_status(0, 512)
    cookie, _ = proto.flush()
    fail_with(proto, Server.none(cookie), "structured replies were not negotiated")


def test_structured_replies_refused_while_contexts_are_needed():
    proto = ClientProtocol("", ["base:allocation"])
    proto.receive_data(Server.greeting() + Server.option_reply(
        Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP, b"too old"))
    with pytest.raises(NbdOptionError, match="STRUCTURED_REPLY.*too old") as info:
        events(proto)
    assert info.value.code == OptionReply.ERR_UNSUP
    assert proto.data_to_send().endswith(P.OPTION_HEADER.pack(P.IHAVEOPT, Option.ABORT, 0))


def test_unknown_export_is_an_option_error_naming_it_and_aborts_politely():
    proto = ClientProtocol("nope")
    proto.receive_data(Server.greeting()
                       + Server.option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK))
    proto.data_to_send()
    proto.receive_data(Server.option_reply(Option.GO, OptionReply.ERR_UNKNOWN, b"not found"))
    with pytest.raises(NbdOptionError, match="no export named 'nope'") as info:
        events(proto)
    assert info.value.reply == "ERR_UNKNOWN"
    assert proto.data_to_send() == P.OPTION_HEADER.pack(P.IHAVEOPT, Option.ABORT, 0)
    assert proto.phase is Phase.CLOSED


def test_a_context_the_server_does_not_select_is_an_option_error():
    proto = ClientProtocol("", ["base:allocation", "qemu:dirty-bitmap:gone"])
    proto.receive_data(Server.greeting()
                       + Server.option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK)
                       + Server.meta_context(0, "base:allocation")
                       + Server.option_reply(Option.SET_META_CONTEXT, OptionReply.ACK))
    with pytest.raises(NbdOptionError, match="qemu:dirty-bitmap:gone"):
        events(proto)


@pytest.mark.parametrize("first", [b"{", b"{\"QMP\": {}}\r\n", b"SSH-2.0-OpenSSH", b"\0" * 8])
def test_not_an_nbd_server_is_named_from_its_first_byte(first):
    proto = ClientProtocol()
    proto.receive_data(first[:1])
    with pytest.raises(NotNbdServerError, match="not an NBD server"):
        events(proto)


def test_oldstyle_and_non_fixed_newstyle_servers_are_refused():
    proto = ClientProtocol()
    proto.receive_data(struct.pack(">QQ", P.NBDMAGIC, P.CLISERV_MAGIC) + bytes(2))
    with pytest.raises(NbdProtocolError, match="oldstyle"):
        events(proto)
    proto = ClientProtocol()
    proto.receive_data(Server.greeting(0))
    with pytest.raises(NbdProtocolError, match="fixed newstyle"):
        events(proto)
    proto = ClientProtocol()
    proto.receive_data(struct.pack(">QQH", P.NBDMAGIC, 0x1234, 1))
    with pytest.raises(NotNbdServerError, match="IHAVEOPT"):
        events(proto)


STRUCT_ACK = Server.option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK)
META_ACK = Server.option_reply(Option.SET_META_CONTEXT, OptionReply.ACK)
GO_ACK = Server.option_reply(Option.GO, OptionReply.ACK)


@pytest.mark.parametrize(("after_greeting", "match"), [
    (P.OPTION_REPLY_HEADER.pack(0xDEAD, Option.STRUCTURED_REPLY, OptionReply.ACK, 0), "magic"),
    (Server.option_reply(Option.GO, OptionReply.ACK), "option 7"),
    (Server.option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK, b"x"), "unexpected ACK"),
    (Server.option_reply(Option.STRUCTURED_REPLY, OptionReply.INFO), "unexpected INFO"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation")
     + Server.meta_context(1, "qemu:dirty-bitmap:bm0"), "repeats"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation")
     + Server.meta_context(2, "base:allocation"), "repeats"),
    (STRUCT_ACK + Server.meta_context(1, "x-evil:other"), "not asked for"),
    (STRUCT_ACK + Server.option_reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT,
                                      b"\0\0\0\1\xff\xfe"), "UTF-8"),
    (STRUCT_ACK + Server.option_reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT,
                                      b"\0\0\0\1"), "META_CONTEXT reply of 4"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation") + META_ACK + GO_ACK,
     "without INFO_EXPORT"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation") + META_ACK
     + Server.option_reply(Option.GO, OptionReply.INFO, struct.pack(">HQ", 0, 1)),
     "INFO_EXPORT of 10"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation") + META_ACK
     + Server.info_export(flags=0), "HAS_FLAGS"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation") + META_ACK
     + Server.info_block_size(3, 4096, 1 << 20), "minimum block size 3"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation") + META_ACK
     + Server.option_reply(Option.GO, OptionReply.INFO, b"\0"), "without an information type"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation") + META_ACK
     + Server.option_reply(Option.GO, OptionReply.SERVER, b"x"), "unexpected SERVER"),
    (STRUCT_ACK + Server.option_reply(Option.SET_META_CONTEXT, OptionReply.INFO),
     "unexpected INFO"),
    (STRUCT_ACK + Server.option_reply(Option.SET_META_CONTEXT, 0x77), "reply type 0x77"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation") + META_ACK
     + Server.info_export(size=1 << 63), "beyond 2\\*\\*63"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation") + META_ACK
     + Server.info_block_size(512, 256, 1 << 20), "preferred"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation") + META_ACK
     + Server.info_block_size(512, 4096, 1024), "maximum payload"),
    (STRUCT_ACK + Server.meta_context(1, "base:allocation") + META_ACK
     + Server.option_reply(Option.GO, OptionReply.INFO, struct.pack(">HIIIB", 3, 1, 4096,
                                                                     1 << 20, 0)),
     "INFO_BLOCK_SIZE of 15"),
])
def test_malformed_option_replies_are_protocol_errors(after_greeting, match):
    proto = ClientProtocol("", ["base:allocation"] if b"bm0" not in after_greeting
                           else ["base:allocation", "qemu:dirty-bitmap:bm0"])
    proto.receive_data(Server.greeting() + after_greeting)
    with pytest.raises(NbdProtocolError, match=match):
        events(proto)


def test_an_oversized_option_reply_is_refused_from_its_header_alone():
    proto = ClientProtocol()
    proto.receive_data(Server.greeting() + P.OPTION_REPLY_HEADER.pack(
        P.OPTION_REPLY_MAGIC, Option.STRUCTURED_REPLY, OptionReply.ERR_INVALID, 1 << 30))
    with pytest.raises(NbdProtocolError, match="exceeds"):
        events(proto)


def test_unknown_info_types_and_names_are_ignored():
    proto = ClientProtocol()
    proto.receive_data(Server.greeting() + STRUCT_ACK
                       + Server.option_reply(Option.GO, OptionReply.INFO, b"\x00\x63junk")
                       + Server.option_reply(Option.GO, OptionReply.INFO, b"\x00\x02descr")
                       + Server.info_export(512) + GO_ACK)
    (done,) = events(proto)
    assert done.export.size == 512


def test_bad_local_arguments_are_request_errors():
    with pytest.raises(NbdRequestError, match="namespace"):
        ClientProtocol("", ["allocation"])
    with pytest.raises(NbdRequestError, match="longer than"):
        ClientProtocol("x" * 5000)
    with pytest.raises(NbdRequestError, match="NUL"):
        ClientProtocol("a\0b")


# ------------------------------------------------------------------ every split


DISK = bytes(random.Random(1).randrange(256) for _ in range(3000))
HANDSHAKE = Server.handshake()
REPLIES = b"".join([
    # READ (cookie 1) of 3000 bytes at 1000: out of order, with a hole.
    Server.data(1, 2000, DISK[1000:2000]),
    Server.status(2, 1, [(512, 3), (1 << 20, 0)]),
    Server.hole(1, 1000, 500),
    Server.simple(3),
    Server.data(1, 1500, DISK[500:1000]),
    Server.status(2, 4, [(4096, 1)], DONE),
    Server.data(1, 3000, DISK[2000:], DONE),
    Server.error(4, NbdErrno.EIO, "disk on fire"),
])


def run_conversation(pieces: list[bytes]) -> tuple[list[P.Event], bytearray]:
    proto = ClientProtocol("disk0", CONTEXTS)
    buf = bytearray(b"\xee" * 3000)
    evs: list[P.Event] = []
    requests_sent = False
    for piece in pieces:
        proto.receive_data(piece)
        evs += events(proto)
        if not requests_sent and proto.phase is Phase.TRANSMISSION:
            assert proto.read(1000, memoryview(buf))[0] == 1
            assert proto.block_status(0, 4096)[0] == 2
            assert proto.write(0, 10)[0] == 3
            assert proto.flush()[0] == 4
            requests_sent = True
    return evs, buf


def test_a_whole_conversation_decodes_the_same_split_at_every_byte():
    stream = HANDSHAKE + REPLIES
    whole_events, whole_buf = run_conversation([HANDSHAKE, REPLIES])
    assert [type(e).__name__ for e in whole_events] == [
        "HandshakeDone", "ReplyDone", "ReplyDone", "ReplyDone", "ReplyDone"]
    done = {e.cookie: e for e in whole_events if isinstance(e, ReplyDone)}
    assert done[3].command is Command.WRITE and done[3].error == 0
    assert done[2].status == {1: (Extent(0, 512, 3), Extent(512, 3584, 0)),
                              4: (Extent(0, 4096, 1),)}
    assert done[1].error == 0
    assert (done[4].error, done[4].message) == (NbdErrno.EIO, "disk on fire")
    assert whole_buf == bytes(500) + DISK[500:]
    # Replies cannot come before their requests, which go out once the handshake is done:
    # every piece boundary is also cut at the end of the handshake.
    edge = len(HANDSHAKE)
    for cut in range(1, len(stream)):
        bounds = sorted({0, cut, edge, len(stream)})
        evs, buf = run_conversation([stream[a:b] for a, b in itertools.pairwise(bounds)])
        assert evs == whole_events and buf == whole_buf, cut
    evs, buf = run_conversation([stream[i:i + 1] for i in range(len(stream))])
    assert evs == whole_events and buf == whole_buf


# ------------------------------------------------------------------ requests


def test_request_headers_follow_the_spec():
    proto = connected()
    buf = bytearray(4096)
    assert proto.read(8192, memoryview(buf)) == (
        1, P.REQUEST.pack(P.REQUEST_MAGIC, 0, Command.READ, 1, 8192, 4096))
    assert proto.write(0, 100, fua=True)[1] == P.REQUEST.pack(
        P.REQUEST_MAGIC, CommandFlag.FUA, Command.WRITE, 2, 0, 100)
    assert proto.write_zeroes(512, 1024, no_hole=True, fast=True)[1] == P.REQUEST.pack(
        P.REQUEST_MAGIC, CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO, Command.WRITE_ZEROES,
        3, 512, 1024)
    assert proto.trim(0, 4096)[1] == P.REQUEST.pack(P.REQUEST_MAGIC, 0, Command.TRIM, 4, 0,
                                                    4096)
    assert proto.flush()[1] == P.REQUEST.pack(P.REQUEST_MAGIC, 0, Command.FLUSH, 5, 0, 0)
    assert proto.block_status(0, SIZE, req_one=True)[1] == P.REQUEST.pack(
        P.REQUEST_MAGIC, CommandFlag.REQ_ONE, Command.BLOCK_STATUS, 6, 0, SIZE)
    assert proto.in_flight == 6
    assert proto.disconnect() == P.REQUEST.pack(P.REQUEST_MAGIC, 0, Command.DISC, 7, 0, 0)
    assert proto.phase is Phase.DISCONNECTING
    with pytest.raises(NbdRequestError, match="disconnecting"):
        proto.flush()


def test_requests_the_export_cannot_take_are_refused_before_sending():
    proto = connected(flags=TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY,
                      block_sizes=(512, 4096, 64 << 10))
    buf = memoryview(bytearray(1024))
    for call, match in [
        (lambda: proto.read(SIZE - 512, buf), "past the end"),
        (lambda: proto.read(100, buf[:512]), "aligned"),
        (lambda: proto.read(0, buf[:100]), "aligned"),
        (lambda: proto.read(-512, buf[:512]), "not negative"),
        (lambda: proto.read(0, buf[:0]), "length"),
        (lambda: proto.read(0, memoryview(bytes(512))), "writable"),
        (lambda: proto.read(0, memoryview(bytearray(128 << 10))), "maximum payload"),
        (lambda: proto.read(0, buf[:512], flags=CommandFlag.DF), "DF"),
        (lambda: proto.write(0, 512), "read-only"),
        (lambda: proto.write_zeroes(0, 512), "read-only"),
        (lambda: proto.trim(0, 512), "read-only"),
        (lambda: proto.flush(), "FLUSH"),
    ]:
        with pytest.raises(NbdRequestError, match=match):
            call()
    assert proto.in_flight == 0
    proto = connected(flags=TransmissionFlag.HAS_FLAGS)
    for call, match in [
        (lambda: proto.write(0, 512, fua=True), "FUA"),
        (lambda: proto.write_zeroes(0, 512), "WRITE_ZEROES"),
        (lambda: proto.trim(0, 512), "TRIM"),
        (lambda: proto.write(0, 64 << 20), "past the end|maximum"),
    ]:
        with pytest.raises(NbdRequestError, match=match):
            call()
    proto = connected(flags=TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_WRITE_ZEROES)
    with pytest.raises(NbdRequestError, match="fast"):
        proto.write_zeroes(0, 512, fast=True)
    with pytest.raises(NbdRequestError, match="no requests in the greeting"):
        ClientProtocol().flush()


def test_an_unaligned_tail_at_the_end_of_the_export_is_allowed():
    proto = connected(size=1000, block_sizes=(512, 4096, 1 << 20))
    proto.read(512, memoryview(bytearray(488)))
    with pytest.raises(NbdRequestError, match="aligned"):
        proto.read(512, memoryview(bytearray(400)))


# ------------------------------------------------------------------ READ replies


def read_setup(length: int = 4096, offset: int = 8192, *, margin: int = 64):
    """A connected protocol with one READ in flight into the middle of a canary buffer."""
    proto = connected()
    backing = bytearray(b"\xcc" * (length + 2 * margin))
    view = memoryview(backing)[margin:margin + length]
    cookie, _ = proto.read(offset, view)
    return proto, cookie, backing, margin


def canaries_intact(backing: bytearray, margin: int) -> bool:
    return backing[:margin] == b"\xcc" * margin and backing[-margin:] == b"\xcc" * margin


def test_read_assembles_out_of_order_data_and_holes_over_stale_bytes():
    proto, cookie, backing, margin = read_setup()
    proto.receive_data(Server.hole(cookie, 8192 + 3000, 1096)
                       + Server.data(cookie, 8192 + 1000, b"B" * 2000)
                       + Server.data(cookie, 8192, b"A" * 1000)
                       + Server.none(cookie))
    (done,) = events(proto)
    assert done == ReplyDone(cookie, Command.READ, 8192, 4096)
    assert backing[margin:-margin] == b"A" * 1000 + b"B" * 2000 + bytes(1096)
    assert canaries_intact(backing, margin)
    assert proto.in_flight == 0


def test_read_data_lands_straight_in_the_callers_buffer():
    proto, cookie, backing, margin = read_setup(length=1 << 20, offset=0)
    proto.receive_data(P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, DONE,
                                               ReplyType.OFFSET_DATA, cookie, 8 + (1 << 20))
                       + struct.pack(">Q", 0))
    target = proto.get_buffer()
    assert len(target) == 1 << 20
    assert target.obj is backing   # no copy on the way: the socket writes into our buffer
    target[:] = b"\x5a" * (1 << 20)
    proto.buffer_updated(1 << 20)
    (done,) = events(proto)
    assert done.error == 0 and backing[margin:-margin] == b"\x5a" * (1 << 20)


@pytest.mark.parametrize(("reply", "match"), [
    (lambda c: Server.data(c, 8191, b"x" * 10), "outside"),
    (lambda c: Server.data(c, 8192 + 4090, b"x" * 10), "outside"),
    (lambda c: Server.data(c, 0, b"x"), "outside"),
    (lambda c: Server.data(c, (1 << 64) - 1, b"x"), "outside"),
    (lambda c: Server.hole(c, 8192 + 4000, 200), "outside"),
    (lambda c: Server.hole(c, 100, 1 << 31), "outside"),
    (lambda c: Server.data(c, 8192, b"x" * 100) + Server.data(c, 8192 + 99, b"y"), "overlaps"),
    (lambda c: Server.data(c, 8192 + 100, b"x" * 100) + Server.hole(c, 8192, 101), "overlaps"),
    (lambda c: Server.hole(c, 8192 + 50, 10) + Server.data(c, 8192 + 40, b"y" * 60), "overlaps"),
    (lambda c: Server.data(c, 8192, b"x" * 4095, DONE), "only 4095 bytes"),
    (lambda c: Server.none(c), "only 0 bytes"),
    (lambda c: Server.chunk(c, ReplyType.OFFSET_DATA, b"\0" * 8), "OFFSET_DATA chunk of 8"),
    (lambda c: Server.chunk(c, ReplyType.OFFSET_HOLE, b"\0" * 13), "OFFSET_HOLE chunk of 13"),
    (lambda c: Server.hole(c, 8192, 0), "size 0"),
    (lambda c: Server.chunk(c, ReplyType.NONE, b"", 0), "without the DONE"),
    (lambda c: Server.chunk(c, ReplyType.NONE, b"x", DONE), "payload"),
    (lambda c: Server.chunk(c, 77, b""), "unknown reply chunk type 77"),
    (lambda c: Server.status(c, 1, [(512, 0)]), "BLOCK_STATUS chunk in the reply to READ"),
    (lambda c: Server.simple(c, 0), "simple reply to READ"),
    (lambda c: Server.simple(c + 1, 0), "no request in flight"),
    (lambda c: Server.data(c, 8192, b"x" * 4096, DONE) + Server.none(c), "no request"),
    (lambda c: Server.hole(c, 8192, 10) + Server.simple(c, 5), "after structured chunks"),
    (lambda c: Server.error(c, 0), "error value 0"),
    (lambda c: Server.error(c, 5, "", offset=8192 + 4096), "outside the request"),
    (lambda c: Server.chunk(c, ReplyType.ERROR, struct.pack(">IH", 5, 10) + b"abc"),
     "does not fit"),
    (lambda c: Server.chunk(c, ReplyType.ERROR_OFFSET, struct.pack(">IH", 5, 0)), "too short"),
    (lambda c: struct.pack(">I", 0xDEADBEEF) + bytes(40), "neither simple nor structured"),
    (lambda c: struct.pack(">I", P.EXTENDED_REPLY_MAGIC) + bytes(40), "extended"),
])
def test_hostile_read_replies_are_protocol_errors_and_never_write_outside(reply, match):
    proto, cookie, backing, margin = read_setup()
    fail_with(proto, reply(cookie), match)
    assert canaries_intact(backing, margin)
    assert proto.phase is Phase.CLOSED
    proto.receive_data(b"more garbage" * 1000)   # swallowed; the same error again
    with pytest.raises(NbdProtocolError, match=match):
        proto.next_event()


@pytest.mark.parametrize(("header", "match"), [
    (lambda c: P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, 0, ReplyType.OFFSET_DATA, c,
                                       8 + 4097), "OFFSET_DATA chunk of 4105"),
    (lambda c: P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, 0, ReplyType.ERROR, c,
                                       1 << 30), "exceeds"),
    (lambda c: P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, 0, 0x8123, c, 1 << 31),
     "exceeds"),
])
def test_oversized_chunks_are_refused_from_the_header_alone(header, match):
    proto, cookie, _, _ = read_setup()
    fail_with(proto, header(cookie), match)


def test_error_replies_fail_one_request_and_keep_the_connection():
    proto = connected()
    buf = bytearray(4096)
    c1, _ = proto.read(0, memoryview(buf))
    c2, _ = proto.write(0, 512)
    c3, _ = proto.block_status(0, 512)
    c4, _ = proto.flush()
    proto.receive_data(Server.data(c1, 0, b"x" * 512)
                       + Server.error(c1, NbdErrno.EIO, "bad sector", offset=512, flags=0)
                       + Server.error(c1, NbdErrno.EINVAL, "second")
                       + Server.simple(c2, NbdErrno.ENOSPC)
                       + Server.error(c3, 0x1234, "odd", flags=0)
                       + Server.chunk(c3, 0x8077, struct.pack(">IH", NbdErrno.EPERM, 2)
                                      + b"no" + b"extra", DONE)
                       + Server.simple(c4, NbdErrno.ESHUTDOWN))
    results = {e.cookie: e for e in events(proto)}
    assert (results[c1].error, results[c1].message, results[c1].error_offset) == (
        NbdErrno.EIO, "bad sector", 512)
    assert (results[c2].error, results[c2].message) == (NbdErrno.ENOSPC, "")
    assert (results[c3].error, results[c3].message, results[c3].status) == (0x1234, "odd", {})
    assert results[c4].error == NbdErrno.ESHUTDOWN
    assert P.errno_name(0x1234) == "error 4660" and P.errno_name(28) == "ENOSPC"
    assert proto.phase is Phase.TRANSMISSION and proto.in_flight == 0


def test_an_abandoned_large_read_goes_to_the_discard_buffer_mid_chunk():
    proto, cookie, backing, margin = read_setup(length=1 << 20, offset=0)
    proto.receive_data(P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, DONE,
                                               ReplyType.OFFSET_DATA, cookie, 8 + (1 << 20))
                       + struct.pack(">Q", 0) + b"\x11" * 1000)
    proto.abandon(cookie)   # the caller gave up half way: the rest must not reach its buffer
    proto.receive_data(b"\x22" * ((1 << 20) - 1000))
    (done,) = events(proto)
    assert done.cookie == cookie
    assert backing[margin:margin + 1000] == b"\x11" * 1000
    assert backing[margin + 1000:] == b"\xcc" * ((1 << 20) - 1000 + margin)


def test_abandoned_read_is_consumed_but_its_buffer_left_alone():
    proto, cookie, backing, _margin = read_setup()
    before = bytes(backing)
    proto.abandon(cookie)
    proto.receive_data(Server.data(cookie, 8192, b"Z" * 4096) + Server.none(cookie))
    (done,) = events(proto)
    assert done.cookie == cookie and done.error == 0
    assert bytes(backing) == before


# ------------------------------------------------------------------ BLOCK_STATUS


def status_setup(offset: int = 4096, length: int = 65536, req_one: bool = False):
    proto = connected()
    cookie, _ = proto.block_status(offset, length, req_one=req_one)
    return proto, cookie


def test_block_status_clips_the_last_extent_and_keeps_shorter_answers():
    proto, cookie = status_setup()
    proto.receive_data(Server.status(cookie, 1, [(4096, 3), (1 << 30, 0)])
                       + Server.status(cookie, 4, [(512, 1)], DONE))
    (done,) = events(proto)
    assert done.status == {1: (Extent(4096, 4096, 3), Extent(8192, 65536 - 4096, 0)),
                           4: (Extent(4096, 512, 1),)}


@pytest.mark.parametrize("piece", [1000, 1 << 20])
@pytest.mark.parametrize("done_first", [False, True])
def test_a_large_block_status_chunk_takes_its_own_buffer(piece, done_first):
    proto, cookie = status_setup(0, SIZE)
    extents = [(64, i % 4) for i in range(5000)]
    big = Server.status(cookie, 1, extents, DONE if done_first else 0)
    small = Server.status(cookie, 4, [(SIZE, 0)], 0 if done_first else DONE)
    stream = small + big if done_first else big + small
    assert len(big) > P.MAX_SMALL_MESSAGE
    for i in range(0, len(stream), piece):
        proto.receive_data(stream[i:i + piece])
    (done,) = events(proto)
    assert len(done.status[1]) == 5000
    assert done.status[1][-1] == Extent(64 * 4999, 64, 4999 % 4)


@pytest.mark.parametrize(("reply", "match"), [
    (lambda c: Server.status(c, 1, [(512, 0), (0, 0)], DONE), "length 0"),
    (lambda c: Server.status(c, 1, [(65536, 0), (512, 0)], DONE), "past the requested"),
    (lambda c: Server.status(c, 99, [(512, 0)], DONE), "context id 99"),
    (lambda c: Server.status(c, 1, [(512, 0)]) + Server.status(c, 1, [(512, 0)]), "second"),
    (lambda c: Server.status(c, 1, [(512, 0)], DONE), r"context id\(s\) \[4\]"),
    (lambda c: Server.chunk(c, ReplyType.BLOCK_STATUS, b"\0\0\0\1"), "4 \\+ 8 \\* n"),
    (lambda c: Server.chunk(c, ReplyType.BLOCK_STATUS, b"\0\0\0\1" + bytes(9)), "4 \\+ 8"),
    (lambda c: P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, 0, ReplyType.BLOCK_STATUS, c,
                                       4 + 8 * (P.MAX_DESCRIPTORS + 1)), "4 \\+ 8"),
    (lambda c: Server.data(c, 4096, b"x"), "OFFSET_DATA chunk in the reply to BLOCK_STATUS"),
    (lambda c: Server.simple(c, 0), "simple success reply to BLOCK_STATUS"),
])
def test_hostile_block_status_replies_are_protocol_errors(reply, match):
    proto, cookie = status_setup()
    fail_with(proto, reply(cookie), match)


def test_many_small_replies_in_one_receive_wrap_the_scratch_buffer():
    proto = connected()
    cookies = [proto.flush()[0] for _ in range(8000)]
    stream = b"".join(Server.none(c) for c in reversed(cookies))
    assert len(stream) > 2 * P.SCRATCH_SIZE and len(stream) % 20 == 0
    proto.receive_data(stream)
    assert [e.cookie for e in events(proto)] == cookies[::-1]


def test_a_read_shredded_into_too_many_pieces_is_refused():
    length = 2 * (P.MAX_FRAGMENTS + 1)
    proto = connected()
    cookie, _ = proto.read(0, memoryview(bytearray(length)))
    stream = b"".join(Server.data(cookie, i, b"x") for i in range(0, length, 2))
    fail_with(proto, stream, "more than 4096 pieces")


def test_error_offset_for_a_command_without_a_range_is_refused():
    proto = connected()
    cookie, _ = proto.flush()
    fail_with(proto, Server.error(cookie, 5, "x", offset=0), "ERROR_OFFSET chunk in the reply "
                                                              "to FLUSH")


def test_req_one_means_exactly_one_extent_no_longer_than_asked():
    proto, cookie = status_setup(req_one=True)
    fail_with(proto, Server.status(cookie, 1, [(512, 0), (512, 1)]), "2 extents")
    proto, cookie = status_setup(req_one=True)
    fail_with(proto, Server.status(cookie, 1, [(65537, 0)]), "longer than the request")


# ------------------------------------------------------------------ the end


def test_eof_reasons():
    proto = ClientProtocol()
    assert "during the handshake" in proto.receive_eof()
    proto = connected()
    assert proto.receive_eof() == "the server closed the connection"
    proto = connected()
    proto.flush()
    assert "1 request(s) unanswered" in proto.receive_eof()
    proto, cookie, _, _ = read_setup()
    proto.receive_data(Server.data(cookie, 8192, b"x" * 10)[:-5])
    assert "in the middle of a reply" in proto.receive_eof()
    proto = connected()
    proto.disconnect()
    assert proto.receive_eof() is None


# ------------------------------------------------------------------ generated


@st.composite
def read_replies(draw):
    """A READ of a generated range answered by a valid, shuffled set of data/hole chunks."""
    length = draw(st.integers(1, 5000))
    offset = draw(st.integers(0, SIZE - length))
    cuts = sorted(set(draw(st.lists(st.integers(1, length - 1), max_size=12)))
                  if length > 1 else [])
    bounds = [0, *cuts, length]
    disk = draw(st.binary(min_size=length, max_size=length))
    pieces = []
    for start, end in itertools.pairwise(bounds):
        as_hole = draw(st.booleans())
        pieces.append((start, end, as_hole))
    order = draw(st.permutations(pieces))
    end_with_none = draw(st.booleans())
    return offset, length, disk, order, end_with_none


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(read_replies(), st.lists(st.integers(1, 300), min_size=1, max_size=30))
def test_generated_read_replies_reassemble_exactly(case, split_sizes):
    offset, length, disk, order, end_with_none = case
    proto = connected()
    backing = bytearray(b"\xcc" * (length + 32))
    view = memoryview(backing)[16:16 + length]
    cookie, _ = proto.read(offset, view)
    stream = b""
    expected = bytearray(disk)
    for index, (start, end, as_hole) in enumerate(order):
        last = index == len(order) - 1 and not end_with_none
        flags = DONE if last else 0
        if as_hole:
            stream += Server.hole(cookie, offset + start, end - start, flags)
            expected[start:end] = bytes(end - start)
        else:
            stream += Server.data(cookie, offset + start, disk[start:end], flags)
    if end_with_none:
        stream += Server.none(cookie)
    position = 0
    sizes = iter(split_sizes * (len(stream) // len(split_sizes) + 1))
    while position < len(stream):
        n = next(sizes)
        proto.receive_data(stream[position:position + n])
        position += n
    (done,) = events(proto)
    assert done.error == 0 and backing[16:-16] == expected
    assert canaries_intact(backing, 16)


def hostile_chunk(cookies: list[int]):
    """A structured chunk or simple reply with fields drawn near (and across) every bound."""
    cookie = st.one_of(st.sampled_from(cookies), st.integers(0, (1 << 64) - 1))
    offset = st.one_of(st.integers(0, 3 * 8192), st.integers(0, (1 << 64) - 1))
    small = st.integers(0, 6000)
    data_chunk = st.builds(lambda c, o, n, f: Server.data(c, o, b"\xab" * n, f),
                           cookie, offset, small, st.sampled_from([0, DONE]))
    hole_chunk = st.builds(lambda c, o, n, f: Server.hole(c, o, n, f),
                           cookie, offset, st.integers(0, (1 << 32) - 1), st.sampled_from([0, 1]))
    status_chunk = st.builds(
        lambda c, ctx, ext, f: Server.status(c, ctx, ext, f),
        cookie, st.sampled_from([1, 4, 0, 9]),
        st.lists(st.tuples(st.integers(0, 1 << 17), st.integers(0, 3)), max_size=8),
        st.sampled_from([0, DONE]))
    error_chunk = st.builds(lambda c, e, m, o, f: Server.error(c, e, m, o, f),
                            cookie, st.integers(0, 200), st.text(max_size=20),
                            st.one_of(st.none(), offset), st.sampled_from([0, DONE]))
    raw_chunk = st.builds(lambda c, k, p, f: Server.chunk(c, k, p, f), cookie,
                          st.integers(0, 0xFFFF), st.binary(max_size=64), st.integers(0, 3))
    lying_length = st.builds(
        lambda c, k, n, p: P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, 0, k, c, n) + p,
        cookie, st.sampled_from(list(ReplyType)), st.integers(0, (1 << 32) - 1),
        st.binary(max_size=64))
    simple = st.builds(lambda c, e, p: Server.simple(c, e, p), cookie, st.integers(0, 30),
                       st.binary(max_size=32))
    garbage = st.binary(min_size=1, max_size=64)
    return st.one_of(data_chunk, hole_chunk, status_chunk, error_chunk, raw_chunk,
                     lying_length, simple, garbage)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_generated_hostile_replies_raise_only_protocol_errors_and_stay_in_bounds(data):
    proto = connected()
    margin = 32
    backings = []
    cookies = []
    for offset, length in [(0, 4096), (8192, 100), (16384, 8192)]:
        backing = bytearray(b"\xcc" * (length + 2 * margin))
        cookies.append(proto.read(offset, memoryview(backing)[margin:margin + length])[0])
        backings.append(backing)
    cookies.append(proto.block_status(0, 65536)[0])
    cookies.append(proto.write(4096, 512)[0])
    chunks = data.draw(st.lists(hostile_chunk(cookies), min_size=1, max_size=8))
    stream = b"".join(chunks)
    split = data.draw(st.integers(1, max(1, len(stream))))
    try:
        for i in range(0, len(stream), split):
            proto.receive_data(stream[i:i + split])
            for event in events(proto):
                assert isinstance(event, ReplyDone) and event.cookie in cookies
    except NbdProtocolError:
        assert proto.phase is Phase.CLOSED
    for backing in backings:
        assert canaries_intact(backing, margin)

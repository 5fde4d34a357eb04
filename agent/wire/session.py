"""One end of a ferry channel without I/O: preamble, Noise XX handshake, trust verdicts, messages.

Feed it the peer's bytes (`receive_data`, or `get_buffer`/`buffer_updated`), take events with
`next_event()` (None means "need more bytes"), and write whatever `data_to_send()` returns.
Every error the peer can cause is raised from `next_event()` as a FerryError subclass, after
which the session is FAILED and `data_to_send()` may still hold a last word for the peer (an
ERROR frame, a refusal).

The conversation (-> initiator to responder, <- back):

    -> preamble, [len] Noise msg 1 (e)              <- preamble            (both at once)
    <- [len] Noise msg 2 (e, ee, s, es)
    -> [len] Noise msg 3 (s, se, payload: the initiator's verdict on the responder's key)
    <- frame ACCEPT, or REFUSE if the responder does not trust the initiator's key
    <-> frames

The preamble (magic and version, in the clear) lets either side name a stranger or a version
mismatch; it is also the Noise prologue, so a middleman who rewrites it breaks the handshake.
Handshake messages carry a u16 length. After Split() everything is a frame (agent.wire.frames).

The states and the transitions between them are the table TRANSITIONS below, the one place
they are written down; `_enter` refuses any other move.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from enum import Enum, IntEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.errors import (
    FerryError,
    HandshakeError,
    LocalError,
    MessageError,
    NotFerryPeerError,
    PeerReportedError,
    RefusedByPeerError,
    StreamEndError,
    UntrustedPeerError,
    VersionMismatchError,
    WireCode,
    WireError,
)
from agent.wire.frames import (
    MAX_PAYLOAD,
    REKEY_AFTER_BYTES,
    REKEY_AFTER_FRAMES,
    Buffer,
    FrameDecoder,
    FrameSealer,
)
from agent.wire.keys import encode_key, fingerprint
from agent.wire.messages import (
    CHANNEL_TYPES,
    Event,
    Goodbye,
    Message,
    MsgType,
    Opened,
    decode_control,
    encode_control,
    message_type,
)
from agent.wire.noise import HandshakeState, public_bytes

WIRE_VERSION = 1
"""Version of this wire protocol; both agents must speak the same."""
MAGIC = b"FERRY\n"
PREAMBLE = struct.Struct(">6sH")
"""Sent first by both sides, in the clear: MAGIC and WIRE_VERSION."""
HANDSHAKE_LENGTH = struct.Struct(">H")
"""Length prefix of a Noise handshake message."""
MAX_HANDSHAKE_MESSAGE = 512
"""Our three messages are 32, 96 and 65 bytes; anything much longer is garbage."""
HANDSHAKE_BUFFER_LIMIT = PREAMBLE.size + 2 * (HANDSHAKE_LENGTH.size + MAX_HANDSHAKE_MESSAGE)
"""Most bytes a peer may send before the transport starts."""
HANDSHAKE_SCRATCH = 4096


class Verdict(IntEnum):
    """Payload of Noise message 3: what the initiator thinks of the responder's key."""

    TRUSTED = 1
    """The responder's key is in the initiator's trusted peers."""
    UNTRUSTED = 2
    """It is not: the initiator ends the channel and the responder must too."""


_VERDICTS = frozenset(int(v) for v in Verdict)


class State(Enum):
    """Where a session is; see TRANSITIONS."""

    PREAMBLE = "preamble"    # waiting for the peer's preamble
    HANDSHAKE = "handshake"  # Noise messages in flight
    VERDICT = "verdict"      # initiator: message 3 sent, waiting for ACCEPT or REFUSE
    OPEN = "open"            # messages flow both ways
    CLOSED = "closed"        # GOODBYE sent or received: nothing more flows
    FAILED = "failed"        # an error ended the session


TRANSITIONS: dict[State, frozenset[State]] = {
    State.PREAMBLE: frozenset({State.HANDSHAKE, State.FAILED}),
    State.HANDSHAKE: frozenset({State.VERDICT, State.OPEN, State.FAILED}),
    State.VERDICT: frozenset({State.OPEN, State.FAILED}),
    State.OPEN: frozenset({State.CLOSED, State.FAILED}),
    State.CLOSED: frozenset({State.FAILED}),  # bytes after GOODBYE
    State.FAILED: frozenset(),
}


def preamble(version: int = WIRE_VERSION) -> bytes:
    """The first bytes either side sends."""
    return PREAMBLE.pack(MAGIC, version)


class Session:
    """One end of a channel. Not thread-safe: the glue serializes every call.

    `is_trusted(key)` decides whether a peer's static public key may talk to us.
    `expected_key`, on the initiator, further requires the responder to be that one peer.
    `ephemeral_key` and the rekey limits exist for tests.
    """

    def __init__(self, *, initiator: bool, static_key: X25519PrivateKey,
                 is_trusted: Callable[[bytes], bool], expected_key: bytes | None = None,
                 version: int = WIRE_VERSION, ephemeral_key: X25519PrivateKey | None = None,
                 rekey_after_bytes: int = REKEY_AFTER_BYTES,
                 rekey_after_frames: int = REKEY_AFTER_FRAMES) -> None:
        if not 0 <= version <= 0xFFFF:
            raise ValueError("version must fit 16 bits")
        self.initiator = initiator
        self.version = version
        self.state = State.PREAMBLE
        self.peer_key: bytes | None = None
        self._static_key = static_key
        self._our_key = public_bytes(static_key)
        self._is_trusted = is_trusted
        self._expected_key = expected_key
        self._rekey = {"rekey_after_bytes": rekey_after_bytes,
                       "rekey_after_frames": rekey_after_frames}
        self._noise = HandshakeState(initiator=initiator, static_key=static_key,
                                     prologue=preamble(version), ephemeral_key=ephemeral_key)
        self._hs_scratch = bytearray(HANDSHAKE_SCRATCH)
        self._hs_buf = bytearray()
        self._sealer: FrameSealer | None = None
        self._decoder: FrameDecoder | None = None
        self._outgoing: list[bytes | tuple[MsgType, bytes]] = []
        self._eof = False
        self._failure: FerryError | None = None
        self._goodbye_sent = False
        self._outgoing.append(preamble(version))
        if initiator:
            self._queue_handshake(self._noise.write_message(b""))

    # ---- properties ----

    @property
    def our_key(self) -> bytes:
        """Our static public key."""
        return self._our_key

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    @property
    def buffered(self) -> int:
        """Received bytes held and not yet turned into events."""
        if self._decoder is not None:
            return len(self._hs_buf) + self._decoder.buffered
        return len(self._hs_buf)

    @property
    def handshake_hash(self) -> bytes:
        """Noise's h: the same on both ends after the handshake (channel binding)."""
        return self._noise.handshake_hash

    @property
    def rekeys(self) -> tuple[int, int]:
        """How often each direction (send, receive) has rekeyed."""
        return (self._sealer.rekeys if self._sealer else 0,
                self._decoder.rekeys if self._decoder else 0)

    # ---- receiving ----

    def get_buffer(self) -> memoryview:
        """Where the next received bytes should go (for asyncio.BufferedProtocol)."""
        if self._decoder is not None and self.state is not State.FAILED:
            target = self._decoder.get_buffer()
            if len(target):
                return target
        return memoryview(self._hs_scratch)

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were written at the start of the buffer from get_buffer()."""
        if self.state is State.FAILED or nbytes <= 0:
            return
        if self._decoder is not None:
            if self._decoder.failed:
                return
            self._decoder.buffer_updated(nbytes)
        elif len(self._hs_buf) <= HANDSHAKE_BUFFER_LIMIT:
            self._hs_buf += memoryview(self._hs_scratch)[:nbytes]
        # else: more than a handshake can hold; next_event() says so, the rest is dropped

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes received from the peer."""
        view = memoryview(data).cast("B")
        while view and self.state is not State.FAILED:
            target = self.get_buffer()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]
            if self._decoder is not None and self._decoder.failed:
                break

    def receive_eof(self) -> None:
        """The peer will send nothing more."""
        self._eof = True

    def next_event(self) -> Event | None:
        """The next event, or None if more bytes are needed. Raises what ended the session."""
        if self._failure is not None:
            raise self._failure
        try:
            event = self._next_event()
            if event is None and self._eof:
                self._raise_for_eof()
            return event
        except FerryError as exc:
            self._fail(exc)
            raise

    # ---- sending ----

    def data_to_send(self) -> list[bytes]:
        """Bytes to write to the peer, in order; each call returns what was queued since."""
        out: list[bytes] = []
        for item in self._outgoing:
            if isinstance(item, tuple):
                if self._sealer is None:
                    raise LocalError("frame queued before the transport keys exist")
                out.extend(self._sealer.seal(item[0], item[1]))
            else:
                out.append(item)
        self._outgoing.clear()
        return out

    def seal(self, msg_type: MsgType, payload: Buffer) -> tuple[bytes, bytes]:
        """(header, ciphertext) of one application message. Copies `payload`.

        Frames must reach the wire in the order they were sealed: write what
        data_to_send() returns (it seals the channel's own queued frames) before this,
        and never run two seal()/data_to_send() calls at the same time.
        """
        self._check_sealable(msg_type, payload)
        assert self._sealer is not None
        return self._sealer.seal(msg_type, payload)

    def seal_into(self, msg_type: MsgType, payload: Buffer, out: bytearray) -> memoryview:
        """Like seal(), but the frame is written into `out` (at least
        frames.frame_size(len(payload)) bytes); returns the view of it."""
        self._check_sealable(msg_type, payload)
        assert self._sealer is not None
        return self._sealer.seal_into(msg_type, payload, out)

    def send(self, msg_type: MsgType, payload: Buffer) -> None:
        """Queue one application message for data_to_send()."""
        self._outgoing.extend(self.seal(msg_type, payload))

    def send_control(self, msg_type: MsgType, body: Mapping[str, Any]) -> None:
        """Queue one control message whose payload is the JSON of `body`."""
        if not msg_type.is_control:
            raise LocalError(f"{msg_type.name} is a data message")
        self.send(msg_type, encode_control(body))

    def close(self) -> None:
        """Say GOODBYE (if the channel is open) and stop sending."""
        if self.state is State.OPEN:
            self._queue_frame(MsgType.GOODBYE, {})
            self._goodbye_sent = True
            self._enter(State.CLOSED)

    def abort(self, error: FerryError) -> None:
        """End the session because of a local failure; the peer is told if it can be."""
        if self.state is not State.FAILED:
            self._fail(error)

    # ---- internals: state ----

    def _enter(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            raise LocalError(f"illegal session transition {self.state.name} -> {state.name}")
        self.state = state

    def _check_sealable(self, msg_type: MsgType, payload: Buffer) -> None:
        self._check_can_send(msg_type)
        if msg_type.is_control:
            try:
                decode_control(bytes(payload))
            except MessageError as exc:
                raise LocalError(f"{msg_type.name} payload is not a JSON object") from exc

    def _check_can_send(self, msg_type: MsgType) -> None:
        if not isinstance(msg_type, MsgType):
            raise LocalError(f"message type must be a MsgType, not {msg_type!r}")
        if msg_type in CHANNEL_TYPES:
            raise LocalError(f"{msg_type.name} is sent by the channel itself")
        if self.state is not State.OPEN:
            if self._failure is not None:
                raise self._failure
            raise LocalError(f"cannot send in state {self.state.name}")

    def _fail(self, error: FerryError) -> None:
        if self._failure is None:
            self._failure = error
        # Tell the peer why, if it can read us and the error is not its own report or a
        # refusal (those already carry their last word).
        if (isinstance(error, WireError) and self._sealer is not None
                and self.state in (State.VERDICT, State.OPEN, State.HANDSHAKE)
                and not self._goodbye_sent):
            self._queue_frame(MsgType.ERROR, {"code": int(error.code), "message": str(error)})
        self.state = State.FAILED

    def _raise_for_eof(self) -> None:
        if self.state is State.CLOSED:
            return
        if self.state in (State.PREAMBLE, State.HANDSHAKE, State.VERDICT):
            raise StreamEndError("the peer closed the connection during the handshake",
                                 WireCode.TRUNCATED)
        assert self._decoder is not None
        where = "inside a frame" if not self._decoder.at_frame_boundary else "without GOODBYE"
        raise StreamEndError(f"the peer's stream ended {where}", WireCode.TRUNCATED)

    # ---- internals: handshake ----

    def _queue_handshake(self, message: bytes) -> None:
        self._outgoing.append(HANDSHAKE_LENGTH.pack(len(message)) + message)

    def _queue_frame(self, msg_type: MsgType, body: Mapping[str, Any]) -> None:
        self._outgoing.append((msg_type, encode_control(body)))

    def _take_handshake_message(self) -> bytes | None:
        buf = self._hs_buf
        if len(buf) < HANDSHAKE_LENGTH.size:
            return None
        (length,) = HANDSHAKE_LENGTH.unpack_from(buf)
        if length > MAX_HANDSHAKE_MESSAGE:
            raise HandshakeError(f"handshake message of {length} bytes exceeds "
                                 f"{MAX_HANDSHAKE_MESSAGE} (garbage in the handshake)")
        end = HANDSHAKE_LENGTH.size + length
        if len(buf) < end:
            return None
        message = bytes(buf[HANDSHAKE_LENGTH.size:end])
        del buf[:end]
        return message

    def _next_event(self) -> Event | None:
        while True:
            state = self.state
            if state is State.PREAMBLE:
                if not self._read_preamble():
                    return None
            elif state is State.HANDSHAKE:
                if len(self._hs_buf) > HANDSHAKE_BUFFER_LIMIT:
                    raise HandshakeError(f"peer sent more than {HANDSHAKE_BUFFER_LIMIT} bytes "
                                         f"during the handshake")
                message = self._take_handshake_message()
                if message is None:
                    return None
                event = self._handshake_step(message)
                if event is not None:
                    return event
            elif state is State.VERDICT:
                return self._read_verdict()
            elif state is State.OPEN:
                return self._read_message()
            elif state is State.CLOSED:
                if self.buffered or (self._decoder is not None and self._decoder.failed):
                    raise StreamEndError("the peer sent bytes after GOODBYE",
                                         WireCode.TRAILING_DATA)
                return None
            else:  # FAILED: next_event raised the failure already
                raise LocalError("session failed")

    def _read_preamble(self) -> bool:
        buf = self._hs_buf
        head = bytes(buf[:len(MAGIC)])
        if not MAGIC.startswith(head):
            raise NotFerryPeerError(f"the peer is not a ferry agent (it sent "
                                    f"{bytes(buf[:16])!r}...)")
        if len(buf) < PREAMBLE.size:
            return False
        _, version = PREAMBLE.unpack_from(buf)
        if version != self.version:
            raise VersionMismatchError(self.version, version)
        del buf[:PREAMBLE.size]
        self._enter(State.HANDSHAKE)
        return True

    def _handshake_step(self, message: bytes) -> Event | None:
        noise = self._noise
        step = noise.message_index
        if step == 0:                                      # responder reads message 1
            if noise.read_message(message):
                raise HandshakeError("unexpected payload in handshake message 1")
            self._queue_handshake(noise.write_message(b""))  # and answers with message 2
            return None
        if step == 1:                                      # initiator reads message 2
            if noise.read_message(message):
                raise HandshakeError("unexpected payload in handshake message 2")
            self.peer_key = noise.remote_static
            assert self.peer_key is not None
            trusted = self._is_trusted(self.peer_key)
            expected = self._expected_key is None or self.peer_key == self._expected_key
            verdict = Verdict.TRUSTED if trusted and expected else Verdict.UNTRUSTED
            self._queue_handshake(noise.write_message(bytes([verdict])))  # message 3
            self._start_transport()
            if not trusted:
                raise self._untrusted()
            if not expected:
                raise self._untrusted(" (not the key expected at that address)")
            self._enter(State.VERDICT)
            return None
        payload = noise.read_message(message)             # responder reads message 3
        if len(payload) != 1 or payload[0] not in _VERDICTS:
            raise HandshakeError("malformed verdict in handshake message 3")
        self.peer_key = noise.remote_static
        assert self.peer_key is not None
        self._start_transport()
        if not self._is_trusted(self.peer_key):
            self._queue_frame(MsgType.REFUSE, {})
            raise self._untrusted()
        if payload[0] == Verdict.UNTRUSTED:
            raise self._refused()
        self._queue_frame(MsgType.ACCEPT, {})
        self._enter(State.OPEN)
        return Opened(self.peer_key)

    def _start_transport(self) -> None:
        send_key, receive_key = self._noise.split()
        self._sealer = FrameSealer(send_key, **self._rekey)
        self._decoder = FrameDecoder(receive_key, **self._rekey)
        leftover = bytes(self._hs_buf)
        self._hs_buf.clear()
        if leftover:
            self._decoder.receive_data(leftover)

    def _untrusted(self, detail: str = "") -> UntrustedPeerError:
        assert self.peer_key is not None
        return UntrustedPeerError(encode_key(self.peer_key), fingerprint(self.peer_key), detail)

    def _refused(self) -> RefusedByPeerError:
        return RefusedByPeerError(encode_key(self._our_key), fingerprint(self._our_key))

    # ---- internals: transport ----

    def _read_verdict(self) -> Event | None:
        assert self._decoder is not None and self.peer_key is not None
        frame = self._decoder.next_frame()
        if frame is None:
            return None
        msg_type = message_type(frame.type_code)
        if msg_type is MsgType.ACCEPT:
            decode_control(frame.payload)
            self._enter(State.OPEN)
            return Opened(self.peer_key)
        if msg_type is MsgType.REFUSE:
            raise self._refused()
        if msg_type is MsgType.ERROR:
            raise self._peer_error(frame.payload)
        raise MessageError(f"{msg_type.name} before the responder's verdict",
                           WireCode.UNEXPECTED_MESSAGE)

    def _read_message(self) -> Event | None:
        assert self._decoder is not None
        frame = self._decoder.next_frame()
        if frame is None:
            return None
        msg_type = message_type(frame.type_code)
        if msg_type.is_control:
            body = decode_control(frame.payload)
            if msg_type is MsgType.GOODBYE:
                self._enter(State.CLOSED)
                if self.buffered:
                    raise StreamEndError("the peer sent bytes after GOODBYE",
                                         WireCode.TRAILING_DATA)
                return Goodbye()
            if msg_type is MsgType.ERROR:
                raise self._peer_error(frame.payload, body)
            if msg_type in CHANNEL_TYPES:
                raise MessageError(f"{msg_type.name} on an open channel",
                                   WireCode.UNEXPECTED_MESSAGE)
        return Message(msg_type, frame.payload)

    @staticmethod
    def _peer_error(payload: bytes | memoryview,
                    body: dict[str, Any] | None = None) -> PeerReportedError:
        if body is None:
            body = decode_control(payload)
        code, text = body.get("code"), body.get("message")
        if not isinstance(code, int) or not isinstance(text, str):
            raise MessageError("malformed ERROR message", WireCode.MALFORMED_MESSAGE)
        return PeerReportedError(code, text[:500])


__all__ = [
    "HANDSHAKE_BUFFER_LIMIT",
    "MAGIC",
    "MAX_PAYLOAD",
    "PREAMBLE",
    "TRANSITIONS",
    "WIRE_VERSION",
    "Session",
    "State",
    "Verdict",
    "preamble",
]

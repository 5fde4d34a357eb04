"""Typed messages of the channel: every type code, and the events a session yields.

A code below DATA_TYPE_MIN is a control message whose payload is one UTF-8 JSON object; a code
from DATA_TYPE_MIN up is a data message whose payload is opaque bytes (page batches, device
state). The first four codes belong to the channel itself and are never handed to the
application; the rest are for the application (migration, tests, benchmarks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from agent.errors import MessageError, WireCode

DATA_TYPE_MIN = 0x80
"""Type codes from here up carry binary data; below, a JSON object."""
MAX_CONTROL_PAYLOAD = 1 << 20
"""Largest JSON payload of a control message (bytes)."""


class MsgType(IntEnum):
    """Type code of a message, sent in the clear in the frame header and authenticated."""

    # The channel's own messages (never returned by Channel.receive).
    ACCEPT = 0x01
    """Responder to initiator: your key is trusted; the channel is open."""
    REFUSE = 0x02
    """Responder to initiator: your key is not trusted; the channel closes."""
    GOODBYE = 0x03
    """The sender is done and closes the channel; nothing follows."""
    ERROR = 0x04
    """The sender hit an error and closes the channel: {"code": int, "message": str}."""

    # Application control messages (JSON objects).
    CONTROL = 0x10
    """Free-form control message for tools and tests."""
    PREPARE = 0x11
    """Source to destination: the VM description; start an incoming QEMU."""
    PREPARED = 0x12
    """Destination to source: the incoming QEMU is ready for pages."""
    ROUND_BEGIN = 0x13
    """Source to destination: a round of pages or blocks starts."""
    ROUND_END = 0x14
    """Source to destination: a round ended; what it sent."""
    ROUND_ACK = 0x15
    """Destination to source: everything of the round is written."""
    COMMIT = 0x16
    """Source to destination: resume the guest; the source will not."""
    COMMITTED = 0x17
    """Destination to source: the guest runs here."""
    ABORT = 0x18
    """Either side: give up the migration; the destination removes its copy."""
    STATUS = 0x19
    """Either side: a question or an answer about a job's state (e.g. an unknown outcome)."""

    # Data messages (opaque bytes).
    DATA = 0x80
    """Opaque application bytes (tests, benchmarks)."""
    RAM_PAGES = 0x81
    """One encoded batch of guest RAM pages (agent.batch.format)."""
    DISK_BLOCKS = 0x82
    """One encoded batch of disk blocks (agent.batch.format)."""
    QEMU_STREAM = 0x83
    """A chunk of QEMU's migration stream (all but the main RAM block's pages: framing,
    other RAM blocks, device state), rewritten for the destination QEMU."""

    @property
    def is_control(self) -> bool:
        """True if the payload is a JSON object."""
        return self < DATA_TYPE_MIN


CHANNEL_TYPES = frozenset({MsgType.ACCEPT, MsgType.REFUSE, MsgType.GOODBYE, MsgType.ERROR})
"""Types the channel sends and consumes itself; the application may not send them."""


def message_type(code: int) -> MsgType:
    """The MsgType of a code read from the wire; an unknown code is the peer's error."""
    try:
        return MsgType(code)
    except ValueError:
        raise MessageError(f"unknown message type code 0x{code:02x}",
                           WireCode.UNKNOWN_TYPE) from None


def encode_control(body: Mapping[str, Any]) -> bytes:
    """The wire payload of a control message: compact UTF-8 JSON of one object."""
    data = json.dumps(dict(body), separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")
    if len(data) > MAX_CONTROL_PAYLOAD:
        raise ValueError(f"control message of {len(data)} bytes exceeds {MAX_CONTROL_PAYLOAD}")
    return data


def decode_control(payload: bytes | memoryview) -> dict[str, Any]:
    """The JSON object of a control payload; anything else is the peer's error."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise MessageError(f"control message of {len(payload)} bytes exceeds "
                           f"{MAX_CONTROL_PAYLOAD}", WireCode.MALFORMED_MESSAGE)
    try:
        body = json.loads(str(payload, "utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"control payload is not UTF-8 JSON: {exc}",
                           WireCode.MALFORMED_MESSAGE) from None
    if not isinstance(body, dict):
        raise MessageError("control payload is not a JSON object", WireCode.MALFORMED_MESSAGE)
    return body


# ---- events returned by Session.next_event ----


@dataclass(frozen=True, slots=True)
class Opened:
    """The handshake finished and both sides trust each other; messages may flow."""

    peer_key: bytes

    def __post_init__(self) -> None:
        if len(self.peer_key) != 32:
            raise ValueError("peer_key must be 32 bytes")


@dataclass(frozen=True, slots=True)
class Message:
    """One application message: its type and payload (JSON bytes for control types).

    Unpacks like a pair: `msg_type, payload = await channel.receive()`. A payload of 64 KiB
    or more is a read-only memoryview (of a receive buffer that is reused once no view of it
    is left); smaller ones are bytes.
    """

    type: MsgType
    payload: bytes | memoryview

    def __post_init__(self) -> None:
        if not isinstance(self.type, MsgType):
            raise TypeError(f"type must be a MsgType, not {self.type!r}")
        if self.type in CHANNEL_TYPES:
            raise ValueError(f"{self.type.name} belongs to the channel, not the application")

    def __iter__(self) -> Iterator[Any]:
        return iter((self.type, self.payload))

    def control(self) -> dict[str, Any]:
        """The JSON object of a control message."""
        if not self.type.is_control:
            raise ValueError(f"{self.type.name} is a data message")
        return decode_control(self.payload)


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The peer closed the channel cleanly; nothing more will arrive."""


Event = Opened | Message | Goodbye

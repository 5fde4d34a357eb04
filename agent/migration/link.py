"""The migration's view of the peer channel: kinds and control messages over any Link."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Protocol

from agent.errors import PeerError, ProtocolError
from agent.migration.protocol import Control, Kind, Op, control


class Link(Protocol):
    """A reliable, ordered, authenticated message pipe to the other agent."""

    async def send(self, kind: int, payload: bytes | memoryview) -> None: ...

    async def receive(self) -> tuple[int, bytes | memoryview]: ...

    async def close(self) -> None: ...


class RemoteFailure(PeerError):
    """The other agent reported that its side of the job failed."""


async def send_control(link: Link, op: Op, **body: object) -> None:
    """Send one control message."""
    await link.send(Kind.CONTROL, control(op, **body).encode())


def parse_message(kind: int, payload: bytes | memoryview) -> Control | None:
    """The Control in a message, None for data kinds; unknown kinds are protocol errors."""
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    return Control.decode(payload) if kind is Kind.CONTROL else None


async def expect_control(link: Link, ops: Collection[Op], *, timeout: float | None,
                         what: str) -> Control:
    """Wait for a control message with one of `ops`; ERROR replies raise RemoteFailure."""
    try:
        async with asyncio.timeout(timeout):
            kind, payload = await link.receive()
    except TimeoutError:
        raise PeerError(f"no answer from the destination within {timeout:g} s ({what})") from None
    msg = parse_message(kind, payload)
    if msg is None:
        raise ProtocolError(f"expected a control message ({what}), got data kind {kind}")
    if msg.op is Op.ERROR:
        raise RemoteFailure(str(msg.body.get("message", "the peer failed")))
    if msg.op not in ops:
        raise ProtocolError(f"expected {'/'.join(o.value for o in ops)} ({what}), "
                            f"got {msg.op.value}")
    return msg

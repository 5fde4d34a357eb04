"""The migration's view of the peer channel: kinds and control messages over any Link."""

from __future__ import annotations

import asyncio
import contextlib
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
    """The other agent reported that its side of the job failed; `outcome` is what it did
    with its copy when it says (removed: the source may resume)."""

    failure_reason = "destination"

    def __init__(self, message: str, outcome: str | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome


def remote_failure(msg: Control) -> RemoteFailure:
    return RemoteFailure(str(msg.body.get("message", "the peer failed")),
                         msg.body.get("outcome") if isinstance(msg.body.get("outcome"), str)
                         else None)


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


class Inbox:
    """Reads everything the destination says, all the time, so that its ERROR is heard
    even while the source is busy sending pages; replies are taken with `expect`."""

    # How long to wait, after a send failed, for the peer's ERROR explaining why.
    EXPLAIN_WAIT_S = 1.0

    def __init__(self, link: Link) -> None:
        self.link = link
        self.error: Exception | None = None
        self._queue: asyncio.Queue[Control | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._read(), name="inbox")

    async def _read(self) -> None:
        try:
            while True:
                kind, payload = await self.link.receive()
                msg = parse_message(kind, payload)
                if msg is None:
                    raise ProtocolError(f"unexpected data message kind {kind} from the peer")
                if msg.op is Op.ERROR and self.error is None:
                    self.error = remote_failure(msg)
                await self._queue.put(msg)
        except (PeerError, ConnectionError, OSError) as exc:
            if self.error is None:
                self.error = exc
            await self._queue.put(None)

    def check(self) -> None:
        """Raise the peer's reported failure, if any (called between sends)."""
        if isinstance(self.error, RemoteFailure):
            raise self.error

    async def explain(self, exc: BaseException) -> BaseException:
        """The peer's own reason for a failure seen locally (e.g. a lost link), if it sent
        one; else exc."""
        if not isinstance(self.error, RemoteFailure):
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), self.EXPLAIN_WAIT_S)
        return self.error if isinstance(self.error, RemoteFailure) else exc

    async def expect(self, ops: Collection[Op], *, timeout: float | None, what: str) -> Control:
        """The next control message, which must have one of `ops`."""
        try:
            msg = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise PeerError(f"no answer from the peer within {timeout:g} s ({what})") from None
        if msg is None:
            assert self.error is not None
            raise self.error if isinstance(self.error, PeerError) else PeerError(
                f"link to the peer lost ({what}): {self.error}")
        if msg.op is Op.ERROR:
            raise remote_failure(msg)
        if msg.op not in ops:
            raise ProtocolError(f"expected {'/'.join(o.value for o in ops)} ({what}), "
                                f"got {msg.op.value}")
        return msg

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

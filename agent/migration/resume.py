"""Pre-copy that survives a lost link: the source reconnects and resends only what the
destination lacks, instead of starting over.

Every message the source sends is numbered; the destination counts what it received and
says so now and then (ACK {received}), so the source keeps copies of the unacknowledged
ones only (message buffers are reused once sent, hence the copies). When a send or a
receive fails while the conversation is in pre-copy (TRANSFER: the guest still runs on
the source), ResumableLink reconnects (bounded retries, backoff), says RESUME {job} on
the new connection, hears RESUMED {received} and resends every message from there; then
the job goes on as if nothing happened. The destination waits for that connection for its
`resume_window_s` before it rolls back (DestinationJob).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.errors import FerryError, PeerError, ProtocolError
from agent.migration.conversation import CheckedLink, Conversation, State
from agent.migration.link import Link, parse_message, remote_failure, send_control
from agent.migration.protocol import Kind, Op

log = logging.getLogger(__name__)

RECONNECT_ATTEMPTS = 5
RECONNECT_FIRST_S = 0.25
RECONNECT_MAX_S = 4.0
ACK_EVERY_BYTES = 4 << 20
"""The destination acknowledges after this much more received: what the source keeps of
unacknowledged messages stays near this size plus what is in flight (its page-batch
buffers stay out of reuse until then: the pool holds enough of them)."""


@dataclass
class ResumeCounters:
    reconnects: int = 0
    resent_bytes: int = 0       # sent again after a reconnect
    saved_bytes: int = 0        # the destination held them: not sent again


@dataclass
class ResumableLink:
    """The source's link to the destination, reconnecting in pre-copy (a Link)."""

    link: CheckedLink
    conversation: Conversation
    job_id: str
    connect: Callable[[], Awaitable[Link]]
    attempts: int = RECONNECT_ATTEMPTS
    counters: ResumeCounters = field(default_factory=ResumeCounters)
    label: str = ""                                    # the job's, for the log
    _next: int = 0                                     # number of the next message
    _kept: collections.deque[tuple[int, int, bytes | memoryview]] = field(
        default_factory=collections.deque)             # (number, kind, copy) not acked
    _sent_bytes: int = 0
    _resuming: asyncio.Future[None] | None = None

    def resumable(self) -> bool:
        return self.conversation.state is State.TRANSFER

    def _keepable(self, kind: int, payload: bytes | memoryview) -> bytes | memoryview:
        """What to keep of a message until it is acknowledged. A page batch's buffer is
        the source's pool's, which reuses no buffer anything still views: keeping the view
        is enough. QEMU's stream chunks view the parser's buffer, reused at the next read:
        those are copied (they are the small part)."""
        if self.conversation.state is not State.TRANSFER:
            return payload
        if kind == Kind.RAM_BATCH:
            return memoryview(payload)   # a view: the pool's buffer stays out of reuse
        return bytes(payload)

    async def send(self, kind: int, payload: bytes | memoryview) -> None:
        if self._resuming is not None:
            await asyncio.shield(self._resuming)   # not before the resent ones
        data = self._keepable(kind, payload)
        number = self._next
        self._next += 1
        if self.conversation.state is State.TRANSFER:
            self._kept.append((number, kind, data))
        self._sent_bytes += len(data)
        link = self.link
        try:
            await link.send(kind, data)
        except PeerError as exc:
            if not self.resumable():
                raise
            await self._recover(link, exc)   # resends this one too, if it did not arrive

    async def receive(self) -> tuple[int, bytes | memoryview]:
        while True:
            link = self.link
            try:
                kind, payload = await link.receive()
            except PeerError as exc:
                if not self.resumable():
                    raise
                await self._recover(link, exc)
                continue
            if kind == Kind.CONTROL:
                msg = parse_message(kind, payload)
                if msg is not None and msg.op is Op.ACK:
                    self._acknowledged(msg.int_field("received", strict=False))
                    continue
            return kind, payload

    async def close(self) -> None:
        await self.link.close()

    def _acknowledged(self, received: int) -> None:
        while self._kept and self._kept[0][0] < received:
            self._kept.popleft()

    async def _recover(self, failed: CheckedLink, exc: PeerError) -> None:
        """Reconnect once for everyone who saw this link fail; raise if it cannot be."""
        if self.link is not failed:
            return                              # someone else already did
        if self._resuming is None:
            self._resuming = asyncio.get_running_loop().create_future()
            try:
                await self._reconnect(exc)
                self._resuming.set_result(None)
            except BaseException as failure:
                self._resuming.set_exception(failure)
                self._resuming.exception()      # retrieved: others re-raise it below
                raise
            finally:
                self._resuming = None
            return
        await asyncio.shield(self._resuming)

    async def _reconnect(self, lost: PeerError) -> None:
        delay = RECONNECT_FIRST_S
        last: FerryError = lost
        with contextlib.suppress(FerryError, OSError):
            await self.link.close()
        for attempt in range(1, self.attempts + 1):
            log.warning("%s: link lost in pre-copy (%s); reconnecting (%d/%d)",
                        self.label or f"migration {self.job_id}", last, attempt, self.attempts)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
            try:
                raw = await self.connect()
            except (FerryError, OSError) as exc:   # not reachable (yet): try again
                last = exc if isinstance(exc, FerryError) else PeerError(str(exc))
                continue
            try:
                link = CheckedLink(raw, self.conversation)
                await send_control(link, Op.RESUME, job=self.job_id)
                kind, payload = await link.receive()
                reply = parse_message(kind, payload)
                assert reply is not None     # the table lets only RESUMED or ERROR through
                if reply.op is Op.ERROR:
                    raise remote_failure(reply)
                received = reply.int_field("received")
                await self._resend(link, received)
            except ProtocolError:
                raise
            except (FerryError, OSError) as exc:
                if self.conversation.state is not State.TRANSFER:
                    raise                     # the destination refused: it is over
                last = exc if isinstance(exc, FerryError) else PeerError(str(exc))
                continue
            self.link = link
            self.counters.reconnects += 1
            log.warning("%s: resumed on a new connection (%d messages resent)",
                        self.label or f"migration {self.job_id}", len(self._kept))
            return
        raise PeerError(f"link to the destination lost in pre-copy and not restored after "
                        f"{self.attempts} attempts: {last}")

    async def _resend(self, link: CheckedLink, received: int) -> None:
        if self._kept and received < self._kept[0][0]:
            raise ProtocolError(f"the destination says it holds {received} messages, fewer "
                                f"than it acknowledged ({self._kept[0][0]})")
        if received > self._next:
            raise ProtocolError(f"the destination says it holds {received} messages; "
                                f"{self._next} were sent")
        self._acknowledged(received)
        resent = 0
        for _, kind, data in self._kept:
            await link.send(kind, data)
            resent += len(data)
        self.counters.resent_bytes += resent
        self.counters.saved_bytes = self._sent_bytes - resent

"""The secure channel over TCP: asyncio glue around the sans-IO session in agent.wire.

    channel = await connect(host, port, identity, trusted)       # initiator
    server = await serve(host, port, identity, trusted, handler)  # responder: handler(channel)
    await channel.send(MsgType.RAM_PAGES, batch)
    msg_type, payload = await channel.receive()
    await channel.close()

Backpressure both ways: send() waits while more than WRITE_HIGH_WATER bytes are queued in the
transport, and the socket stops being read while more than READ_HIGH_WATER received bytes wait
for receive(). Connecting and the handshake have a timeout; send and receive take one each.

Speed (bench/channel.py): large frames are sealed straight into reused buffers, which go back
to the pool once the transport has handed all their bytes to the kernel; the receiver reuses
its frame buffers the same way (agent.wire.frames). Fresh 1 MiB buffers cost a page fault per
4 KiB and halved the throughput. Sealing in a worker thread was measured too (cryptography 50
releases the GIL): the hand-off cost more than the overlap gained on 2 cores, so it is inline.

A failure ends the channel: it is raised from the call that met it and from every call after.
The peer is told why (an ERROR frame) when the channel can still say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any, Self, TypeVar, cast

import uvloop

from agent.errors import (
    ChannelClosedError,
    FerryError,
    LocalError,
    PeerError,
    PeerTimeoutError,
    TrustError,
)
from agent.identity import Identity, Peer, TrustStore
from agent.wire.frames import Buffer, frame_size
from agent.wire.keys import fingerprint
from agent.wire.messages import Goodbye, Message, MsgType, Opened, encode_control
from agent.wire.session import Session, State

log = logging.getLogger("ferry.channel")

DEFAULT_TIMEOUT = 10.0
"""Seconds allowed for connecting plus the handshake, and for close()."""
WRITE_HIGH_WATER = 2 << 20
"""send() waits while more bytes than this sit in the transport's write buffer. Small: a
live migration's last section waits behind whatever is queued here (8 MiB was 64 ms at
1 Gbit/s added to the downtime), and the sender should feel the link at once."""
WRITE_LOW_WATER = 512 << 10
READ_HIGH_WATER = 2 << 20
"""The socket is not read while more received bytes than this wait for receive(): what
waits here at a migration's switchover is applied inside its downtime."""
READ_LOW_WATER = 512 << 10
POOLED_FRAME_MIN = 64 << 10
"""Payloads from this size up are sealed into reused buffers."""
SEND_POOL_BYTES = 16 << 20
"""Most bytes of idle send buffers a channel keeps for reuse."""
BUFFER_GRAIN = 256 << 10

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on a uvloop event loop, as the agent does."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


class _SendBuffers:
    """Reusable buffers for large outgoing frames. The transport may hold on to a buffer
    until its bytes reach the kernel, so one is reused only once every byte written up to
    its end has left the transport's write buffer."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._busy: deque[tuple[int, bytearray]] = deque()  # (end offset, buffer)
        self._written = 0

    def take(self, size: int, outstanding: int) -> bytearray:
        """A buffer of at least `size` bytes; `outstanding` is the transport's backlog."""
        flushed = self._written - outstanding
        while self._busy and self._busy[0][0] <= flushed:
            _, buffer = self._busy.popleft()
            if sum(map(len, self._free)) + len(buffer) <= SEND_POOL_BYTES:
                self._free.append(buffer)
        free = self._free
        for i in range(len(free) - 1, -1, -1):  # most recently used first: still in cache
            if len(free[i]) >= size:
                return free.pop(i)
        return bytearray(-(-size // BUFFER_GRAIN) * BUFFER_GRAIN)

    def wrote(self, nbytes: int, buffer: bytearray | None = None) -> None:
        """`nbytes` went to the transport, ending with the frame in `buffer` if given."""
        self._written += nbytes
        if buffer is not None:
            self._busy.append((self._written, buffer))


class _Link(asyncio.BufferedProtocol):
    """Moves bytes between a transport and a session; wakes whoever waits for them."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False
        self.on_connect: Callable[[_Link], None] | None = None

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if self.on_connect is not None:
            self.on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.session.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.session.buffer_updated(nbytes)
        if self.session.buffered > READ_HIGH_WATER and not self._reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        self.session.receive_eof()
        self._wake_reader()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed")
        if exc is not None:
            self.session.receive_eof()
        self._wake_reader()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- used by Channel --

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    async def wait_readable(self) -> None:
        """Until new bytes, EOF or loss. The caller needs more bytes to make progress, so
        reading resumes whatever is buffered (a partial frame can exceed the low mark)."""
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        if self.lost is not None:
            return
        if self._readable is None or self._readable.done():
            self._readable = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._readable)  # shared by every waiter; one's timeout spares it

    def maybe_resume_reading(self) -> None:
        if self._reading_paused and self.session.buffered <= READ_LOW_WATER:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    async def drain(self) -> None:
        """Until the transport's write buffer is below the low-water mark again."""
        if self._writable is not None and not self._writable.done():
            await asyncio.shield(self._writable)  # a cancelled waiter must not resolve it


class Channel:
    """An open, mutually trusted channel to one peer agent."""

    def __init__(self, link: _Link, peer: Peer | None, label: str) -> None:
        self._link = link
        self._session = link.session
        self._send_lock = asyncio.Lock()
        self._buffers = _SendBuffers()
        self._error: FerryError | None = None
        self._closed = False
        self.peer = peer
        """The trusted peer on the other end (None only before the handshake finished)."""
        self.label = label
        """host:port of the other end, for messages."""

    # ---- properties ----

    @property
    def peer_key(self) -> bytes:
        assert self._session.peer_key is not None
        return self._session.peer_key

    @property
    def peer_name(self) -> str:
        return self.peer.name if self.peer is not None else fingerprint(self.peer_key)

    @property
    def is_open(self) -> bool:
        return self._error is None and not self._closed and self._session.is_open

    @property
    def handshake_hash(self) -> bytes:
        return self._session.handshake_hash

    def __repr__(self) -> str:
        return f"<Channel {self.peer_name} at {self.label} {self._session.state.name}>"

    # ---- sending ----

    async def send(self, msg_type: MsgType, payload: Buffer, *,
                   timeout: float | None = None) -> None:
        """Send one message. Returns once it is queued in the transport (the payload may be
        reused at once) and the queue is below the high-water mark."""
        if timeout is None:
            await self._send(msg_type, payload)
            return
        try:
            async with asyncio.timeout(timeout):
                await self._send(msg_type, payload)
        except TimeoutError:
            raise PeerTimeoutError(f"{self.label}: peer did not take data for {timeout}s") \
                from None

    async def send_control(self, msg_type: MsgType, body: Mapping[str, Any], *,
                           timeout: float | None = None) -> None:
        """Send a control message whose payload is the JSON of `body`."""
        if not msg_type.is_control:
            raise LocalError(f"{msg_type.name} is a data message")
        await self.send(msg_type, encode_control(body), timeout=timeout)

    async def _send(self, msg_type: MsgType, payload: Buffer) -> None:
        async with self._send_lock:
            self._check_usable()
            transport = self._link.transport
            assert transport is not None
            if transport.is_closing():
                raise self._connection_lost()
            session = self._session
            pending: list[Buffer] = list(session.data_to_send())
            size = memoryview(payload).nbytes
            buffer = None
            if size >= POOLED_FRAME_MIN:
                buffer = self._buffers.take(frame_size(size), transport.get_write_buffer_size())
                pending.append(session.seal_into(msg_type, payload, buffer))
            else:
                pending.append(b"".join(session.seal(msg_type, payload)))
            # Nothing awaited between sealing and writing: frames leave in sequence order.
            transport.writelines(pending)
            self._buffers.wrote(sum(memoryview(p).nbytes for p in pending), buffer)
            await self._link.drain()
            if self._link.lost is not None and self._error is None:
                raise self._connection_lost()

    # ---- receiving ----

    async def receive(self, *, timeout: float | None = None) -> Message:
        """The next message. Raises ChannelClosedError once the peer said GOODBYE,
        PeerTimeoutError after `timeout` seconds without one (the channel stays usable)."""
        if timeout is None:
            return await self._receive()
        try:
            async with asyncio.timeout(timeout):
                return await self._receive()
        except TimeoutError:
            raise PeerTimeoutError(f"{self.label}: no message within {timeout}s") from None

    async def _receive(self) -> Message:
        while True:
            event = self._next_event()
            if isinstance(event, Message):
                self._link.maybe_resume_reading()
                return event
            if isinstance(event, Goodbye):
                self._closed = True
                assert self._link.transport is not None
                self._link.transport.close()
                raise ChannelClosedError(f"{self.peer_name} closed the channel")
            if event is not None:
                raise LocalError(f"unexpected event {event!r} on an open channel")
            await self._wait_readable()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        """Messages until the peer says GOODBYE."""
        while True:
            try:
                yield await self.receive()
            except ChannelClosedError:
                if self._error is None:
                    return
                raise

    def _next_event(self) -> Opened | Message | Goodbye | None:
        if self._error is not None:
            raise self._error
        if self._closed and self._session.state is not State.OPEN:
            raise ChannelClosedError(f"channel to {self.peer_name} is closed")
        try:
            return self._session.next_event()
        except FerryError as exc:
            self._abort(exc)
            raise

    async def _wait_readable(self) -> None:
        if self._link.lost is not None:
            # Nothing more will come: let the session say what that means (truncated
            # frame, no GOODBYE), or report the loss.
            self._session.receive_eof()
            self._next_event()
            raise self._connection_lost()
        await self._link.wait_readable()

    # ---- closing ----

    async def close(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Say GOODBYE, flush, and close the connection. Safe to call more than once."""
        transport = self._link.transport
        assert transport is not None
        if not self._closed and self._error is None:
            self._closed = True
            try:
                async with asyncio.timeout(timeout):
                    async with self._send_lock:
                        self._session.close()
                        if not transport.is_closing():
                            transport.writelines(self._session.data_to_send())
            except TimeoutError:
                transport.abort()
        self._closed = True
        transport.close()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._link.closed)
        except TimeoutError:
            transport.abort()

    def abort(self) -> None:
        """Drop the connection at once, without GOODBYE."""
        self._abort(ChannelClosedError("channel aborted"))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- failure ----

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed or self._session.state is State.CLOSED:
            raise ChannelClosedError(f"channel to {self.peer_name} is closed")
        if self._link.lost is not None:
            raise self._connection_lost()

    def _connection_lost(self) -> PeerError:
        error = PeerError(f"connection to {self.label} lost: {self._link.lost}")
        self._abort(error)
        return error

    def _abort(self, error: FerryError) -> None:
        """End the channel because of `error`: last word to the peer if possible, then close."""
        if self._error is None:
            self._error = error
        transport = self._link.transport
        if transport is None or transport.is_closing():
            return
        self._session.abort(error)
        # The last word (ERROR, REFUSE, verdict) is sealed only if no send is using the
        # sealer right now; otherwise it could overtake a frame and the peer would see
        # a sequence error instead of our reason.
        if not self._send_lock.locked():
            with contextlib.suppress(FerryError):
                transport.writelines(self._session.data_to_send())
        transport.close()

    # ---- handshake ----

    async def _handshake(self) -> None:
        transport = self._link.transport
        assert transport is not None
        while True:
            event = self._next_event()
            out = self._session.data_to_send()  # our next handshake message, ACCEPT
            if out:
                transport.writelines(out)
            if isinstance(event, Opened):
                return
            if event is not None:
                raise LocalError(f"unexpected event {event!r} during the handshake")
            await self._wait_readable()


def _is_trusted(trusted: TrustStore) -> Callable[[bytes], bool]:
    return lambda key: trusted.by_key(key) is not None


async def connect(host: str, port: int, identity: Identity, trusted: TrustStore, *,
                  timeout: float = DEFAULT_TIMEOUT,
                  expected_key: bytes | None = None) -> Channel:
    """Open a channel to the agent at host:port; it must be a trusted peer (and, if
    `expected_key` is given, that one). Raises PeerError subclasses, TrustError included."""
    label = f"{host}:{port}"
    session = Session(initiator=True, static_key=identity.private_key,
                      is_trusted=_is_trusted(trusted), expected_key=expected_key)
    loop = asyncio.get_running_loop()
    link: _Link | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                _, link = await loop.create_connection(lambda: _Link(session), host, port)
            except OSError as exc:
                raise PeerError(f"cannot connect to {label}: {exc.strerror or exc}") from exc
            channel = Channel(link, None, label)
            await channel._handshake()
    except TimeoutError:
        if link is not None and link.transport is not None:
            link.transport.abort()
        raise PeerTimeoutError(f"{label}: no handshake within {timeout}s") from None
    except BaseException:
        if link is not None and link.transport is not None:
            link.transport.close()
        raise
    channel.peer = trusted.by_key(channel.peer_key)
    return channel


Handler = Callable[[Channel], Awaitable[None]]


class ChannelServer:
    """Accepts connections, runs the handshake, and hands each open channel to a handler."""

    def __init__(self, identity: Identity, trusted: TrustStore, handler: Handler,
                 timeout: float, on_error: Callable[[str, FerryError], None] | None) -> None:
        self._identity = identity
        self._trusted = trusted
        self._handler = handler
        self._timeout = timeout
        self._on_error = on_error or _log_refusal
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The TCP port listened on (useful with port 0)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        assert self._server is not None
        return tuple(self._server.sockets)

    def _new_link(self) -> _Link:
        session = Session(initiator=False, static_key=self._identity.private_key,
                          is_trusted=_is_trusted(self._trusted))
        link = _Link(session)
        link.on_connect = self._start
        return link

    def _start(self, link: _Link) -> None:
        task = asyncio.get_running_loop().create_task(self._run(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, link: _Link) -> None:
        assert link.transport is not None
        peername = link.transport.get_extra_info("peername")
        label = f"{peername[0]}:{peername[1]}" if peername else "unknown peer"
        channel = Channel(link, None, label)
        try:
            async with asyncio.timeout(self._timeout):
                await channel._handshake()
        except TimeoutError:
            link.transport.abort()
            self._on_error(label, PeerTimeoutError(f"no handshake within {self._timeout}s"))
            return
        except FerryError as exc:
            link.transport.close()
            self._on_error(label, exc)
            return
        except Exception:
            link.transport.abort()
            log.exception("handshake with %s failed", label)
            return
        channel.peer = self._trusted.by_key(channel.peer_key)
        try:
            await self._handler(channel)
        except FerryError as exc:
            log.error("channel with %s ended: %s", channel.peer_name, exc)
            log.debug("channel failure", exc_info=exc)
        except Exception:
            log.exception("handler for %s failed", channel.peer_name)
        finally:
            await channel.close()

    def stop_listening(self) -> None:
        """Take no new connections; the running handlers go on."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop listening, cancel running handlers and wait for them."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _log_refusal(label: str, error: FerryError) -> None:
    level = logging.ERROR if isinstance(error, TrustError) else logging.WARNING
    log.log(level, "connection from %s ended in the handshake: %s", label, error)
    log.debug("handshake failure", exc_info=error)


async def serve(host: str, port: int, identity: Identity, trusted: TrustStore,
                handler: Handler, *, timeout: float = DEFAULT_TIMEOUT,
                on_error: Callable[[str, FerryError], None] | None = None) -> ChannelServer:
    """Listen on host:port; each connection whose handshake succeeds runs `handler(channel)`,
    and the channel is closed when the handler returns. A failed handshake goes to
    `on_error(peer address, error)` (by default: logged once)."""
    server = ChannelServer(identity, trusted, handler, timeout, on_error)
    loop = asyncio.get_running_loop()
    try:
        server._server = await loop.create_server(server._new_link, host, port,
                                                  reuse_address=True)
    except OSError as exc:
        raise LocalError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return server

"""The asyncio NBD client: the sans-IO protocol of agent.storage.nbd_proto glued to a socket.

Usage::

    async with NbdClient.connect("/run/ferry/vm0.nbd", "vd0",
                                 meta_contexts=["qemu:dirty-bitmap:round3"]) as nbd:
        for extent in await nbd.block_status(0, nbd.size, "qemu:dirty-bitmap:round3"):
            if extent.flags & DIRTY:
                data = await nbd.read(extent.offset, extent.length)

Requests are pipelined: any number of tasks may call read/write/... at once (e.g. under
`asyncio.gather`); each request gets a cookie, the replies are dispatched by cookie as the
protocol callbacks decode them (no reader task: asyncio.BufferedProtocol hands the socket's
bytes to the decoder, and READ data goes straight into the caller's buffer). At most
`max_in_flight` requests and `max_in_flight_bytes` of READ/WRITE payload are outstanding; the
others wait their turn in order. Reads and writes larger than the server's maximum payload
are split and their pieces sent together.

Failures: a request the export cannot take is refused before it is sent (NbdRequestError);
an error reply fails that request only (NbdCommandError). Anything that ends the connection
(the server dies or closes, a protocol violation, a request unanswered for `request_timeout`)
fails every pending request with that error at once, and every later call with
NbdDisconnectedError; disconnect() raises it again so it is not lost. A request timeout ends
the connection on purpose: a late reply could not be told apart from a hostile one.
Cancelling a request keeps the connection: its reply is still read, and dropped.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from enum import Enum
from types import TracebackType
from typing import Any, Self, cast

from agent.errors import (
    NbdCommandError,
    NbdConnectError,
    NbdDisconnectedError,
    NbdError,
    NbdOptionError,
    NbdProtocolError,
    NbdRequestError,
    NbdTimeoutError,
)
from agent.storage.nbd_proto import (
    MAX_LENGTH,
    BlockSizes,
    ClientProtocol,
    Command,
    ExportInfo,
    Extent,
    HandshakeDone,
    NbdErrno,
    ReplyDone,
    TransmissionFlag,
    context_ids,
    errno_name,
)

log = logging.getLogger(__name__)

Address = str | os.PathLike[str] | tuple[str, int]
"""A unix socket path, or (host, port) for TCP."""
Buffer = bytes | bytearray | memoryview

DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds allowed for connecting plus the whole handshake."""
DEFAULT_REQUEST_TIMEOUT = 60.0
"""Seconds a request may wait for its reply before the connection is given up."""
DEFAULT_DISCONNECT_TIMEOUT = 10.0
"""Seconds disconnect() waits for pending replies and for the server to close."""
MAX_IN_FLIGHT = 64
"""Requests outstanding at once, by default."""
MAX_IN_FLIGHT_BYTES = 64 << 20
"""READ/WRITE payload bytes outstanding at once, by default."""
MAX_IO_SIZE = 32 << 20
"""Largest READ/WRITE sent as one request (less if the server's maximum payload is lower)."""
MAX_EFFECT_LENGTH = 1 << 30
"""Largest WRITE_ZEROES/TRIM/BLOCK_STATUS length sent as one request (1 GiB; the field allows
4 GiB - 1, but servers may refuse lengths far above their maximum payload)."""


class Runstate(Enum):
    """Where the client is. The allowed moves are TRANSITIONS."""

    IDLE = "idle"
    """Not connected yet."""
    CONNECTING = "connecting"
    """Connecting and negotiating."""
    RUNNING = "running"
    """Requests may be made."""
    DISCONNECTING = "disconnecting"
    """disconnect() is waiting for pending replies and the server's close."""
    CLOSED = "closed"
    """Disconnected, refused, or failed (see `failure`); a client is not reused."""


TRANSITIONS: Mapping[Runstate, frozenset[Runstate]] = {
    Runstate.IDLE: frozenset({Runstate.CONNECTING, Runstate.CLOSED}),
    Runstate.CONNECTING: frozenset({Runstate.RUNNING, Runstate.CLOSED}),
    Runstate.RUNNING: frozenset({Runstate.DISCONNECTING, Runstate.CLOSED}),
    Runstate.DISCONNECTING: frozenset({Runstate.CLOSED}),
    Runstate.CLOSED: frozenset(),
}
"""Every allowed move between runstates."""


class _Budget:
    """Bounds requests and payload bytes in flight; waiters are served strictly in order."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError("in-flight limits must be positive")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.count = 0
        self.bytes = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, cost: int) -> bool:
        # A request larger than the whole byte budget still goes, alone.
        return self.count < self.max_count and (self.bytes + cost <= self.max_bytes
                                                or self.bytes == 0)

    async def acquire(self, cost: int) -> None:
        if not self._waiters and self._fits(cost):
            self.count += 1
            self.bytes += cost
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((cost, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(cost)   # granted, but our caller is gone: hand it on
            else:
                self._forget(waiter)
            raise

    def release(self, cost: int) -> None:
        self.count -= 1
        self.bytes -= cost
        self._wake()

    def fail(self, error: BaseException) -> None:
        """Every waiter raises `error` (the connection is gone)."""
        waiters, self._waiters = self._waiters, collections.deque()
        for _, waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        self._waiters = collections.deque(w for w in self._waiters if w[1] is not waiter)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            cost, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if not self._fits(cost):
                return
            self._waiters.popleft()
            self.count += 1
            self.bytes += cost
            waiter.set_result(None)


class _Link(asyncio.BufferedProtocol):
    """The socket's protocol callbacks: bytes into the decoder, events out to the client."""

    def __init__(self, client: NbdClient) -> None:
        self._client = client
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self._write_resumed: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._client._proto.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._client._received(nbytes)

    def eof_received(self) -> bool:
        self._client._eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)
        self._resume()

    def pause_writing(self) -> None:
        if self._write_resumed is None:
            self._write_resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._resume()

    def _resume(self) -> None:
        waiter, self._write_resumed = self._write_resumed, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if self._write_resumed is not None:
            await asyncio.shield(self._write_resumed)


class NbdClient:
    """One connection to one NBD export; every failure is an NbdError (or NbdRequestError)."""

    def __init__(self, address: Address, export_name: str = "", *,
                 meta_contexts: Iterable[str] = (),
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 max_in_flight: int = MAX_IN_FLIGHT,
                 max_in_flight_bytes: int = MAX_IN_FLIGHT_BYTES) -> None:
        self.address = address if isinstance(address, tuple) else os.fspath(address)
        self.export_name = export_name
        self.label = (f"nbd://{address[0]}:{address[1]}/{export_name}"
                      if isinstance(address, tuple)
                      else f"nbd+unix:///{export_name}?socket={self.address}")
        self.request_timeout = request_timeout
        self._proto = ClientProtocol(export_name, meta_contexts)
        self._budget = _Budget(max_in_flight, max_in_flight_bytes)
        self._runstate = Runstate.IDLE
        self._link: _Link | None = None
        self._export: ExportInfo | None = None
        self._handshake: asyncio.Future[ExportInfo] | None = None
        self._waiters: dict[int, asyncio.Future[ReplyDone]] = {}
        self._idle: asyncio.Event | None = None
        self._failure: NbdError | None = None
        self._failure_reported = False
        self._shutdown_requested = False

    # ------------------------------------------------------------------ connecting

    @classmethod
    def connect(cls, address: Address, export_name: str = "", *,
                meta_contexts: Iterable[str] = (),
                timeout: float = DEFAULT_CONNECT_TIMEOUT,
                request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                max_in_flight: int = MAX_IN_FLIGHT,
                max_in_flight_bytes: int = MAX_IN_FLIGHT_BYTES) -> _Connecting:
        """Connect and negotiate (await it for a client, or use it as `async with`)."""
        client = cls(address, export_name, meta_contexts=meta_contexts,
                     request_timeout=request_timeout, max_in_flight=max_in_flight,
                     max_in_flight_bytes=max_in_flight_bytes)
        return _Connecting(client, timeout)

    async def open(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        """Connect to the server and negotiate the export (fixed newstyle, OPT_GO)."""
        self._enter(Runstate.CONNECTING)
        loop = asyncio.get_running_loop()
        self._handshake = loop.create_future()
        self._idle = asyncio.Event()
        self._idle.set()
        link = self._link = _Link(self)
        try:
            async with asyncio.timeout(timeout):
                if isinstance(self.address, tuple):
                    host, port = self.address
                    await loop.create_connection(lambda: link, host, port)
                else:
                    await loop.create_unix_connection(lambda: link, self.address)
                self._export = await self._handshake
        except TimeoutError as exc:
            self._close_transport()
            self._enter(Runstate.CLOSED)
            raise NbdConnectError(f"{self.label}: no NBD handshake within {timeout:g} s "
                                  f"(the server is hung, or does not speak first)") from exc
        except OSError as exc:
            self._close_transport()
            self._enter(Runstate.CLOSED)
            raise NbdConnectError(f"{self.label}: cannot connect: {exc}") from exc
        except BaseException:
            self._close_transport()
            if self._runstate is not Runstate.CLOSED:
                self._enter(Runstate.CLOSED)
            raise
        self._enter(Runstate.RUNNING)
        log.debug("%s: connected, %d bytes, flags %s, block sizes %s, contexts %s", self.label,
                  self._export.size, self._export.flags, self._export.block_sizes,
                  dict(self._export.contexts))

    async def disconnect(self, timeout: float = DEFAULT_DISCONNECT_TIMEOUT) -> None:
        """Wait for pending replies, send NBD_CMD_DISC and close.

        Raises the error that had ended the connection, if one did, so it is not lost (once:
        a second disconnect() is quiet).
        """
        if self._runstate in (Runstate.RUNNING, Runstate.DISCONNECTING):
            link = self._link
            assert link is not None and link.transport is not None and self._idle is not None
            try:
                async with asyncio.timeout(timeout):
                    if self._runstate is Runstate.RUNNING:
                        self._enter(Runstate.DISCONNECTING)
                        await self._idle.wait()
                        if self._runstate is Runstate.DISCONNECTING:
                            link.transport.write(self._proto.disconnect())
                    # else: ESHUTDOWN already had NBD_CMD_DISC sent.
                    if self._runstate is Runstate.DISCONNECTING:
                        if link.transport.can_write_eof():
                            link.transport.write_eof()
                        await asyncio.shield(link.lost)
            except TimeoutError:
                log.debug("%s: the server did not close after NBD_CMD_DISC within %g s",
                          self.label, timeout)
            finally:
                self._close_transport()
                if self._runstate is not Runstate.CLOSED:
                    self._enter(Runstate.CLOSED)
        elif self._runstate is Runstate.IDLE:
            self._enter(Runstate.CLOSED)
        else:
            self._close_transport()
        if self._failure is not None and not self._failure_reported:
            self._failure_reported = True
            raise self._failure

    def abort(self) -> None:
        """Close the socket at once (no NBD_CMD_DISC); pending requests fail with
        NbdDisconnectedError (disconnect() afterwards does not raise it again)."""
        if self._runstate in (Runstate.RUNNING, Runstate.DISCONNECTING, Runstate.CONNECTING):
            self._failure_reported = self._failure is None
            self._fail(NbdDisconnectedError(f"{self.label}: connection aborted by this side"))

    async def __aenter__(self) -> Self:
        if self._runstate is Runstate.IDLE:
            await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            await self.disconnect()
        except NbdError:
            if exc is None:
                raise
            # The body's own error is the one that matters; the same failure usually caused both.
            log.debug("%s: disconnect after an error also failed", self.label, exc_info=True)

    # ------------------------------------------------------------------ the export

    @property
    def runstate(self) -> Runstate:
        """Where the client is (see Runstate)."""
        return self._runstate

    @property
    def failure(self) -> NbdError | None:
        """The error that ended the connection, if one did."""
        return self._failure

    @property
    def export(self) -> ExportInfo:
        """Everything OPT_GO said about the export."""
        if self._export is None:
            raise NbdDisconnectedError(f"{self.label}: not connected")
        return self._export

    @property
    def size(self) -> int:
        """The export's size in bytes."""
        return self.export.size

    @property
    def flags(self) -> TransmissionFlag:
        """The export's transmission flags (read-only, flush, FUA, trim, write-zeroes, ...)."""
        return self.export.flags

    @property
    def read_only(self) -> bool:
        """Writes are refused."""
        return self.export.read_only

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_TRIM)

    @property
    def can_write_zeroes(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_FAST_ZERO)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & TransmissionFlag.CAN_MULTI_CONN)

    @property
    def block_sizes(self) -> BlockSizes:
        """The export's minimum, preferred and maximum block sizes."""
        return self.export.block_sizes

    @property
    def contexts(self) -> Mapping[str, int]:
        """The selected metadata contexts: name -> id on this connection."""
        return self.export.contexts

    @property
    def max_io_size(self) -> int:
        """Largest READ/WRITE sent as one request; larger ones are split at this size."""
        sizes = self.block_sizes
        return max(sizes.minimum, min(sizes.maximum, MAX_IO_SIZE) // sizes.minimum
                   * sizes.minimum)

    # ------------------------------------------------------------------ requests

    async def read(self, offset: int, length: int) -> bytearray:
        """`length` bytes at `offset` (holes read as zeroes), in a new buffer."""
        self._check_range(Command.READ, offset, length)
        buffer = bytearray(length)
        await self.readinto(offset, buffer)
        return buffer

    async def readinto(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Fill `buffer` with the export's bytes at `offset` (holes as zeroes).

        If this raises, or is cancelled, part of the buffer may have been written; nothing
        is written into it after it returns.
        """
        view = memoryview(buffer)
        if view.readonly or not view.c_contiguous:
            raise NbdRequestError("readinto needs a writable contiguous buffer")
        view = view.cast("B")
        self._check_range(Command.READ, offset, len(view))
        step = self.max_io_size
        pieces = [(offset + i, view[i:i + step]) for i in range(0, len(view), step)]
        await _all([self._read(at, piece) for at, piece in pieces])

    async def _read(self, offset: int, into: memoryview) -> None:
        await self._submit(Command.READ, offset, len(into), len(into),
                           lambda: self._proto.read(offset, into))

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Write `data` at `offset`; with `fua`, it is on stable storage when this returns.

        `data` must not change until this returns (the socket may still be sending it).
        """
        view = memoryview(data)
        if not view.c_contiguous:
            raise NbdRequestError("write needs a contiguous buffer")
        view = view.cast("B")
        self._check_range(Command.WRITE, offset, len(view))
        step = self.max_io_size
        await _all([self._write(offset + i, view[i:i + step], fua)
                    for i in range(0, len(view), step)])

    async def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._submit(Command.WRITE, offset, len(data), len(data),
                           lambda: self._proto.write(offset, len(data), fua=fua), data)

    async def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        """Make the range read as zeroes. `no_hole`: keep it allocated; `fast`: fail with
        NbdCommandError ENOTSUP unless the server can zero faster than it writes."""
        self._check_range(Command.WRITE_ZEROES, offset, length)
        await _all([self._submit(Command.WRITE_ZEROES, at, n, 0,
                                 functools.partial(self._proto.write_zeroes, at, n,
                                                   no_hole=no_hole, fast=fast, fua=fua))
                    for at, n in self._effect_pieces(offset, length)])

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Tell the server the range is no longer needed (it may punch a hole)."""
        self._check_range(Command.TRIM, offset, length)
        await _all([self._submit(Command.TRIM, at, n, 0,
                                 functools.partial(self._proto.trim, at, n, fua=fua))
                    for at, n in self._effect_pieces(offset, length)])

    async def flush(self) -> None:
        """Every write answered so far is on stable storage when this returns."""
        await self._submit(Command.FLUSH, 0, 0, 0, self._proto.flush)

    async def block_status(self, offset: int, length: int, context: str) -> list[Extent]:
        """Extents covering exactly [offset, offset + length) in one metadata context.

        Asks again from where each reply stopped until the range is covered (servers may
        answer for less than asked), and merges neighbours with the same flags.
        """
        (context_id,) = context_ids(self.export, [context])
        self._check_range(Command.BLOCK_STATUS, offset, length)
        extents: list[Extent] = []
        position, end = offset, offset + length
        while position < end:
            n = min(end - position, self._effect_limit())
            reply = await self._block_status(position, n)
            for extent in reply[context_id]:
                if extents and extents[-1].end == extent.offset \
                        and extents[-1].flags == extent.flags:
                    extents[-1] = Extent(extents[-1].offset,
                                         extents[-1].length + extent.length, extent.flags)
                else:
                    extents.append(extent)
            position = extents[-1].end
        return extents

    async def block_status_once(self, offset: int, length: int, *,
                                req_one: bool = False) -> dict[str, tuple[Extent, ...]]:
        """One BLOCK_STATUS request: per selected context, extents from `offset` on, clipped
        to the range; they may cover less than `length` (at least one byte each)."""
        names = {context_id: name for name, context_id in self.contexts.items()}
        reply = await self._block_status(offset, length, req_one=req_one)
        return {names[context_id]: extents for context_id, extents in reply.items()}

    async def _block_status(self, offset: int, length: int, *,
                            req_one: bool = False) -> Mapping[int, tuple[Extent, ...]]:
        reply = await self._submit(
            Command.BLOCK_STATUS, offset, length, 0,
            lambda: self._proto.block_status(offset, length, req_one=req_one))
        return reply.status

    def _check_range(self, command: Command, offset: int, length: int) -> None:
        """Refuse a whole call up front rather than after some of its pieces were sent."""
        export = self.export
        minimum = export.block_sizes.minimum
        end = offset + length
        if offset < 0 or length < 0 or end > export.size:
            raise NbdRequestError(f"{command.name} of {length} bytes at {offset} is outside "
                                  f"the export ({export.size} bytes)")
        if offset % minimum or (end % minimum and end != export.size):
            raise NbdRequestError(f"{command.name} of {length} bytes at {offset} is not aligned "
                                  f"to the export's minimum block size {minimum}")

    def _effect_limit(self) -> int:
        minimum = self.block_sizes.minimum
        return min(MAX_EFFECT_LENGTH, MAX_LENGTH) // minimum * minimum

    def _effect_pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self._effect_limit()
        return [(offset + i, min(step, length - i)) for i in range(0, length, step)]

    # ------------------------------------------------------------------ the request cycle

    def _usable(self) -> None:
        if self._runstate is Runstate.RUNNING and not self._shutdown_requested:
            return
        if self._failure is not None:
            raise NbdDisconnectedError(f"{self.label}: the connection has failed: "
                                       f"{self._failure}") from self._failure
        if self._shutdown_requested:
            raise NbdDisconnectedError(f"{self.label}: the server is shutting down")
        raise NbdDisconnectedError(f"{self.label}: not connected ({self._runstate.value})")

    async def _submit(self, command: Command, offset: int, length: int, cost: int,
                      build: Callable[[], tuple[int, bytes]],
                      payload: memoryview | None = None) -> ReplyDone:
        """Send one request (built by `build()` on the protocol) and await its reply."""
        if command is not Command.FLUSH and length == 0:
            return ReplyDone(0, command, offset, 0)
        self._usable()
        await self._budget.acquire(cost)
        try:
            self._usable()
            cookie, header = build()
            link = self._link
            assert link is not None and link.transport is not None and self._idle is not None
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[ReplyDone] = loop.create_future()
            self._waiters[cookie] = waiter
            self._idle.clear()
            if payload is None:
                link.transport.write(header)
            else:
                link.transport.writelines((header, payload))
            try:
                async with asyncio.timeout(self.request_timeout):
                    await link.drain()
                    reply = await waiter
            except TimeoutError as exc:
                error = NbdTimeoutError(
                    f"{self.label}: no reply to {command.name} of {length} bytes at {offset} "
                    f"within {self.request_timeout:g} s; connection given up")
                self._fail(error)
                raise error from exc
            except asyncio.CancelledError:
                self._proto.abandon(cookie)
                raise
            finally:
                if self._waiters.pop(cookie, None) is not None and not self._waiters:
                    self._idle.set()
                    if self._shutdown_requested:
                        self._send_disc()
        finally:
            self._budget.release(cost)
        if reply.error:
            if reply.error == NbdErrno.ESHUTDOWN:
                self._server_shutting_down()
            raise NbdCommandError(command.name, offset, length, reply.error,
                                  errno_name(reply.error), reply.message, reply.error_offset)
        return reply

    def _server_shutting_down(self) -> None:
        """ESHUTDOWN: the protocol says the client must disconnect; refuse new requests and
        send NBD_CMD_DISC once nothing is pending."""
        self._shutdown_requested = True
        if not self._waiters:
            self._send_disc()

    def _send_disc(self) -> None:
        link = self._link
        if self._runstate is Runstate.RUNNING and link is not None and link.transport:
            self._enter(Runstate.DISCONNECTING)
            link.transport.write(self._proto.disconnect())

    # ------------------------------------------------------------------ protocol callbacks

    def _received(self, nbytes: int) -> None:
        try:
            self._dispatch(nbytes)
        except Exception as exc:   # a bug here must not leave requests waiting for a timeout
            log.debug("%s: internal error while decoding", self.label, exc_info=True)
            error = NbdDisconnectedError(f"{self.label}: connection dropped after an internal "
                                         f"error in the NBD client: {exc!r}")
            error.__cause__ = exc
            self._fail(error)

    def _dispatch(self, nbytes: int) -> None:
        proto = self._proto
        proto.buffer_updated(nbytes)
        out = proto.data_to_send()
        link = self._link
        if out and link is not None and link.transport is not None:
            link.transport.write(out)
        try:
            while (event := proto.next_event()) is not None:
                if isinstance(event, ReplyDone):
                    waiter = self._waiters.get(event.cookie)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(event)
                elif (isinstance(event, HandshakeDone) and self._handshake is not None
                      and not self._handshake.done()):
                    self._handshake.set_result(event.export)
        except NbdError as exc:
            if isinstance(exc, NbdProtocolError):
                log.debug("%s: protocol error: %s", self.label, exc)
            self._fail(exc)

    def _eof(self) -> None:
        reason = self._proto.receive_eof()
        if reason is not None:
            self._fail(self._gone(reason))

    def _lost(self, exc: Exception | None) -> None:
        if self._runstate is Runstate.CLOSED:
            return
        if self._runstate is Runstate.DISCONNECTING and not self._waiters:
            self._enter(Runstate.CLOSED)   # the server's close that NBD_CMD_DISC asked for
            return
        reason = self._proto.receive_eof() or "the connection was lost"
        error = self._gone(f"{reason}: {exc}" if exc is not None else reason)
        error.__cause__ = exc
        self._fail(error)

    def _gone(self, reason: str) -> NbdError:
        if self._runstate is Runstate.CONNECTING:
            return NbdConnectError(f"{self.label}: {reason}")
        return NbdDisconnectedError(f"{self.label}: {reason}")

    def _fail(self, error: NbdError) -> None:
        """End the connection: every pending and waiting request raises `error`."""
        if self._failure is not None:
            return
        self._failure = error
        if self._runstate is not Runstate.CLOSED:
            self._enter(Runstate.CLOSED)
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(error)
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._budget.fail(error)
        if self._idle is not None:
            self._idle.set()
        # A refused option has NBD_OPT_ABORT queued: let it go out. Otherwise nothing more
        # is owed to the server, and a hung one must not keep the socket open.
        self._close_transport(abort=not isinstance(error, NbdOptionError))

    def _close_transport(self, *, abort: bool = False) -> None:
        link = self._link
        if link is None or link.transport is None or link.transport.is_closing():
            return
        if abort:
            link.transport.abort()
        else:
            link.transport.close()

    def _enter(self, runstate: Runstate) -> None:
        if runstate not in TRANSITIONS[self._runstate]:
            raise AssertionError(f"NBD client: no move from {self._runstate.value} to "
                                 f"{runstate.value}")
        self._runstate = runstate


async def _all(calls: Sequence[Awaitable[Any]]) -> None:
    """Run the calls together; on the first failure cancel the rest and raise that failure."""
    if not calls:
        return
    if len(calls) == 1:
        await calls[0]
        return
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, result in zip(tasks, results, strict=True):
        if isinstance(result, BaseException) and not task.cancelled():
            raise result


class _Connecting:
    """What NbdClient.connect() returns: await it for a client, or `async with` it."""

    def __init__(self, client: NbdClient, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    def __await__(self) -> Generator[Any, None, NbdClient]:
        return self._open().__await__()

    async def _open(self) -> NbdClient:
        await self._client.open(self._timeout)
        return self._client

    async def __aenter__(self) -> NbdClient:
        return await self._open()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._client.__aexit__(exc_type, exc, tb)


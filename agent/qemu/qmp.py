"""The only module that speaks QMP: a QEMU monitor connection whose errors are all QemuError.

It wraps `qemu.qmp.QMPClient` and translates that library's failures at this one boundary
(DESIGN §1; STYLE "one error tree"). Every event QEMU sends is recorded with QEMU's own
timestamp, because downtime is measured as QMP event time STOP (source) to RESUME
(destination), not as the time we happened to read the events.

Usage::

    async with connect("/run/vm/qmp.sock") as qmp:
        mark = qmp.event_mark()
        await qmp.execute("stop")
        stop = await qmp.wait_event("STOP", after=mark)

QEMU serves one QMP client at a time: a second client connects at socket level but gets
no greeting until the first leaves, which `connect` reports as a timeout saying so.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)

from agent.errors import (
    QemuError,
    QmpCommandError,
    QmpConnectError,
    QmpDisconnectedError,
    QmpTimeoutError,
)

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_COMMAND_TIMEOUT = 30.0
DEFAULT_EVENT_TIMEOUT = 30.0
# Events kept per connection; a waiter whose mark is older than this may miss its event.
EVENT_LOG_SIZE = 4096
MICROSECONDS = 1_000_000

# qemu.qmp logs its own failures at ERROR before raising them; we translate each failure
# into one QemuError that our caller logs once, so the library's records go to DEBUG only.
_LIB_LOG = logging.getLogger(f"{__name__}.lib")


class _DemoteToDebug(logging.Filter):
    """Passes the library's records on as DEBUG, and only when DEBUG logging is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _LIB_LOG.isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_LIB_LOG.addFilter(_DemoteToDebug())


@dataclass(frozen=True, slots=True)
class QmpEvent:
    """One QMP event as QEMU sent it, stamped with QEMU's wall clock."""

    name: str
    data: Mapping[str, Any]
    timestamp_us: int      # QEMU's g_get_real_time() when it emitted the event
    seq: int               # arrival order on this connection, from 1

    @property
    def timestamp(self) -> float:
        """QEMU's timestamp in seconds since the epoch (float; keep timestamp_us for sums)."""
        return self.timestamp_us / MICROSECONDS


def _event_from_message(msg: Message, seq: int) -> QmpEvent:
    stamp: dict[str, Any] = msg.get("timestamp") or {}  # type: ignore[assignment]
    micros = int(stamp.get("seconds", 0)) * MICROSECONDS + int(stamp.get("microseconds", 0))
    data: dict[str, Any] = dict(msg.get("data") or {})  # type: ignore[call-overload]
    return QmpEvent(name=str(msg["event"]), data=data,
                    timestamp_us=micros, seq=seq)


class _Recorder(EventListener):
    """Hands every event to its Qmp as it is dispatched; queues nothing itself."""

    def __init__(self, owner: Qmp) -> None:
        super().__init__()
        self._owner = owner

    def accept(self, event: Message) -> bool:
        self._owner._record(event)
        return False


class Qmp:
    """A QMP session with one QEMU; every failure surfaces as a QemuError subclass."""

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        self.path = os.fspath(path)
        self.name = name or os.path.basename(self.path)
        self._client: QMPClient | None = None
        self._events: collections.deque[QmpEvent] = collections.deque(maxlen=EVENT_LOG_SIZE)
        self._seq = 0
        self._arrived: asyncio.Event | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._lost = False
        self._quitting = False

    # ------------------------------------------------------------------ session

    @property
    def connected(self) -> bool:
        """True while the session is up (QEMU has not gone away, we have not disconnected)."""
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    @property
    def qemu_version(self) -> tuple[int, int, int]:
        """(major, minor, micro) from QEMU's greeting."""
        client = self._require()
        assert client.greeting is not None
        ver: Any = client.greeting.QMP.version.get("qemu", {})
        return (int(ver.get("major", 0)), int(ver.get("minor", 0)), int(ver.get("micro", 0)))

    async def connect(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        """Open the socket, take QEMU's greeting and negotiate capabilities."""
        if self._client is not None:
            raise QemuError(f"QMP {self.path}: already connected")
        client = QMPClient(self.name)
        client.logger = _LIB_LOG
        client.register_listener(_Recorder(self))
        self._arrived = asyncio.Event()
        self._lost = self._quitting = False
        try:
            async with asyncio.timeout(timeout):
                await client.connect(self.path)
        except TimeoutError as exc:
            raise QmpConnectError(
                f"no QMP greeting from {self.path} within {timeout:g} s: QEMU is hung, or "
                f"another client holds its monitor (QEMU serves one QMP client at a time)"
            ) from exc
        except ConnectError as exc:
            raise QmpConnectError(f"cannot open QMP socket {self.path}: {exc.exc}") from exc
        except QMPError as exc:
            raise QmpConnectError(f"cannot open QMP session on {self.path}: {exc}") from exc
        self._client = client
        self._watcher = asyncio.create_task(self._watch(client), name=f"qmp-watch:{self.name}")

    async def disconnect(self) -> None:
        """Close the session; raises QmpDisconnectedError if it had already failed."""
        client, self._client = self._client, None
        if client is None:
            return
        await self._stop_watcher()
        try:
            await client.disconnect()
        except EOFError as exc:
            if not self._quitting:
                raise QmpDisconnectedError(f"QEMU closed its QMP socket {self.path}") from exc
        except (OSError, QMPError) as exc:
            if not self._quitting:
                raise QmpDisconnectedError(f"QMP {self.path} failed: {exc!r}") from exc
        finally:
            self._wake()

    async def quit(self, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        """Ask QEMU to exit and close the session; QEMU hanging up is the expected answer."""
        self._quitting = True
        try:
            await self.execute("quit", timeout=timeout)
        except QmpDisconnectedError:
            pass  # QEMU may close the socket before its reply is read
        await self.disconnect()

    async def __aenter__(self) -> Qmp:
        if self._client is None:
            await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            await self.disconnect()
        except QemuError:
            if exc is None:
                raise
            # The body's own error is the one that matters; QEMU dying usually caused both.
            log.debug("QMP %s: disconnect after an error also failed", self.path, exc_info=True)

    # ------------------------------------------------------------------ commands

    async def execute(self, command: str, args: Mapping[str, object] | None = None, *,
                      timeout: float = DEFAULT_COMMAND_TIMEOUT) -> Any:
        """Run one QMP command and return its `return` value."""
        client = self._require()
        try:
            async with asyncio.timeout(timeout):
                return await client.execute(command, args)
        except ExecuteError as exc:
            raise QmpCommandError(command, exc.error_class, str(exc)) from exc
        except TimeoutError as exc:
            raise QmpTimeoutError(
                f"QEMU ({self.path}) did not answer {command} within {timeout:g} s") from exc
        except (ExecInterruptedError, StateError) as exc:
            raise QmpDisconnectedError(
                f"QMP connection to {self.path} ended during {command}") from exc
        except QMPError as exc:
            raise QemuError(f"QMP {command} on {self.path} failed: {exc}") from exc

    async def hmp(self, command_line: str, *, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> str:
        """Run a human-monitor (HMP) command line and return its text output.

        HMP reports most errors only as text in that output; callers check it.
        """
        out = await self.execute("human-monitor-command", {"command-line": command_line},
                                 timeout=timeout)
        return str(out)

    # ------------------------------------------------------------------ events

    def event_mark(self) -> int:
        """Sequence number of the latest recorded event: pass it as `after=` to wait_event."""
        return self._seq

    def events(self, name: str | None = None, *, after: int = 0) -> list[QmpEvent]:
        """Recorded events (the last EVENT_LOG_SIZE), optionally one name, newer than `after`."""
        return [ev for ev in self._events
                if ev.seq > after and (name is None or ev.name == name)]

    async def wait_event(self, name: str, *, timeout: float = DEFAULT_EVENT_TIMEOUT,
                         after: int | None = None,
                         match: Callable[[QmpEvent], bool] | None = None) -> QmpEvent:
        """The first event `name` (passing `match`) recorded after mark `after` (default: now).

        Take the mark before issuing the command that causes the event, or the event may
        arrive before this call and be missed.
        """
        self._require()
        mark = self._seq if after is None else after
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for ev in self._events:
                        if ev.seq > mark and ev.name == name and (match is None or match(ev)):
                            return ev
                    if self._lost or self._client is None:
                        raise QmpDisconnectedError(
                            f"QMP connection to {self.path} ended while waiting for {name}")
                    assert self._arrived is not None
                    await self._arrived.wait()
        except TimeoutError as exc:
            raise QmpTimeoutError(
                f"QEMU ({self.path}) sent no {name} event within {timeout:g} s") from exc

    # ------------------------------------------------------------------ internals

    def _require(self) -> QMPClient:
        if self._client is None:
            raise QmpDisconnectedError(f"QMP {self.path}: not connected")
        return self._client

    def _record(self, msg: Message) -> None:
        self._seq += 1
        self._events.append(_event_from_message(msg, self._seq))
        # The library's default listener queues every event forever; we keep our own log.
        if self._client is not None:
            self._client.events.clear()
        self._wake()

    def _wake(self) -> None:
        """Let every wait_event look at the log again (new event, or the session ended)."""
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = asyncio.Event()

    async def _watch(self, client: QMPClient) -> None:
        """Notice QEMU going away so that event waiters fail at once instead of timing out."""
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        self._lost = True
        self._wake()

    async def _stop_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is None or watcher.done():
            return
        watcher.cancel()
        try:
            await watcher
        except asyncio.CancelledError:
            # Our own cancel of the watcher; re-raise if *we* are being cancelled too.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise


class _Connecting:
    """What connect() returns: await it for a Qmp, or use it as `async with connect(...)`."""

    def __init__(self, path: str | os.PathLike[str], timeout: float, name: str | None) -> None:
        self._qmp = Qmp(path, name=name)
        self._timeout = timeout

    def __await__(self) -> Generator[Any, None, Qmp]:
        return self._open().__await__()

    async def _open(self) -> Qmp:
        await self._qmp.connect(self._timeout)
        return self._qmp

    async def __aenter__(self) -> Qmp:
        return await self._open()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._qmp.__aexit__(exc_type, exc, tb)


def connect(path: str | os.PathLike[str], timeout: float = DEFAULT_CONNECT_TIMEOUT, *,
            name: str | None = None) -> _Connecting:
    """Connect to QEMU's QMP unix socket at `path` (await it, or `async with` it)."""
    return _Connecting(path, timeout, name)

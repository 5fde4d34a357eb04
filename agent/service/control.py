"""The local control socket: JSON lines between the CLI and its agent over a unix socket.

A request is one JSON object with an "op". Simple ops get one reply line
({"ok": true, ...} or {"ok": false, "error": ...}); long ops (migrate, job with follow)
stream {"event": "progress" | "queued", ...} lines and end with {"event": "result", ...}.
While a long op runs, the client may send {"op": "cancel"} on the same connection;
closing the connection cancels it too (a migrate not detached: the job; a follow: only
the following). Each caller is checked with SO_PEERCRED against `[access]`
(agent/state/access.py): one with no role is refused before its request is read, a reader
asking for an op not read-only is refused with code "forbidden". Every op, reply and
event: docs/control-api.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from agent.errors import FerryError, LocalError, UserError
from agent.state import access as access_mod
from agent.state.access import Access, Caller, Role

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
DRAIN_TIMEOUT_S = 2.0     # a refused client's unread request, read before closing
SOCKET_MODE = 0o660
# With a control group: its members may pass through the home to the socket, not list it.
HOME_MODE_WITH_GROUP = 0o710
FORBIDDEN = "forbidden"

Reply = dict[str, Any]
# A handler gets the request and a `send` for streaming events; it returns the final reply.
Handler = Callable[[dict[str, Any], Callable[[Reply], Awaitable[None]], asyncio.Event],
                   Awaitable[Reply]]


class AgentUnreachableError(UserError):
    """No agent answers on the control socket."""


def forbidden(caller: Caller, op: str | None) -> Reply:
    """The refusal a caller gets: with no role (op None), or a reader asking for op."""
    if op is None:
        error = f"user {caller} may not use this agent ([access] in agent.toml)"
    else:
        error = (f"user {caller} may only read: {op} needs an operator ([access] in "
                 f"agent.toml)")
    return {"ok": False, "error": error, "code": FORBIDDEN}


class ControlServer:
    """Serves the control socket, dispatching each request to a handler by its op."""

    def __init__(self, path: Path, handlers: dict[str, Handler], *,
                 group: int | None = None, access: Access | None = None,
                 read_only: frozenset[str] = frozenset(),
                 directory: access_mod.Directory = access_mod.SYSTEM) -> None:
        self.path = path
        self.handlers = handlers
        self.group = group
        self.access = access or Access()
        self.read_only = read_only        # ops a reader may use; any other needs an operator
        self.directory = directory
        self._server: asyncio.AbstractServer | None = None

    def role_of(self, uid: int, gid: int) -> tuple[Caller, Role]:
        caller = access_mod.identify(uid, gid, self.directory)
        return caller, self.access.role(caller, agent_uid=os.getuid(), control_gid=self.group)

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            # A stale socket from a crashed agent: refuse only if someone still answers.
            if _socket_answers(self.path):
                raise LocalError(f"another agent already serves {self.path}")
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                       limit=MAX_LINE)
        os.chmod(self.path, SOCKET_MODE)
        if self.group is not None:
            os.chown(self.path, -1, self.group)
            # The home is 0700: the group could not reach the socket inside it.
            os.chown(self.path.parent, -1, self.group)
            os.chmod(self.path.parent, HOME_MODE_WITH_GROUP)

    def stop_listening(self) -> None:
        """Take no new requests; the ones being served go on (a migration's report)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The server's alone: the CLI imports this module for its client, without QEMU code.
        from agent.qemu.vm import peer_credentials
        try:
            sock = writer.get_extra_info("socket")
            _, uid, gid = peer_credentials(sock)
            caller, role = self.role_of(uid, gid)
            if role is Role.NONE:
                log.warning("control: refused uid %d (%s): no role in [access]", caller.uid,
                            caller.name or "no account")
                await _write(writer, forbidden(caller, None))
                await _drain_input(reader, writer)
                return
            line = await reader.readline()
            if not line:
                return
            await self._dispatch(line, reader, writer, caller, role)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, caller: Caller, role: Role) -> None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            handler = self.handlers.get(str(request.get("op")))
            if handler is None:
                raise ValueError(f"unknown op {request.get('op')!r}")
        except ValueError as exc:
            await _write(writer, {"ok": False, "error": f"bad request: {exc}"})
            return
        op = str(request["op"])
        if role < Role.OPERATOR and op not in self.read_only:
            log.warning("control: refused op %s to uid %d (%s): a reader", op, caller.uid,
                        caller.name or "no account")
            await _write(writer, forbidden(caller, op))
            return
        cancel = asyncio.Event()
        watcher = asyncio.create_task(_watch_for_cancel(reader, cancel))

        async def send(event: Reply) -> None:
            await _write(writer, event)

        try:
            reply = await handler(request, send, cancel)
        except FerryError as exc:
            log.debug("control op %s failed: %s", request.get("op"), exc)
            reply = {"ok": False, "error": str(exc)}
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        with contextlib.suppress(ConnectionError):
            await _write(writer, reply)


async def _watch_for_cancel(reader: asyncio.StreamReader, cancel: asyncio.Event) -> None:
    """Set `cancel` when the client asks for it or hangs up."""
    while True:
        line = await reader.readline()
        if not line:
            cancel.set()
            return
        with contextlib.suppress(ValueError):
            if json.loads(line).get("op") == "cancel":
                cancel.set()
                return


async def _drain_input(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End our side and read what the client sent until it closes (a while at most):
    closing with its request unread would reset the connection, and the client could lose
    the reply it was sent."""
    writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while await reader.read(MAX_LINE):
                pass


async def _write(writer: asyncio.StreamWriter, obj: Reply) -> None:
    writer.write(json.dumps(obj).encode() + b"\n")
    await writer.drain()


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


# ---------------------------------------------------------------------------- client

class ControlClient:
    """The CLI's side: one connection, one request, its replies as they come."""

    def __init__(self, path: Path, timeout: float | None = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise AgentUnreachableError(
                f"no ferry agent on {path} ({exc.strerror}); start one with "
                f"`ferry agent --home {path.parent}`") from exc
        self._file = self.sock.makefile("rb")

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, request: Reply) -> None:
        self.sock.sendall(json.dumps(request).encode() + b"\n")

    def replies(self) -> Iterator[Reply]:
        """Each reply line until the connection ends."""
        for line in self._file:
            yield json.loads(line)

    def call(self, request: Reply) -> Reply:
        """Send a simple request and return its one reply (error replies raise)."""
        self.send(request)
        for reply in self.replies():
            if reply.get("ok") is False:
                raise UserError(reply.get("error", "the agent refused the request"))
            return reply
        raise LocalError(f"the agent on {self.path} closed the connection without a reply")


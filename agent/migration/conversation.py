"""The agent-to-agent protocol as data: which message each side may send or receive in
each state of a conversation, in the style of h11's state tables (sans-IO).

Every message either side sends or receives is checked against its role's table before
it has any effect (CheckedLink does it for every message on the link); anything the
table lacks is a ProtocolError, which rolls the job back. docs/architecture.md draws the
tables from here (`python -m agent.migration.conversation --write`), so they cannot drift.
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from agent import docgen
from agent.errors import ProtocolError
from agent.migration.link import Link
from agent.migration.protocol import MAX_CONTROL_BYTES, Kind, Op


class Role(enum.StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"


class State(enum.StrEnum):
    """Where one side's conversation is."""

    IDLE = "idle"                  # nothing said yet
    PREPARING = "preparing"        # PREPARE said; the destination gets its QEMU ready
    TRANSFER = "transfer"          # pages, QEMU's stream, disk blocks
    DEVICE_STATE = "device-state"  # RAM_DONE said: only QEMU's stream (device state) follows
    LOADING = "loading"            # STREAM_END said: the destination QEMU loads
    LOADED = "loaded"              # LOADED said: waiting for COMMIT
    COMMITTING = "committing"      # COMMIT said: the destination resumes the VM
    DONE = "done"                  # COMMITTED said: the VM runs at the destination
    ABORTING = "aborting"          # ABORT said: the destination removes its copy
    RESUMING = "resuming"          # a new connection for a job whose link was lost
    ASKED = "asked"                # STATUS asked about an earlier job
    CLOSED = "closed"              # the conversation is over


class Dir(enum.StrEnum):
    SEND = "send"
    RECV = "recv"


Message = Kind | Op
"""A data kind (RAM_BATCH, DISK_BATCH, QEMU_STREAM) or a control op."""
Event = tuple[State, Dir, Message]
AnyState = enum.StrEnum
"""A conversation's state: a migration's State, or another conversation's own (an import's:
agent.importer.talk)."""
Table = dict[tuple[Any, Dir, Message], Any]
"""(state, direction, message) -> next state, for any conversation's states."""

DATA = (Kind.RAM_BATCH, Kind.DISK_BATCH, Kind.QEMU_STREAM)
# Before COMMITTED either side may give up: the source with ABORT, either with ERROR.
ABORTABLE = (State.PREPARING, State.TRANSFER, State.DEVICE_STATE, State.LOADING,
             State.LOADED)


def _table(role: Role) -> dict[Event, State]:
    """(state, direction, message) -> next state for one role; what is missing is illegal."""
    out, inn = (Dir.SEND, Dir.RECV) if role is Role.SOURCE else (Dir.RECV, Dir.SEND)
    # `out`: what the source says (the destination hears it); `inn`: the other way.
    t: dict[Event, State] = {
        (State.IDLE, out, Op.PREPARE): State.PREPARING,
        (State.PREPARING, inn, Op.PREPARED): State.TRANSFER,
        **{(State.TRANSFER, out, kind): State.TRANSFER for kind in DATA},
        (State.TRANSFER, out, Op.RAM_DONE): State.DEVICE_STATE,
        (State.DEVICE_STATE, out, Kind.QEMU_STREAM): State.DEVICE_STATE,
        (State.DEVICE_STATE, out, Op.STREAM_END): State.LOADING,
        (State.LOADING, inn, Op.LOADED): State.LOADED,
        (State.LOADED, out, Op.COMMIT): State.COMMITTING,
        (State.COMMITTING, inn, Op.COMMITTED): State.DONE,
        # The VM runs at the destination; it watches the guest a few seconds and says how
        # it runs (agent.migration.timeline). Nothing after it.
        (State.DONE, inn, Op.HEALTH): State.CLOSED,
        (State.ABORTING, inn, Op.ABORTED): State.CLOSED,
        (State.IDLE, out, Op.STATUS): State.ASKED,
        (State.ASKED, inn, Op.STATUS): State.CLOSED,
        # The link was lost in pre-copy: the source says RESUME on a new connection (its
        # conversation goes on; the destination's new one starts there) and resends
        # what the destination's RESUMED says it lacks.
        (State.TRANSFER if role is Role.SOURCE else State.IDLE, out, Op.RESUME):
            State.RESUMING,
        (State.RESUMING, inn, Op.RESUMED): State.TRANSFER,
        (State.RESUMING, inn, Op.ERROR): State.CLOSED,
    }
    # The destination acknowledges what it received, so the source can drop its copies;
    # an ACK may cross the source's RAM_DONE or STREAM_END.
    for state in (State.TRANSFER, State.DEVICE_STATE, State.LOADING):
        t[(state, inn, Op.ACK)] = state
    for state in ABORTABLE:
        t[(state, out, Op.ABORT)] = State.ABORTING
        t[(state, inn, Op.ERROR)] = State.CLOSED
        t[(state, out, Op.ERROR)] = State.CLOSED
    # COMMIT may fail at the destination (its QEMU died): it says so with an ERROR.
    t[(State.COMMITTING, inn, Op.ERROR)] = State.CLOSED
    t[(State.IDLE, inn, Op.ERROR)] = State.CLOSED      # refused before anything began
    t[(State.IDLE, out, Op.ERROR)] = State.CLOSED
    # Said while the ABORT was on its way: answered, no longer acted on.
    for late in (Op.PREPARED, Op.LOADED, Op.ERROR):
        t[(State.ABORTING, inn, late)] = State.ABORTING
    # An ABORT after the other side gave up (best effort) changes nothing.
    t[(State.CLOSED, out, Op.ABORT)] = State.CLOSED
    return t


TABLES: dict[Role, dict[Event, State]] = {role: _table(role) for role in Role}


class Conversation:
    """One side's conversation: consulted before every message is acted on. A migration's
    by default; another conversation (an import) passes its own table and first state."""

    def __init__(self, role: Role, table: Table | None = None,
                 initial: AnyState = State.IDLE, name: str = "migration") -> None:
        self.role = role
        self.state: AnyState = initial
        self.last_step = ""            # the last transition that changed state
        self.name = name
        self._table: Table = TABLES[role] if table is None else table

    def sent(self, message: Message) -> None:
        self._advance(Dir.SEND, message)

    def received(self, message: Message) -> None:
        self._advance(Dir.RECV, message)

    def _advance(self, direction: Dir, message: Message) -> None:
        nxt = self._table.get((self.state, direction, message))
        if nxt is None:
            verb = "send" if direction is Dir.SEND else "receive"
            raise ProtocolError(f"the {self.role.value} of {_article(self.name)} may not "
                                f"{verb} {message_name(message)} in state {self.state.value}")
        if nxt is not self.state:
            self.last_step = step_name(self.role, direction, message)
        self.state = nxt


def step_name(role: Role, direction: Dir, message: Message) -> str:
    """A transition's name, e.g. source:recv:loaded (test hooks and the fault matrix)."""
    return f"{role.value}:{direction.value}:{message_name(message)}"


def steps(role: Role) -> list[str]:
    """Every transition of role's table that changes state, in table order."""
    seen: list[str] = []
    for (state, direction, message), nxt in TABLES[role].items():
        name = step_name(role, direction, message)
        if nxt is not state and name not in seen:
            seen.append(name)
    return seen


def _article(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def message_name(message: Message) -> str:
    """A message as the tables and step names write it: an op's value, a kind's name."""
    return message.value if isinstance(message, Op) else message.name.lower().replace("_", "-")


def message_of(kind: int, payload: bytes | memoryview) -> Message:
    """What a message on the link is: its data kind, or its control op (peeked)."""
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    if kind is not Kind.CONTROL:
        return kind
    if len(payload) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message of {len(payload)} bytes is too large")
    try:
        return Op(json.loads(bytes(payload))["op"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed control message: {exc}") from exc


Hold = Callable[[str], Awaitable[None]]
"""Called with the step name after each message, sent or received (before the receiver
acts on it): the end-to-end tests' fault matrix holds an agent at a step's first time."""


class CheckedLink:
    """A Link whose every message passes the conversation's table first."""

    def __init__(self, link: Link, conversation: Conversation, hold: Hold | None = None) -> None:
        self.link = link
        self.conversation = conversation
        self._hold = hold

    async def send(self, kind: int, payload: bytes | memoryview) -> None:
        message = message_of(kind, payload)
        self.conversation.sent(message)
        await self.link.send(kind, payload)
        if self._hold is not None:
            await self._hold(step_name(self.conversation.role, Dir.SEND, message))

    async def receive(self) -> tuple[int, bytes | memoryview]:
        kind, payload = await self.link.receive()
        await self.accept(kind, payload)
        return kind, payload

    async def accept(self, kind: int, payload: bytes | memoryview) -> None:
        """Check a message received from the link (receive does; the daemon too, for a
        connection's first message, read before it knows which conversation it begins)."""
        message = message_of(kind, payload)
        self.conversation.received(message)
        if self._hold is not None:
            await self._hold(step_name(self.conversation.role, Dir.RECV, message))

    async def close(self) -> None:
        await self.link.close()


# ---------------------------------------------------------------------------- docs

DOC_BEGIN = "<!-- protocol tables: generated by python -m agent.migration.conversation -->"
DOC_END = "<!-- end of protocol tables -->"


def tables_markdown(tables: dict[Role, Table], begin: str, end: str,
                    title: str = "") -> str:
    """Per-role tables as markdown between the doc markers, one row per (state,
    direction, message); `title` goes before each role's name."""
    lines = [begin, ""]
    for role, table in tables.items():
        lines += [f"**{title}{role.value}** (anything not listed is a protocol error):", "",
                  "| state | sends / receives | message | next state |",
                  "|---|---|---|---|"]
        for (state, direction, message), nxt in table.items():
            lines.append(f"| {state.value} | {direction.value} | {message_name(message)} | "
                         f"{nxt.value} |")
        lines.append("")
    lines.append(end)
    return "\n".join(lines)


def markdown() -> str:
    """Both tables as markdown."""
    return tables_markdown(TABLES, DOC_BEGIN, DOC_END)


def with_tables(doc: str) -> str:
    """doc with its generated section replaced by the current tables."""
    return docgen.splice(doc, DOC_BEGIN, DOC_END, markdown())


def main(argv: Iterable[str] | None = None) -> int:
    return docgen.main(argv, description=__doc__.splitlines()[0],
                       default_doc=Path("docs/architecture.md"), render=markdown,
                       rewrite=with_tables)


if __name__ == "__main__":
    sys.exit(main())

"""The protocol tables: the migration's legal sequence passes both sides, anything else is a
ProtocolError before it has an effect; the architecture document shows the tables as
they are."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.errors import ProtocolError
from agent.migration.conversation import (
    TABLES,
    CheckedLink,
    Conversation,
    Dir,
    Role,
    State,
    markdown,
    message_of,
    steps,
    with_tables,
)
from agent.migration.protocol import Kind, Op, control

MIGRATION = [  # (who says it, message)
    (Role.SOURCE, Op.PREPARE), (Role.DESTINATION, Op.PREPARED),
    (Role.SOURCE, Kind.RAM_BATCH), (Role.SOURCE, Kind.QEMU_STREAM),
    (Role.SOURCE, Kind.DISK_BATCH), (Role.SOURCE, Kind.RAM_BATCH),
    (Role.SOURCE, Op.RAM_DONE), (Role.SOURCE, Kind.QEMU_STREAM),
    (Role.SOURCE, Op.STREAM_END), (Role.DESTINATION, Op.LOADED),
    (Role.SOURCE, Op.COMMIT), (Role.DESTINATION, Op.COMMITTED)]


def exchange(src: Conversation, dst: Conversation, script) -> tuple[Conversation, Conversation]:
    """Each (speaker, message) of the script sent by one side and received by the other."""
    for speaker, message in script:
        if speaker is Role.SOURCE:
            src.sent(message)
            dst.received(message)
        else:
            dst.sent(message)
            src.received(message)
    return src, dst


def play(script) -> tuple[Conversation, Conversation]:
    return exchange(Conversation(Role.SOURCE), Conversation(Role.DESTINATION), script)


def test_a_whole_migration_is_legal_on_both_sides() -> None:
    src, dst = play(MIGRATION)
    assert src.state is dst.state is State.DONE


@pytest.mark.parametrize("cut", range(1, len(MIGRATION) - 1))
def test_abort_is_legal_until_committing(cut: int) -> None:
    if MIGRATION[cut - 1][1] is Op.COMMIT:
        pytest.skip("after COMMIT only the destination decides")
    src, dst = play(MIGRATION[:cut] + [(Role.SOURCE, Op.ABORT), (Role.DESTINATION,
                                                                 Op.ABORTED)])
    assert src.state is dst.state is State.CLOSED


@pytest.mark.parametrize("prefix, speaker, message", [
    (2, Role.SOURCE, Op.COMMIT),             # COMMIT before LOADED
    (7, Role.SOURCE, Kind.RAM_BATCH),        # a batch after RAM_DONE
    (7, Role.SOURCE, Kind.DISK_BATCH),
    (7, Role.SOURCE, Op.RAM_DONE),           # twice
    (9, Role.SOURCE, Kind.QEMU_STREAM),      # stream data after STREAM_END
    (2, Role.SOURCE, Op.STREAM_END),         # before RAM_DONE
    (0, Role.SOURCE, Kind.RAM_BATCH),        # before PREPARE
    (1, Role.SOURCE, Kind.RAM_BATCH),        # before PREPARED
    (12, Role.SOURCE, Op.ABORT),             # after COMMITTED
    (11, Role.SOURCE, Op.ABORT),             # after COMMIT
    (2, Role.DESTINATION, Op.COMMITTED),
    (2, Role.DESTINATION, Op.LOADED),        # before STREAM_END
    (9, Role.DESTINATION, Op.HEALTH),        # before the guest resumed
    (11, Role.DESTINATION, Op.HEALTH),       # after COMMIT, before COMMITTED
])
def test_out_of_order_messages_are_refused_by_the_receiver(prefix, speaker, message) -> None:
    src, dst = play(MIGRATION[:prefix])
    receiver = dst if speaker is Role.SOURCE else src
    with pytest.raises(ProtocolError, match="may not receive"):
        receiver.received(message)


def test_health_after_committed_ends_the_conversation() -> None:
    src, dst = play(MIGRATION + [(Role.DESTINATION, Op.HEALTH)])
    assert src.state is dst.state is State.CLOSED
    with pytest.raises(ProtocolError, match="may not receive health"):
        src.received(Op.HEALTH)              # once only


def test_status_is_a_conversation_of_its_own() -> None:
    src, dst = play([(Role.SOURCE, Op.STATUS), (Role.DESTINATION, Op.STATUS)])
    assert src.state is dst.state is State.CLOSED
    with pytest.raises(ProtocolError):
        play([(Role.SOURCE, Op.PREPARE), (Role.SOURCE, Op.STATUS)])


def test_steps_name_each_transition_once() -> None:
    src = steps(Role.SOURCE)
    assert src[:7] == ["source:send:prepare", "source:recv:prepared", "source:send:ram-done",
                       "source:send:stream-end", "source:recv:loaded", "source:send:commit",
                       "source:recv:committed"]
    assert len(src) == len(set(src))
    assert "destination:recv:commit" in steps(Role.DESTINATION)


def test_message_of_peeks_control_ops_and_refuses_junk() -> None:
    assert message_of(Kind.RAM_BATCH, b"anything") is Kind.RAM_BATCH
    assert message_of(Kind.CONTROL, control(Op.LOADED, pages=3).encode()) is Op.LOADED
    for junk in (b"{", b'{"op": "nope"}', b"[]", b'"x"'):
        with pytest.raises(ProtocolError):
            message_of(Kind.CONTROL, junk)
    with pytest.raises(ProtocolError, match="unknown message kind"):
        message_of(250, b"")


class Pipe:
    """A Link that records what is sent and always delivers a COMMIT."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    async def send(self, kind: int, payload: bytes | memoryview) -> None:
        self.sent.append(kind)

    async def receive(self) -> tuple[int, bytes]:
        return Kind.CONTROL, control(Op.COMMIT).encode()

    async def close(self) -> None:
        pass


def test_checked_link_refuses_before_the_message_has_any_effect() -> None:
    pipe = Pipe()
    link = CheckedLink(pipe, Conversation(Role.DESTINATION))

    async def run() -> None:
        with pytest.raises(ProtocolError):
            await link.send(Kind.CONTROL, control(Op.LOADED).encode())
        assert pipe.sent == []
        with pytest.raises(ProtocolError, match="may not receive commit in state idle"):
            await link.receive()
    asyncio.run(run())


def test_tables_have_no_dead_ends_before_the_end() -> None:
    for role, table in TABLES.items():
        states = {s for s, _, _ in table} | set(table.values())
        for state in states - {State.DONE, State.CLOSED}:
            assert any(s is state for s, _, _ in table), (role, state)
        assert all(d in (Dir.SEND, Dir.RECV) for _, d, _ in table)


def test_architecture_document_shows_the_tables_as_they_are() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    assert markdown() in doc
    assert with_tables(doc) == doc

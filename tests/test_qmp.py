"""agent.qemu.qmp against a real QEMU: commands, error translation, events with QEMU's
timestamps."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from agent.errors import (
    QemuError,
    QmpCommandError,
    QmpConnectError,
    QmpDisconnectedError,
    QmpTimeoutError,
)
from agent.qemu import qmp

# A connect to a dead socket must fail at once, not after a timeout.
FAST_FAILURE = 1.0
# QEMU and this process read the same host clock; allow for scheduling.
CLOCK_SLACK = 5.0


async def open_and_close(path, timeout=qmp.DEFAULT_CONNECT_TIMEOUT):
    q = await qmp.connect(path, timeout=timeout)
    await q.disconnect()


def test_dead_socket_fails_fast_with_connect_error(tmp_path):
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))   # left behind, nobody listening: like a crashed QEMU
    start = time.monotonic()
    with pytest.raises(QmpConnectError, match="refused") as info:
        asyncio.run(open_and_close(path, timeout=10))
    assert time.monotonic() - start < FAST_FAILURE
    assert str(path) in str(info.value)


def test_missing_socket_is_a_connect_error(tmp_path):
    with pytest.raises(QmpConnectError, match="No such file"):
        asyncio.run(open_and_close(tmp_path / "nothing.sock"))


def test_library_errors_are_not_logged_above_debug(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with pytest.raises(QmpConnectError):
        asyncio.run(open_and_close(tmp_path / "nothing.sock"))
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


@pytest.mark.qemu
def test_execute_query_status_and_version(guest):
    async def main():
        async with qmp.connect(guest.qmp_path) as q:
            assert q.connected
            status = await q.execute("query-status")
            assert status["status"] == "running"
            assert q.qemu_version >= (7, 0, 0)
        assert not q.connected
    asyncio.run(main())


@pytest.mark.qemu
def test_unknown_command_is_a_command_error(guest):
    async def main():
        async with qmp.connect(guest.qmp_path) as q:
            with pytest.raises(QmpCommandError) as info:
                await q.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"
            assert info.value.command == "no-such-command"
            assert "no-such-command" in info.value.desc
            # The session survives a refused command.
            assert (await q.execute("query-status"))["running"]
    asyncio.run(main())


@pytest.mark.qemu
def test_hmp_passthrough(guest):
    async def main():
        async with qmp.connect(guest.qmp_path) as q:
            assert "running" in await q.hmp("info status")
    asyncio.run(main())


@pytest.mark.qemu
def test_second_client_gets_a_clear_timeout(guest):
    async def main():
        async with qmp.connect(guest.qmp_path):
            with pytest.raises(QmpConnectError, match="one QMP client at a time"):
                await qmp.connect(guest.qmp_path, timeout=0.3)
        # Once the first client leaves, QEMU serves the next one.
        async with qmp.connect(guest.qmp_path) as q:
            assert (await q.execute("query-status"))["running"]
    asyncio.run(main())


@pytest.mark.qemu
def test_stop_and_resume_events_carry_qemu_timestamps(guest):
    async def main():
        async with qmp.connect(guest.qmp_path) as q:
            mark = q.event_mark()
            await q.execute("stop")
            stop = await q.wait_event("STOP", after=mark, timeout=5)
            beat = guest.mailbox().heartbeat
            await asyncio.sleep(0.2)
            assert guest.mailbox().heartbeat == beat   # stopped means stopped
            await q.execute("cont")
            resume = await q.wait_event("RESUME", after=mark, timeout=5)
            return stop, resume, q.events(after=mark)
    stop, resume, recorded = asyncio.run(main())
    assert stop.name == "STOP" and resume.name == "RESUME"
    assert abs(stop.timestamp - time.time()) < CLOCK_SLACK
    assert 0.2 <= (resume.timestamp_us - stop.timestamp_us) / 1e6 < CLOCK_SLACK
    assert [e.name for e in recorded] == ["STOP", "RESUME"]
    assert stop.seq < resume.seq


@pytest.mark.qemu
def test_missing_event_times_out(guest):
    async def main():
        async with qmp.connect(guest.qmp_path) as q:
            with pytest.raises(QmpTimeoutError, match="RESUME"):
                await q.wait_event("RESUME", timeout=0.2)
    asyncio.run(main())


@pytest.mark.qemu
def test_qemu_dying_fails_waiters_and_commands_at_once(guest):
    async def main():
        async with qmp.connect(guest.qmp_path) as q:
            waiter = asyncio.create_task(q.wait_event("RESUME", timeout=30))
            await asyncio.sleep(0.05)
            guest.process.kill()
            start = time.monotonic()
            with pytest.raises(QmpDisconnectedError):
                await waiter
            assert time.monotonic() - start < FAST_FAILURE
            with pytest.raises(QmpDisconnectedError):
                await q.execute("query-status")
            with pytest.raises(QmpDisconnectedError):
                await q.disconnect()
    asyncio.run(main())


@pytest.mark.qemu
def test_cancellation_is_never_wrapped(guest):
    async def main():
        async with qmp.connect(guest.qmp_path) as q:
            waiter = asyncio.create_task(q.wait_event("RESUME", timeout=30))
            await asyncio.sleep(0.05)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert (await q.execute("query-status"))["running"]
    asyncio.run(main())


@pytest.mark.qemu
def test_quit_ends_qemu(guest):
    async def main():
        q = await qmp.connect(guest.qmp_path)
        await q.quit()
        assert await guest.process.wait(timeout=5) == 0
    asyncio.run(main())


def test_errors_belong_to_the_qemu_branch():
    for cls in (QmpConnectError, QmpCommandError, QmpTimeoutError, QmpDisconnectedError):
        assert issubclass(cls, QemuError)

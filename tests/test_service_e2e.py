"""The agent as systemd runs it, as a real subprocess: sd_notify datagrams on a real
NOTIFY_SOCKET (READY, WATCHDOG, STOPPING), journal-style lines, and its config file
checked at start (--config, refusals, flags over the file)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import identity
from agent.localpair import AgentProcess, free_port
from agent.service.control import ControlClient

WATCHDOG_USEC = 200_000      # a ping every 0.1 s


@pytest.fixture
def root() -> Iterator[Path]:
    """A short directory (unix socket paths) for an agent's home and its notify socket."""
    path = Path(tempfile.mkdtemp(prefix="fy-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def agent_in(root: Path, **kwargs: Any) -> AgentProcess:
    ram = root / "ram"
    ram.mkdir(exist_ok=True)
    agent = AgentProcess("a", root / "a", free_port(), ram, **kwargs)
    identity.ensure_home(agent.home)
    return agent


def receive(sock: socket.socket, until: str, deadline: float) -> list[tuple[float, str]]:
    """Datagrams (arrival time, text) up to and including the first equal to `until`."""
    got: list[tuple[float, str]] = []
    while not got or got[-1][1] != until:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append((time.monotonic(), sock.recv(4096).decode()))
        except TimeoutError:
            raise AssertionError(f"no {until} within the deadline; got {got}") from None
    return got


def drain(sock: socket.socket) -> list[str]:
    """The datagrams already waiting."""
    got = []
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(4096).decode())
    except BlockingIOError:
        return got
    finally:
        sock.setblocking(True)


def test_ready_then_watchdog_pings_then_stopping_on_sigterm(root: Path) -> None:
    notify_path = root / "notify.sock"
    log_path = root / "a.log"
    log_path.touch()     # the agent's stderr; JOURNAL_STREAM names it as systemd would
    st = log_path.stat()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        agent = agent_in(root, env={"NOTIFY_SOCKET": str(notify_path),
                                    "WATCHDOG_USEC": str(WATCHDOG_USEC),
                                    "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        try:
            agent.start()
            assert agent.log_path == log_path
            started = receive(sock, "READY=1", time.monotonic() + 10)
            assert [text for _, text in started] == ["READY=1"]
            queued = drain(sock)   # pings sent while start() waited: their times are ours
            assert set(queued) <= {"WATCHDOG=1"}, queued
            pings: list[float] = []
            while len(pings) < 8:
                pings += [t for t, text in receive(sock, "WATCHDOG=1", time.monotonic() + 10)]
            # Every half WATCHDOG_USEC (0.1 s), not faster; measured where they arrive, so
            # on average (a late recv shortens one gap) and from the second one on.
            mean_gap = (pings[-1] - pings[1]) / (len(pings) - 2)
            assert 0.05 <= mean_gap <= 1.0, pings
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGTERM)
            stopping = receive(sock, "STOPPING=1", time.monotonic() + 10)
            assert {text for _, text in stopping} <= {"WATCHDOG=1", "STOPPING=1"}
            assert agent.proc.wait(timeout=30) == 0
        finally:
            agent.stop()
    lines = agent.log().splitlines()
    # Journal-style: a syslog priority first, no level name (the agent runs at -vv).
    logged = [line for line in lines if line.startswith("<")]
    assert logged and all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in logged)
    assert not any(line.startswith("ferry: DEBUG") for line in lines)


def start_refused(root: Path, config_text: str | None) -> subprocess.CompletedProcess[str]:
    home = root / "h"
    config = root / "bad.toml"
    if config_text is not None:
        config.write_text(config_text)
    return subprocess.run([sys.executable, "-m", "agent", "agent", "--home", str(home),
                           "--listen", f"127.0.0.1:{free_port()}", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize(("text", "message"), [
    ("max_outbond = 1\n", "unknown setting max_outbond (did you mean max_outbound?)"),
    ('max_outbound = "two"\n', "max_outbound must be a whole number >= 1, not 'two'"),
    (None, "does not exist"),
])
def test_a_bad_config_file_is_refused_at_start(root: Path, text: str | None,
                                               message: str) -> None:
    done = start_refused(root, text)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and str(root / "bad.toml") in done.stderr
    assert "Traceback" not in done.stderr
    assert not (root / "h" / "control.sock").exists()


def test_flags_beat_the_config_file_and_the_file_beats_defaults(root: Path) -> None:
    config = root / "agent.toml"
    config.write_text(f'listen = "127.0.0.1:{free_port()}"\nmax_outbound = 1\n'
                      f'history_limit = 7\n')
    agent = agent_in(root, args=("--config", str(config)))    # and --listen, a flag
    try:
        agent.start()
        with ControlClient(agent.home / "control.sock") as client:
            status = client.call({"op": "status"})
        assert status["listen"] == agent.address
        assert status["limits"] == {"max_outbound": 1, "max_inbound": 2, "history_limit": 7,
                                    "bandwidth": None}
    finally:
        agent.stop()
    assert not os.path.exists(agent.home / "control.sock")

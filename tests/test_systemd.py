"""systemd pieces without systemd: the watchdog interval, the journal check and its line
format, and the unit file as `systemd-analyze verify` sees it."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import JournalFormatter
from agent.service import systemd

UNIT = Path(__file__).parent.parent / "contrib" / "ferry-agent.service"


@pytest.mark.parametrize(("usec", "pid", "interval"), [
    ("200000", None, 0.1),
    ("30000000", "self", 15.0),
    ("30000000", "1", None),          # systemd watches another process
    (None, None, None),               # WatchdogSec unset
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
        monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
        interval: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_interval() == interval


def test_the_journal_is_stderr_only_when_journal_stream_names_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert systemd.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not systemd.stderr_is_journal()      # stderr redirected elsewhere
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not systemd.stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not systemd.stderr_is_journal()


def test_journal_lines_carry_syslog_priorities_and_no_time() -> None:
    formatter = JournalFormatter("%(name)s: %(message)s")
    lines = [formatter.format(logging.LogRecord("ferry.x", level, __file__, 1, "m %s",
                                                ("a",), None))
             for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO,
                           logging.DEBUG)]
    assert lines == ["<3>ferry.x: m a", "<3>ferry.x: m a", "<4>ferry.x: m a",
                     "<6>ferry.x: m a", "<7>ferry.x: m a"]


def test_notify_without_a_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of the unit with ExecStart on this venv's ferry script
    (verify needs the binary to exist)."""
    ferry = Path(sys.executable).with_name("ferry")
    assert ferry.exists(), f"no ferry script next to {sys.executable}: run make setup"
    unit = tmp_path / "ferry-agent.service"
    unit.write_text(unit_text.replace("/usr/local/bin/ferry", str(ferry)))
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="needs systemd-analyze (package systemd)")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "KillMode=process",
                 "--config /etc/ferry/agent.toml"):
        assert line in text
    done = verify(text, tmp_path)
    said = [line for line in (done.stdout + done.stderr).splitlines()
            if "ferry-agent" in line]
    assert done.returncode == 0 and said == [], done.stdout + done.stderr
    # The negative control: verify does speak up about a broken unit.
    broken = verify(text.replace("Type=notify", "Type=notify\nTypo=yes"), tmp_path)
    assert "Typo" in broken.stdout + broken.stderr

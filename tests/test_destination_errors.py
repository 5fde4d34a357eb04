"""The destination's errors when QEMU's migration socket fails: they say what happened."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from agent.errors import QemuError
from agent.migration.destination import DestinationJob, IncomingVm
from agent.state.config import AgentConfig


class StubQemu:
    """A QEMU process that exits with `status` (None: keeps running past any wait)."""

    def __init__(self, status: int | None) -> None:
        self.status = status

    async def wait(self, timeout: float) -> int:
        if self.status is None:
            raise QemuError(f"still runs after {timeout:g} s")
        return self.status

    def log_tail(self) -> str:
        return "qemu: the last lines of its log"


def stream_failure(tmp_path: Path, status: int | None) -> QemuError:
    job = DestinationJob(config=AgentConfig(home=tmp_path, ram_dir=tmp_path),
                         link=None, peer="hosta", job_id="0123456789ab")  # type: ignore[arg-type]
    job.incoming = IncomingVm(spec=SimpleNamespace(), paths=SimpleNamespace(),  # type: ignore[arg-type]
                              process=StubQemu(status))  # type: ignore[arg-type]
    return asyncio.run(job._stream_failed(ConnectionResetError(104, "Connection reset by peer")))


def test_a_socket_failure_because_qemu_died_says_it_exited(tmp_path: Path) -> None:
    error = stream_failure(tmp_path, -9)
    assert str(error) == ("destination QEMU exited with status -9: "
                          "qemu: the last lines of its log")


def test_a_socket_failure_while_qemu_runs_names_the_socket_error(tmp_path: Path) -> None:
    error = stream_failure(tmp_path, None)
    assert "migration socket failed (Connection reset by peer) while QEMU still runs" in str(error)
    assert "last lines of its log" in str(error)

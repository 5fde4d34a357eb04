"""SIGTERM (systemd stopping the agent) during a migration: running jobs may finish within
shutdown_grace_s; what outlives it rolls back, the source keeps running, nothing is left."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.guest.build import default_cache_dir
from agent.state import journal
from tests.agents import AgentPair
from tests.test_migration_e2e import (
    SLOW,
    assert_destination_clean,
    assert_source_intact,
    boot,
    finish,
    lift_caps,
    two_more_passes,
    wait_for_precopy,
)

pytestmark = pytest.mark.qemu


@pytest.fixture
def agents_with_grace() -> Iterator[Callable[[float], AgentPair]]:
    """Factory: agents a and b, a with shutdown_grace_s as given; removed at the end."""
    made: list[AgentPair] = []

    def make(grace_s: float) -> AgentPair:
        pair = AgentPair.create(Path(tempfile.mkdtemp(prefix="fy-")),
                                allow=(default_cache_dir(),))
        made.append(pair)
        with open(pair.a.home / "agent.toml", "a") as f:
            f.write(f"shutdown_grace_s = {grace_s}\n")
        pair.start()
        return pair
    try:
        yield make
    finally:
        for pair in made:
            pair.cleanup()
            shutil.rmtree(pair.root, ignore_errors=True)


def test_sigterm_lets_a_running_migration_finish(agents_with_grace, start_guest) -> None:
    patient = agents_with_grace(120)
    guest = boot(start_guest)
    proc = patient.popen_migrate("--qmp", str(guest.qmp_path), *SLOW)
    wait_for_precopy(patient)
    assert patient.a.proc is not None
    lift_caps(patient)    # before the signal: a stopping agent closes its control socket
    patient.a.proc.send_signal(signal.SIGTERM)
    rc, report, stderr = finish(proc)
    assert rc == 0 and report["status"] == "completed", f"{report}\n{stderr}\n{patient.logs()}"
    assert patient.a.proc.wait(timeout=30) == 0       # and then the agent stopped
    assert "waiting up to 120 s for 1 running job(s)" in patient.a.log()   # signalled mid-job
    assert journal.entries(patient.a.config) == []
    _, now = two_more_passes(patient.b.vm_record("mig").ram_path)
    assert now.errors == 0


def test_sigterm_rolls_back_what_outlives_the_grace(agents_with_grace, start_guest) -> None:
    hasty = agents_with_grace(0.5)
    guest = boot(start_guest)
    proc = hasty.popen_migrate("--qmp", str(guest.qmp_path), "--bandwidth", "4M")
    dest_pid = wait_for_precopy(hasty)
    assert hasty.a.proc is not None
    hasty.a.proc.send_signal(signal.SIGTERM)
    rc, report, stderr = finish(proc)
    assert rc == 1 and report["status"] in ("cancelled", "failed"), f"{report}\n{stderr}"
    assert hasty.a.proc.wait(timeout=30) == 0
    assert "rolling back 1 job(s) still running after 0.5 s" in hasty.a.log()
    assert journal.entries(hasty.a.config) == []
    assert_source_intact(guest)
    assert_destination_clean(hasty, dest_pid)

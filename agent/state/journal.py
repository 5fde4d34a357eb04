"""The agent's journal of jobs in flight, so a restarted agent can finish or undo them.

One small JSON file per job in the home's journal/ directory, rewritten atomically at
every step that changes what recovery must do, and removed when the job ends. What
recovery does (see `recover`):
  destination, not committed  -> kill the incoming QEMU, remove its files
  source, before COMMIT       -> resume the source VM if it is paused
  source, COMMIT sent         -> leave the VM stopped and say so: only the destination
                                 knows whether it took over (DESIGN §2)
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.errors import QemuError
from agent.hostnet import devices
from agent.qemu import qmp as qmp_mod
from agent.qemu.vm import is_qemu
from agent.state.config import AgentConfig

log = logging.getLogger(__name__)


class Step(enum.StrEnum):
    """How far a journaled job got."""

    INCOMING = "incoming"        # destination: QEMU started, VM not ours yet
    PRECOPY = "precopy"          # source: guest running, pages flowing
    STOPPED = "stopped"          # source: guest stopped for the switchover
    COMMITTING = "committing"    # source: COMMIT sent


@dataclass(frozen=True, slots=True)
class Entry:
    """One job's recovery information."""

    job: str
    role: str                    # "source" or "destination"
    step: Step
    vm: str
    qmp_path: str = ""
    pid: int = 0
    vm_dir: str = ""
    ram_path: str = ""
    peer: str = ""
    disks: list[str] = field(default_factory=list)   # destination: images it created
    links: list[str] = field(default_factory=list)   # destination: macvtaps (outlive QEMU)


def _path(config: AgentConfig, job: str) -> Path:
    return config.journal_dir / f"{job}.json"


def write(config: AgentConfig, entry: Entry) -> None:
    """Record (or update) a job's step, durably enough to survive the agent crashing."""
    config.journal_dir.mkdir(parents=True, exist_ok=True)
    path = _path(config, entry.job)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(entry), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove(config: AgentConfig, job: str) -> None:
    """The job ended (either way): nothing left to recover."""
    _path(config, job).unlink(missing_ok=True)


def entries(config: AgentConfig) -> list[Entry]:
    """Every job left in the journal (by a crashed or killed agent)."""
    found = []
    if config.journal_dir.is_dir():
        for path in sorted(config.journal_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                data["step"] = Step(data["step"])
                found.append(Entry(**data))
            except (OSError, ValueError, TypeError, KeyError):
                log.error("ignoring unreadable journal entry %s", path)
    return found


async def recover(config: AgentConfig) -> list[str]:
    """Finish or undo every journaled job; one line per job saying what was done."""
    done = []
    for entry in entries(config):
        if entry.role == "destination":
            if entry.pid and is_qemu(entry.pid):
                os.kill(entry.pid, signal.SIGKILL)
            Path(entry.ram_path).unlink(missing_ok=True)
            for disk in entry.disks:
                Path(disk).unlink(missing_ok=True)
            for link in entry.links:
                devices.delete_link(link)
            if entry.vm_dir:
                shutil.rmtree(entry.vm_dir, ignore_errors=True)
            done.append(f"incoming {entry.vm} (job {entry.job}): removed the unfinished copy")
        elif entry.step is Step.COMMITTING:
            done.append(f"outgoing {entry.vm} (job {entry.job}): COMMIT was sent to "
                        f"{entry.peer}; the source VM stays stopped. Check the destination: "
                        f"if {entry.vm} does not run there, resume it here with QMP `cont`")
            log.error(done[-1])
        else:
            done.append(f"outgoing {entry.vm} (job {entry.job}): {await _resume(entry)}")
        remove(config, entry.job)
    for line in done:
        log.warning("recovered: %s", line)
    return done


async def _resume(entry: Entry) -> str:
    """Resume a source VM left paused by a job that never sent COMMIT."""
    try:
        async with qmp_mod.connect(entry.qmp_path) as qmp:
            with contextlib.suppress(QemuError):
                await qmp.execute("migrate_cancel")
            status = (await qmp.execute("query-status")).get("status")
            if status == "running":
                return "source VM was running"
            await qmp.execute("cont")
            return f"source VM resumed (was {status})"
    except QemuError as exc:
        return f"could not reach the source VM to resume it: {exc}"

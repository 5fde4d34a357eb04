"""The agent's journal of jobs in flight, so a restarted agent can finish or undo them.

One small JSON file per job in the home's journal/ directory, written (atomically, and
synced) before each step that changes what recovery must do, and removed only when the
job is final. What recovery does with each step: agent.migration.recovery.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.state.config import AgentConfig

log = logging.getLogger(__name__)


class Step(enum.StrEnum):
    """How far a journaled job got (written before the step is taken)."""

    INCOMING = "incoming"        # destination: its QEMU may exist; the VM is not ours
    COMMIT_RECEIVED = "commit-received"   # destination: COMMIT came; `cont` may be done
    PRECOPY = "precopy"          # source: guest running, pages flowing
    STOPPED = "stopped"          # source: guest stopped for the switchover
    COMMITTING = "committing"    # source: COMMIT may have left
    COMMITTED = "committed"      # source: the destination runs the VM; ours must quit
    MOVING = "moving"            # disk move: its target may exist, in QEMU's graph or not


@dataclass(frozen=True, slots=True)
class Entry:
    """One job's recovery information."""

    job: str
    role: str                    # "source", "destination" or "disk-move"
    step: Step
    vm: str
    qmp_path: str = ""
    pid: int = 0
    vm_dir: str = ""
    ram_path: str = ""
    peer: str = ""
    disks: list[str] = field(default_factory=list)   # images it created (dest., disk move)
    links: list[str] = field(default_factory=list)   # destination: macvtaps (outlive QEMU)
    nics: list[dict[str, str]] = field(default_factory=list)   # destination: for its record
    # source: block_set_io_throttle arguments that put back the own limits of disks whose
    # writes the job capped (agent.storage.disk_throttle)
    disk_limits: list[dict[str, Any]] = field(default_factory=list)


def _path(config: AgentConfig, job: str) -> Path:
    return config.journal_dir / f"{job}.json"


def write(config: AgentConfig, entry: Entry, *, survive_host_crash: bool = True) -> None:
    """Record (or update) a job's step: the rename makes it survive the agent crashing;
    survive_host_crash also fsyncs it, for a step that still decides something after the
    host reboots.

    A step that only concerns a QEMU on this host (the source's) decides nothing once the
    host went down, since that QEMU went with it: such writes skip the fsync (0.6 ms here,
    up to 8 ms on a busy disk), which the source pays inside the guest's pause."""
    config.journal_dir.mkdir(parents=True, exist_ok=True)
    path = _path(config, entry.job)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(entry), f)
        f.flush()
        if survive_host_crash:
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

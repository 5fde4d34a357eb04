"""What a destination did with each job's VM, kept across its restarts: the answer to a
source that lost the link after sending COMMIT and asks (STATUS) whether to resume.

One small file per job under HOME/outcomes/, the newest MAX_OUTCOMES kept.
"""

from __future__ import annotations

import enum
import json
import os
import re
from pathlib import Path

from agent.state.config import AgentConfig

MAX_OUTCOMES = 1000
JOB_ID = re.compile(r"[0-9a-f]{6,32}")


class Outcome(enum.StrEnum):
    RESUMED = "resumed"    # the VM runs here: the source must not resume
    REMOVED = "removed"    # no copy here (rolled back, or never resumed): the source may


def _dir(config: AgentConfig) -> Path:
    return config.home / "outcomes"


def record(config: AgentConfig, job: str, outcome: Outcome, vm: str) -> None:
    """Remember (durably) what became of job's VM here."""
    if not JOB_ID.fullmatch(job):
        return
    directory = _dir(config)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{job}.tmp"
    with open(tmp, "w") as f:
        json.dump({"job": job, "outcome": outcome.value, "vm": vm}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / f"{job}.json")
    _prune(directory)


def lookup(config: AgentConfig, job: str) -> Outcome | None:
    if not JOB_ID.fullmatch(job):
        return None
    try:
        return Outcome(json.loads((_dir(config) / f"{job}.json").read_text())["outcome"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prune(directory: Path) -> None:
    files = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    for old in files[:-MAX_OUTCOMES]:
        old.unlink(missing_ok=True)

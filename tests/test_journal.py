"""The job journal: what a restarted agent reads, and which steps pay for an fsync."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.state import journal
from agent.state.config import AgentConfig


def _entry(role: str, step: journal.Step) -> journal.Entry:
    return journal.Entry(job="j1", role=role, step=step, vm="vm1", peer="hostb")


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(journal.os, "fsync", counting)
    return calls


def test_a_written_step_is_what_a_restarted_agent_reads(tmp_path: Path) -> None:
    config = AgentConfig(home=tmp_path / "home", ram_dir=tmp_path)
    journal.write(config, _entry("destination", journal.Step.INCOMING))
    journal.write(config, _entry("destination", journal.Step.COMMIT_RECEIVED))
    assert journal.entries(config) == [_entry("destination", journal.Step.COMMIT_RECEIVED)]
    assert not list(config.journal_dir.glob("*.tmp"))
    journal.remove(config, "j1")
    assert journal.entries(config) == []


def test_only_steps_that_outlive_the_host_are_fsynced(tmp_path: Path,
                                                      fsyncs: list[int]) -> None:
    config = AgentConfig(home=tmp_path / "home", ram_dir=tmp_path)
    journal.write(config, _entry("destination", journal.Step.COMMIT_RECEIVED))
    assert len(fsyncs) == 1
    journal.write(config, _entry("source", journal.Step.COMMITTING), survive_host_crash=False)
    assert len(fsyncs) == 1
    assert journal.entries(config) == [_entry("source", journal.Step.COMMITTING)]


def test_the_source_job_journals_without_fsync(tmp_path: Path, fsyncs: list[int]) -> None:
    """Its steps sit inside the guest's pause and concern only its own host's QEMU."""
    from agent.migration import source
    job = source.SourceJob.__new__(source.SourceJob)
    job.config = AgentConfig(home=tmp_path / "home", ram_dir=tmp_path)
    job.job_id, job.vm_name, job.qmp_path, job.peer = "j1", "vm1", tmp_path / "q", "hostb"
    job.storage = None
    job._step = journal.Step.PRECOPY
    job._journal(journal.Step.STOPPED)
    assert fsyncs == []
    assert [e.step for e in journal.entries(job.config)] == [journal.Step.STOPPED]

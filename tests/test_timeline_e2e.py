"""A job's timeline and the guest's health after the move, with real agents and a real
test guest: samples every second of the job, the downtime window where the report's
downtime says, the destination's pace after the resume, `ferry report ID --png` as a real
CLI run; and a health reply that never comes leaves the migration completed."""

from __future__ import annotations

import itertools
import json
import signal
import struct
from pathlib import Path
from typing import Any

import pytest

from agent.migration.timeline import HEALTH_MARGIN_S, HEALTH_TOLERANCE
from agent.units import parse_rate
from tests import test_ops_e2e
from tests.test_ops_e2e import SLOW, call, ferry, ferry_json, job_state, small_guest, wait_for

pytestmark = pytest.mark.qemu
make_agents = test_ops_e2e.make_agents   # the agent pairs of the operations tests


def rows(part: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(part["fields"], row, strict=True)) for row in part["samples"]]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_a_migration_reports_its_timeline_and_a_healthy_guest(make_agents, start_guest,
                                                              tmp_path: Path) -> None:
    agents = make_agents()
    guest = small_guest(start_guest, "tl")
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path), "--bandwidth", SLOW)
    assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
    timeline = report["timeline"]
    samples = rows(timeline)
    total_s = report["total_ms"] / 1000
    assert total_s > 3, report       # slow enough to be worth a timeline
    # At least one sample a second, over the whole job.
    ts = [s["t"] for s in samples]
    assert timeline["interval_s"] == 1.0 and len(samples) >= int(total_s) - 1
    assert ts[0] <= 1.5 and ts[-1] >= total_s - 1.5
    assert all(0.5 < b - a < 1.5 for a, b in itertools.pairwise(ts[:-1]))
    assert ts[-1] - ts[-2] < 1.5     # the last: the part of a second up to the resume
    # The downtime window: STOP to RESUME, as long as the report's downtime.
    marks = timeline["marks"]
    assert marks["resume_s"] - marks["stop_s"] == pytest.approx(report["downtime_ms"] / 1000,
                                                                abs=0.002)
    assert 0 < marks["stop_s"] < total_s
    before = [s for s in samples if s["t"] < marks["stop_s"]]
    after = [s for s in samples if s["t"] > marks["stop_s"] + 1]
    assert {s["phase"] for s in before} <= {"preparing", "precopy", "throttling"}
    assert {s["phase"] for s in after} <= {"stop-and-copy", "committing", "completed"}
    # The wire rates add up to the bytes the report says went over the wire, and in
    # pre-copy they are near the cap (SLOW, 3 MB/s: a burst allowed at the start).
    sent = sum(s["wire_bps"] * (s["t"] - t0) for s, t0 in zip(samples, [0.0, *ts],
                                                                  strict=False))
    assert sent == pytest.approx(report["wire_bytes"], rel=0.05)
    precopy = [s["wire_bps"] for s in before if s["phase"] == "precopy"]
    assert precopy and 1_000_000 < sum(precopy) / len(precopy) < parse_rate(SLOW) * 1.5
    assert any(s["remaining_bytes"] for s in before)
    # The guest spins (a busy wait between pages): it runs a good part of a vCPU.
    paces = [s["vcpu_pace"] for s in before if s["vcpu_pace"] is not None]
    assert paces and max(paces) > 0.3
    assert all(s["agent_cpu"] is not None and s["agent_cpu"] >= 0 for s in samples)
    # The destination watched the resumed guest for its window (3 s by default).
    dest = rows(timeline["destination"])
    assert dest and any(s["t"] > marks["resume_s"] + 1 for s in dest)
    assert next(s for s in dest if s["t"] > marks["resume_s"] + 1)["vcpu_pace"] > 0.3
    health = report["health"]
    assert health["verdict"] == "healthy" and health["ok"] is True, health
    assert health["window_s"] == 3.0 and health["tolerance"] == HEALTH_TOLERANCE
    assert health["after"] >= (1 - HEALTH_TOLERANCE) * health["before"]
    assert health["before"] > 0.3 and health["before_throttled"] is False
    assert 2500 < report["health_wait_ms"] < (3.0 + HEALTH_MARGIN_S) * 1000
    # total_ms ends at the resume: the health wait is not in it.
    assert marks["resume_s"] <= total_s + 0.5

    home = agents.a.home
    plain = ferry(home, "report", report["job"]).stdout
    assert "guest pace after resume:" in plain and ": healthy" in plain
    picture = tmp_path / "timeline.png"
    drawn = ferry(home, "report", report["job"], "--png", str(picture))
    assert f"timeline:     {picture}" in drawn.stdout
    assert png_size(picture) == (1200, 800)
    # The history keeps it: the same report as the CLI printed.
    assert ferry_json(home, "report", report["job"])["timeline"] == json.loads(
        json.dumps(timeline))


def test_without_a_health_window_the_migration_completes_health_unknown(make_agents,
                                                                        start_guest) -> None:
    agents = make_agents(b_toml="health_window_s = 0\n")
    guest = small_guest(start_guest, "nh")
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path))
    assert rc == 0 and report["status"] == "completed", f"{report}\n{stderr}"
    health = report["health"]
    assert health["verdict"] == "unknown" and health["ok"] is None
    assert "health_window_s is 0" in health["reason"]
    assert report["health_wait_ms"] is None and report["timeline"]["destination"][
        "samples"] == []
    assert "guest pace after resume: unknown" in ferry(agents.a.home, "report",
                                                        report["job"]).stdout


def test_a_destination_lost_in_its_health_window_leaves_health_unknown(make_agents,
                                                                       start_guest) -> None:
    # A long window: the destination agent is killed while it watches the guest.
    agents = make_agents(b_toml="health_window_s = 20\n")
    guest = small_guest(start_guest, "hl")
    home = agents.a.home
    job_id = ferry_json(home, "migrate", "--qmp", str(guest.qmp_path), "--to", "hostb",
                        "--detach")["job"]
    # Completed (the guest runs at b) but still waiting for HEALTH: the job is listed.
    wait_for(lambda: (job_state(home, job_id) or {}).get("phase") == "completed",
             "the job to complete and wait for the health reply")
    agents.b.stop(signal.SIGKILL)
    wait_for(lambda: job_state(home, job_id) is None, "the job to end", timeout=30)
    report = call(home, {"op": "report", "id": job_id})["report"]
    assert report["status"] == "completed", report
    health = report["health"]
    assert health["verdict"] == "unknown" and "no health reply" in health["reason"], health
    assert report["health_wait_ms"] < 20_000   # the loss ended the wait, not the timeout
    assert report["downtime_ms"] is not None

"""The agent as operators run and watch it: real agents as subprocesses, the control
socket and the CLI (`--json`), real test guests where a job must run.

Nothing here sleeps for a state: each wait polls the agent until the state shows up,
with a deadline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import __version__
from agent.guest import GuestConfig, RunningGuest
from agent.guest.build import default_cache_dir
from agent.migration.convergence import MIN_BURST_BYTES
from agent.qemu.vm import TCG_RAM_PADDING
from agent.service.control import ControlClient
from tests.agents import AgentPair

MIB = 1 << 20
SLOW = "3M"       # --bandwidth that keeps a small guest's migration going for seconds
CRAWL = "256K"    # ... for a minute: until the test cancels it or lifts the cap


@pytest.fixture
def make_agents() -> Iterator[Callable[..., AgentPair]]:
    """Factory of a started agent pair; extra agent.toml lines for a and for b."""
    made: list[tuple[AgentPair, Path]] = []

    def make(a_toml: str = "", b_toml: str = "") -> AgentPair:
        root = Path(tempfile.mkdtemp(prefix="fy-"))
        pair = AgentPair.create(root, allow=(default_cache_dir(),))
        made.append((pair, root))
        for agent, extra in ((pair.a, a_toml), (pair.b, b_toml)):
            with open(agent.home / "agent.toml", "a") as f:
                f.write(extra)
        pair.start()
        return pair

    try:
        yield make
    finally:
        for pair, root in made:
            pair.cleanup()
            shutil.rmtree(root, ignore_errors=True)


def call(home: Path, request: dict[str, Any]) -> dict[str, Any]:
    with ControlClient(home / "control.sock") as client:
        return client.call(request)


def ferry(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "agent", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert done.returncode == 0, f"ferry {' '.join(args)}: {done.stderr}"
    return done


def ferry_json(home: Path, *args: str) -> Any:
    return json.loads(ferry(home, *args, "--json").stdout.strip().splitlines()[-1])


def wait_for(probe: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def job_state(home: Path, job_id: str) -> dict[str, Any] | None:
    for job in call(home, {"op": "jobs"})["jobs"]:
        if job["job"] == job_id:
            return job
    return None


def small_guest(start_guest: Callable[..., RunningGuest], name: str) -> RunningGuest:
    """64 MiB, 16 MiB of content, a small working set dirtied slowly: a few seconds at
    SLOW, and it converges."""
    guest = start_guest(config=GuestConfig(ws_pages=256, rate=200, fill_pages=4096),
                        ram_size=64 * MIB + TCG_RAM_PADDING, name=name)
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the first pass")
    return guest


def test_status_jobs_history_over_the_socket_and_the_cli(make_agents) -> None:
    agents = make_agents()
    home = agents.a.home
    status = call(home, {"op": "status"})
    assert status["version"] == __version__ and status["pid"] == agents.a.proc.pid
    assert status["listen"] == agents.a.address and status["uptime_s"] >= 0
    assert status["peers"] == [{"name": "hostb", "address": agents.b.address,
                                "reachable": True,
                                "connect_ms": status["peers"][0]["connect_ms"]}]
    assert status["limits"] == {"max_outbound": 2, "max_inbound": 2, "history_limit": 500,
                                "bandwidth": None}
    assert status["jobs"] == [] and status["vms"] == []
    # The CLI says the same, as JSON and as plain lines (stdout is a pipe here).
    assert ferry_json(home, "status")["peers"][0]["reachable"] is True
    plain = ferry(home, "status").stdout
    assert "hostb" in plain and agents.b.address in plain and "yes" in plain
    assert ferry_json(home, "jobs") == {"ok": True, "jobs": []}
    assert ferry(home, "jobs").stdout.strip() == "no jobs running or queued"
    assert ferry_json(home, "history")["jobs"] == []
    missing = ferry(home, "report", "0123456789ab", check=False)
    assert missing.returncode == 1 and "no report of job" in missing.stderr
    missing = ferry(home, "cancel", "0123456789ab", check=False)
    assert missing.returncode == 1 and "no job" in missing.stderr
    # A peer that does not answer is reported, not waited for.
    agents.b.stop()
    assert call(home, {"op": "status"})["peers"][0]["reachable"] is False


@pytest.mark.qemu
def test_reports_land_in_history_on_both_sides_and_survive_a_restart(make_agents,
                                                                     start_guest) -> None:
    agents = make_agents()
    guest = small_guest(start_guest, "hist")
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path))
    assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
    job_id = report["job"]
    history = ferry_json(agents.a.home, "history")
    assert history["total"] == 1 and history["jobs"][0]["job"] == job_id
    entry = history["jobs"][0]
    assert entry["status"] == "completed" and entry["direction"] == "outbound"
    assert entry["ended_at"] >= entry["started_at"]
    assert ferry_json(agents.a.home, "report", job_id[:6]) == entry   # a prefix will do
    assert "migration completed: hist -> hostb" in ferry(agents.a.home, "report",
                                                          job_id).stdout
    incoming = wait_for(lambda: call(agents.b.home, {"op": "history"})["jobs"],
                        "b's history")
    assert incoming[0]["job"] == job_id and incoming[0]["direction"] == "inbound"
    assert incoming[0]["status"] == "completed" and incoming[0]["peer"] == "hosta"
    plain = ferry(agents.a.home, "history").stdout.splitlines()
    assert plain[0].split()[:5] == ["JOB", "DIRECTION", "VM", "PEER", "STATUS"]
    assert plain[1].split()[:5] == [job_id, "outbound", "hist", "hostb", "completed"]

    agents.a.stop()
    agents.a.start()
    assert ferry_json(agents.a.home, "report", job_id) == entry
    assert ferry_json(agents.a.home, "job", job_id)["job"]["state"] == "completed"


@pytest.mark.qemu
def test_max_outbound_queues_the_second_job_until_the_first_ends(make_agents,
                                                                 start_guest) -> None:
    agents = make_agents(a_toml="max_outbound = 1\n")
    first_guest, second_guest = small_guest(start_guest, "q1"), small_guest(start_guest, "q2")
    home = agents.a.home
    # The first job crawls until the second is seen queued, then its cap is lifted.
    first = ferry_json(home, "migrate", "--qmp", str(first_guest.qmp_path), "--to", "hostb",
                       "--bandwidth", CRAWL, "--detach")
    assert first["ok"] and first["state"] == "running"
    second = ferry_json(home, "migrate", "--qmp", str(second_guest.qmp_path), "--to",
                        "hostb", "--detach")
    assert second["state"] == "queued" and second["position"] == 1
    jobs = ferry_json(home, "jobs")["jobs"]
    assert [(j["job"], j["state"]) for j in jobs] == [(first["job"], "running"),
                                                      (second["job"], "queued")]
    assert jobs[1]["position"] == 1 and jobs[1]["progress"]["event"] == "queued"
    plain = ferry(home, "jobs").stdout
    assert "queued" in plain and "position 1" in plain
    # Follow the queued one: it says it waits, runs once the first is done, then reports.
    follower = subprocess.Popen([sys.executable, "-m", "agent", "job", second["job"],
                                 "--follow", "--home", str(home)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        said = follower.stdout.readline()
        assert said.startswith("queued") and "position 1" in said, said
        ferry(home, "limit", first["job"], "--bandwidth", "none")
        out, err = follower.communicate(timeout=150)
    finally:
        follower.kill()
    assert follower.returncode == 0, f"{out}\n{err}\n{agents.logs()}"
    assert "migration completed: q2 -> hostb" in out
    history = {e["job"]: e for e in call(home, {"op": "history"})["jobs"]}
    assert history[first["job"]]["status"] == "completed"
    # The second began only after the first had ended.
    assert history[second["job"]]["ended_at"] > history[first["job"]]["ended_at"]
    assert ferry_json(home, "jobs")["jobs"] == []


@pytest.mark.qemu
def test_cancel_by_id_rolls_back_a_detached_job(make_agents, start_guest) -> None:
    agents = make_agents()
    guest = small_guest(start_guest, "cx")
    home = agents.a.home
    job_id = ferry_json(home, "migrate", "--qmp", str(guest.qmp_path), "--to", "hostb",
                        "--bandwidth", CRAWL, "--detach")["job"]
    # The CLI that asked is gone; the job runs on. Wait until it sends pages.
    wait_for(lambda: (job_state(home, job_id) or {}).get("progress", {}).get("pages_sent"),
             "the detached job to send pages")
    assert ferry_json(home, "job", job_id)["job"]["state"] == "running"
    reply = ferry_json(home, "cancel", job_id)
    assert reply["ok"] and reply["job"] == job_id
    done = ferry(home, "job", job_id, "--follow", "--json", check=False)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 1 and report["status"] == "cancelled", agents.logs()
    assert ferry_json(home, "report", job_id)["status"] == "cancelled"
    assert report["error_reason"] is None                # cancelled is not a failure
    before = guest.mailbox()
    after = guest.wait_until(lambda s: s.heartbeat > before.heartbeat + 20, timeout=10,
                             what="the source guest to run on")
    assert after.errors == 0
    wait_for(lambda: agents.b.leftovers() == [], "the destination to remove its copy")
    incoming = wait_for(lambda: call(agents.b.home, {"op": "history"})["jobs"],
                        "b's report of the job")
    assert incoming[0]["status"] == "failed" and incoming[0]["error_reason"] == "aborted"


@pytest.mark.qemu
def test_inbound_over_max_inbound_is_refused_busy(make_agents, start_guest) -> None:
    agents = make_agents(b_toml="max_inbound = 1\n")
    first_guest, second_guest = small_guest(start_guest, "b1"), small_guest(start_guest, "b2")
    home = agents.a.home
    first = ferry_json(home, "migrate", "--qmp", str(first_guest.qmp_path), "--to", "hostb",
                       "--bandwidth", CRAWL, "--detach")["job"]
    incoming = wait_for(lambda: call(agents.b.home, {"op": "jobs"})["jobs"],
                        "b to show the incoming job")
    assert incoming[0]["job"] == first and incoming[0]["direction"] == "inbound"
    # The incoming job shows live progress on its agent too.
    def arriving() -> dict[str, Any] | None:
        jobs = call(agents.b.home, {"op": "jobs"})["jobs"]
        progress = jobs[0].get("progress") if jobs else None
        return progress if progress and progress.get("wire_bytes") else None

    progress = wait_for(arriving, "b's progress")
    assert progress["phase"] == "receiving" and progress["step"] == "transfer"
    assert progress["elapsed_s"] > 0 and progress["throughput_bps"] > 0
    assert "receiving" in ferry(agents.b.home, "jobs").stdout
    rc, report, stderr = agents.migrate("--qmp", str(second_guest.qmp_path))
    assert rc == 1 and report["status"] == "failed", f"{report}\n{stderr}"
    assert "busy: 1 incoming migrations running (max_inbound)" in report["error"]
    assert report["error_reason"] == "destination"     # the metrics' reason label
    assert second_guest.process.returncode is None
    call(home, {"op": "cancel", "id": first})
    wait_for(lambda: not call(home, {"op": "jobs"})["jobs"], "the first job to end")


RATE_WINDOW_S = 2.5


def capped_at(rate: float, cap: int) -> bool:
    """Whether a rate measured over RATE_WINDOW_S is that of a link capped at `cap`: at
    least half of it, at most the cap plus the 1 MiB burst a token bucket may let through
    in the window, and 10% for the progress events' granularity."""
    return cap / 2 < rate < (cap + MIN_BURST_BYTES / RATE_WINDOW_S) * 1.1


def wire_rate(home: Path, job_id: str, seconds: float = RATE_WINDOW_S,
              settle: float = 1.0) -> float:
    """The job's wire rate in bytes/s over `seconds`, from two of its progress events,
    `settle` seconds from now (a new cap begins with a burst of up to 1 MiB)."""
    def progress() -> tuple[float, int]:
        state = job_state(home, job_id)
        assert state is not None, f"job {job_id} ended before its rate was measured"
        event = state.get("progress") or {}
        return float(event.get("elapsed_s", 0)), int(event.get("wire_bytes", 0))

    now = wait_for(lambda: (lambda p: p if p[1] else None)(progress()), "wire bytes")
    first = wait_for(lambda: (lambda p: p if p[0] >= now[0] + settle else None)(progress()),
                     f"{settle} s of the job")
    last = wait_for(lambda: (lambda p: p if p[0] >= first[0] + seconds else None)(progress()),
                    f"{seconds} s more of the job")
    return (last[1] - first[1]) / (last[0] - first[0])


@pytest.mark.qemu
def test_bandwidth_caps_of_the_agent_and_the_job_change_while_it_runs(make_agents,
                                                                      start_guest) -> None:
    agents = make_agents(a_toml='bandwidth = "2M"\n')
    home = agents.a.home
    # 96 MiB of content (72 MiB not zero) sent uncompressed: at these caps the job outlives
    # the measurements and the CLI calls between them, even on a loaded machine.
    guest = start_guest(config=GuestConfig(ws_pages=256, rate=200, fill_pages=24576),
                        ram_size=128 * MIB + TCG_RAM_PADDING, name="bw")
    guest.wait_until(lambda s: s.passes >= 1, timeout=60, what="the first pass")
    assert call(home, {"op": "status"})["limits"]["bandwidth"] == 2 * MIB
    job_id = ferry_json(home, "migrate", "--qmp", str(guest.qmp_path), "--to", "hostb",
                        "--compress", "off", "--detach")["job"]
    assert capped_at(wire_rate(home, job_id), 2 * MIB), "the agent's cap from agent.toml"
    assert "4.0 MiB/s, for every outbound job" in ferry(home, "limit", "--bandwidth",
                                                       "4M").stdout
    assert capped_at(wire_rate(home, job_id), 4 * MIB), "the agent's cap, raised live"
    assert ferry_json(home, "limit", job_id[:6], "--bandwidth", "1M") == {
        "ok": True, "job": job_id, "bandwidth": MIB, "agent_bandwidth": 4 * MIB}
    assert capped_at(wire_rate(home, job_id), MIB), "the job's cap, under the agent's"
    assert (job_state(home, job_id) or {})["progress"]["bandwidth_cap_bps"] == MIB
    bad = ferry(home, "limit", "--bandwidth", "fast", check=False)
    assert bad.returncode == 1 and "bad rate 'fast'" in bad.stderr
    ferry(home, "limit", job_id, "--bandwidth", "none")
    ferry(home, "limit", "--bandwidth", "none")
    done = ferry(home, "job", job_id, "--follow", "--json", check=False)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and report["status"] == "completed", agents.logs()
    assert call(home, {"op": "status"})["limits"]["bandwidth"] is None
    gone = ferry(home, "limit", job_id, "--bandwidth", "1M", check=False)
    assert gone.returncode == 1 and "no outbound job" in gone.stderr

"""The Prometheus endpoint of real agents (subprocesses, real sockets): scraped over HTTP
while a live migration of the test guest runs and after it, parsed with
prometheus-client's parser, its counters matching the job's report; off by default; a bad
address refused at start.

Nothing here sleeps for a state: each wait polls until the state shows up."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from agent.guest import RunningGuest
from agent.localpair import free_port
from tests.agents import AgentPair
from tests.test_ops_e2e import SLOW, call, ferry, make_agents, small_guest, wait_for

__all__ = ["make_agents"]    # the fixture, shared with test_ops_e2e

METRICS_ON = 'metrics_listen = "127.0.0.1:0"\n'

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_address(home: Path) -> str:
    address = call(home, {"op": "status"})["metrics"]
    assert isinstance(address, str), address
    return address


def scrape(address: str) -> Samples:
    """GET http://ADDRESS/metrics, parsed as Prometheus would."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def job_series(samples: Samples, job_id: str) -> dict[str, dict[str, str]]:
    """The per-job series of one job: name -> its labels."""
    return {name: dict(labels) for name, labels in samples if dict(labels).get("job") == job_id}


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process `pid` listens on (its sockets in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:     # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.qemu
def test_metrics_follow_a_live_migration_and_match_its_report(
        make_agents: Callable[..., AgentPair],
        start_guest: Callable[..., RunningGuest]) -> None:
    agents = make_agents(a_toml=METRICS_ON, b_toml=METRICS_ON)
    source, dest = metrics_address(agents.a.home), metrics_address(agents.b.home)
    assert source.startswith("127.0.0.1:") and not source.endswith(":0")
    before = scrape(source)
    assert value(before, "ferry_migrations_total", direction="outbound",
                 outcome="completed") == 0
    assert value(before, "ferry_migration_downtime_seconds_count") == 0

    guest = small_guest(start_guest, "mx")
    home = agents.a.home
    job_id = ferry(home, "migrate", "--qmp", str(guest.qmp_path), "--to", "hostb",
                   "--bandwidth", SLOW, "--detach", "--json").stdout.strip().splitlines()[-1]
    job_id = json.loads(job_id)["job"]
    # While it runs: its own series on both agents, labelled as `jobs` shows the job.
    def progressing() -> Samples | None:
        samples = scrape(source)
        found = job_series(samples, job_id)
        return samples if "ferry_migration_remaining_bytes" in found else None

    running = wait_for(progressing, "the job's remaining bytes on the source's endpoint")
    row = call(home, {"op": "jobs"})["jobs"][0]
    labels = {"job": job_id, "vm": row["vm"], "peer": "hostb", "direction": "outbound"}
    series = job_series(running, job_id)
    assert {"ferry_migration_remaining_bytes", "ferry_migration_iteration",
            "ferry_migration_throughput_bytes_per_second", "ferry_migration_phase",
            "ferry_migration_start_time_seconds"} <= set(series)
    assert series["ferry_migration_remaining_bytes"] == labels
    phase = series["ferry_migration_phase"].pop("phase")
    assert series["ferry_migration_phase"] == labels
    assert phase in ("precopy", "throttling", "stop-and-copy", "committing")
    assert value(running, "ferry_migrations_running", direction="outbound", phase=phase) == 1
    assert value(running, "ferry_migrations_queued") == 0
    incoming = wait_for(lambda: job_series(scrape(dest), job_id), "the job on b's endpoint")
    assert incoming["ferry_migration_phase"] == {"job": job_id, "vm": "mx", "peer": "hosta",
                                                 "direction": "inbound", "phase": "receiving"}

    done = ferry(home, "job", job_id, "--follow", "--json", check=False)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and report["status"] == "completed", agents.logs()
    after = scrape(source)
    assert job_series(after, job_id) == {}            # its gauges went with it
    for kind, field in (("data", "data_pages"), ("zero", "zero_pages"),
                        ("unchanged", "unchanged_pages"), ("dedup", "dedup_pages")):
        assert value(after, "ferry_migration_memory_bytes_total", direction="outbound",
                     kind=kind) == report[field] * 4096, kind
    # Every page QEMU sent is counted once, by its kind (zero pages of the sparse
    # destination file go as unchanged).
    assert sum(value(after, "ferry_migration_memory_bytes_total", direction="outbound",
                     kind=kind) or 0 for kind in ("data", "zero", "unchanged", "dedup")) \
        == report["pages_sent"] * 4096
    assert report["data_pages"] > 0 and report["unchanged_pages"] > 0
    assert value(after, "ferry_migration_wire_bytes_total",
                 direction="outbound") == report["wire_bytes"] > 0
    assert value(after, "ferry_migration_memory_wire_bytes_total",
                 direction="outbound") == report["ram_wire_bytes"] > 0
    assert value(after, "ferry_migration_disk_wire_bytes_total",
                 direction="outbound") == report["disk_bytes"]
    assert value(after, "ferry_migrations_total", direction="outbound",
                 outcome="completed") == 1
    assert sum(v for (name, _), v in after.items()
               if name == "ferry_migrations_total") == 1
    assert sum(v for (name, _), v in after.items()
               if name == "ferry_migration_failures_total") == 0
    assert value(after, "ferry_migration_downtime_seconds_count") == 1
    assert value(after, "ferry_migration_downtime_seconds_sum") == report["downtime_ms"] / 1000
    assert report["downtime_ms"] > 0
    # The destination counts its side once its job record ends too.
    wait_for(lambda: value(scrape(dest), "ferry_migrations_total", direction="inbound",
                           outcome="completed") == 1, "b to count the incoming job")
    assert job_series(scrape(dest), job_id) == {}


def test_the_endpoint_is_off_by_default_and_only_opens_when_asked(make_agents) -> None:
    agents = make_agents(a_toml=METRICS_ON)
    address = metrics_address(agents.a.home)
    port = int(address.rsplit(":", 1)[1])
    assert agents.a.proc is not None and agents.b.proc is not None
    assert listening_ports(agents.a.proc.pid) == {agents.a.port, port}
    assert listening_ports(agents.b.proc.pid) == {agents.b.port}
    assert call(agents.b.home, {"op": "status"})["metrics"] is None
    assert f"metrics  http://{address}/metrics" in ferry(agents.a.home, "status").stdout
    assert "metrics  off" in ferry(agents.b.home, "status").stdout
    assert value(scrape(address), "ferry_migrations_queued") == 0
    for path, code in (("/", 404), ("/metrics/x", 404)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{address}{path}", timeout=10)
        assert refused.value.code == code
        refused.value.close()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"http://{address}/metrics",
                                                      data=b"x", method="POST"), timeout=10)
    assert refused.value.code == 405 and refused.value.headers["Allow"] == "GET"
    refused.value.close()
    # The agent's log says where it serves.
    assert f"metrics http://{address}/metrics" in agents.a.log()


def start_refused(home: Path, *args: str) -> str:
    """Start `ferry agent` in home, expecting a refusal: its stderr."""
    done = ferry(home, "agent", "--listen", f"127.0.0.1:{free_port()}", *args, check=False)
    assert done.returncode == 1, f"the agent started: {done.stdout}{done.stderr}"
    assert not (home / "control.sock").exists()
    return done.stderr


def test_a_bad_metrics_address_is_refused_at_start_with_its_name() -> None:
    with tempfile.TemporaryDirectory(prefix="fy-") as root:
        home = Path(root) / "home"
        home.mkdir()
        toml = home / "agent.toml"
        toml.write_text('metrics_listen = "9100"\n')
        assert f"{toml}: metrics_listen must be HOST:PORT" in start_refused(home)
        toml.write_text('metrics_listen = "127.0.0.1:70000"\n')
        assert "metrics_listen must have a port within 0..65535" in start_refused(home)
        toml.unlink()
        assert "--metrics: address must be HOST:PORT" in start_refused(home, "--metrics",
                                                                         "localhost")
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            toml.write_text(f'metrics_listen = "127.0.0.1:{port}"\n')
            assert (f"metrics_listen 127.0.0.1:{port}: cannot listen: Address already in use"
                    in start_refused(home))
            # The flag wins over agent.toml: a good address there, the taken one given.
            toml.write_text(METRICS_ON)
            assert (f"metrics_listen 127.0.0.1:{port}: cannot listen"
                    in start_refused(home, "--metrics", f"127.0.0.1:{port}"))

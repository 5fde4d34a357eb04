"""The Prometheus figures without agents: counters from synthetic reports, per-job gauges
from synthetic job records, the failure reasons' closed set, and the HTTP handler on a
real loopback socket."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.errors import (
    FAILURE_REASONS,
    LocalError,
    PeerError,
    TrustError,
    UserError,
    VmNotMigratableError,
    failure_reason,
)
from agent.migration.link import RemoteFailure
from agent.migration.source import ConvergenceTimeout
from agent.service.jobs import JobRecord
from agent.service.metrics import DOWNTIME_BUCKETS, AgentMetrics, MetricsServer
from agent.state.config import load_config

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: AgentMetrics) -> Samples:
    """Every sample of the exposition, by name and labels, as Prometheus would read it."""
    text = metrics.exposition().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def outbound(job_id: str = "a1b2c3d4e5f6", **fields: Any) -> JobRecord:
    return JobRecord(job_id=job_id, direction="outbound", vm="web", peer="hostb", **fields)


def completed_report(**changes: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "event": "result", "status": "completed", "phase": "completed", "error": None,
        "error_reason": None, "job": "a1b2c3d4e5f6", "downtime_ms": 12.3,
        "zero_pages": 1000, "dedup_pages": 7, "data_pages": 300, "unchanged_pages": 50,
        "wire_bytes": 1_500_000, "ram_wire_bytes": 1_200_000, "disk_bytes": 250_000,
        "disks": [{"path": "/a.qcow2", "data_blocks": 3, "zero_blocks": 10, "dedup_blocks": 1},
                  {"path": "/b.raw", "data_blocks": 2, "zero_blocks": 0, "dedup_blocks": 0}]}
    report.update(changes)
    return report


def test_a_completed_job_counts_bytes_by_kind_wire_bytes_and_its_downtime() -> None:
    metrics = AgentMetrics(lambda: [])
    before = scrape(metrics)
    # Every counter series is there before the first job, at 0.
    assert value(before, "ferry_migration_memory_bytes_total", direction="outbound",
                 kind="zero") == 0
    assert value(before, "ferry_migrations_total", direction="inbound",
                 outcome="failed") == 0
    assert value(before, "ferry_agent_info", version=__version__) == 1
    metrics.job_finished(outbound(), completed_report())
    after = scrape(metrics)
    for kind, pages in (("data", 300), ("zero", 1000), ("unchanged", 50), ("dedup", 7)):
        assert value(after, "ferry_migration_memory_bytes_total", direction="outbound",
                     kind=kind) == pages * 4096
    for kind, blocks in (("data", 5), ("zero", 10), ("dedup", 1)):
        assert value(after, "ferry_migration_disk_bytes_total", direction="outbound",
                     kind=kind) == blocks * 65536
    assert value(after, "ferry_migration_wire_bytes_total", direction="outbound") == 1_500_000
    assert value(after, "ferry_migration_memory_wire_bytes_total",
                 direction="outbound") == 1_200_000
    assert value(after, "ferry_migration_disk_wire_bytes_total",
                 direction="outbound") == 250_000
    assert value(after, "ferry_migrations_total", direction="outbound",
                 outcome="completed") == 1
    assert value(after, "ferry_migration_downtime_seconds_count") == 1
    assert value(after, "ferry_migration_downtime_seconds_sum") == pytest.approx(0.0123)
    # 12.3 ms: above the 10 ms bucket, inside the 25 ms one.
    assert value(after, "ferry_migration_downtime_seconds_bucket", le="0.01") == 0
    assert value(after, "ferry_migration_downtime_seconds_bucket", le="0.025") == 1
    assert DOWNTIME_BUCKETS[0] == 0.001 and DOWNTIME_BUCKETS[-1] == 10.0
    assert all(v == 0 for (name, labels), v in after.items()
               if name == "ferry_migration_failures_total")


def test_failures_count_by_a_closed_set_of_reasons_and_only_failed_jobs() -> None:
    metrics = AgentMetrics(lambda: [])
    failed = completed_report(status="failed", phase="failed", error="QEMU refused migrate",
                              error_reason="qemu", downtime_ms=None)
    metrics.job_finished(outbound(), failed)
    # A reason that is not in the set (a raw error, a newer peer's) is "other", never a label.
    metrics.job_finished(outbound(), dict(failed, error_reason="link to hostb lost: reset"))
    metrics.job_finished(outbound(), {"status": "cancelled", "error_reason": None})
    metrics.job_finished(outbound(), {"status": "unknown", "error_reason": "peer"})
    samples = scrape(metrics)
    assert value(samples, "ferry_migration_failures_total", direction="outbound",
                 reason="qemu") == 1
    assert value(samples, "ferry_migration_failures_total", direction="outbound",
                 reason="other") == 1
    assert sum(v for (name, _), v in samples.items()
               if name == "ferry_migration_failures_total") == 2
    reasons = {dict(labels)["reason"] for name, labels in samples
               if name == "ferry_migration_failures_total"}
    assert reasons == set(FAILURE_REASONS)
    for outcome, count in (("failed", 2), ("cancelled", 1), ("unknown", 1), ("completed", 0)):
        assert value(samples, "ferry_migrations_total", direction="outbound",
                     outcome=outcome) == count
    # No downtime was measured for any of them.
    assert value(samples, "ferry_migration_downtime_seconds_count") == 0
    # The failed reports' pages still count: they went over the wire.
    assert value(samples, "ferry_migration_memory_bytes_total", direction="outbound",
                 kind="data") == 2 * 300 * 4096


def test_an_inbound_job_counts_its_outcome_and_reason_but_no_bytes() -> None:
    metrics = AgentMetrics(lambda: [])
    record = JobRecord(job_id="a1b2c3d4e5f6", direction="inbound", vm="web", peer="hosta")
    metrics.job_finished(record, {"status": "failed", "phase": "removed",
                                  "pages_applied": 99, "error_reason": "aborted"})
    metrics.job_finished(record, {"status": "completed", "phase": "completed",
                                  "pages_applied": 99, "error_reason": None})
    samples = scrape(metrics)
    assert value(samples, "ferry_migrations_total", direction="inbound", outcome="failed") == 1
    assert value(samples, "ferry_migrations_total", direction="inbound",
                 outcome="completed") == 1
    assert value(samples, "ferry_migration_failures_total", direction="inbound",
                 reason="aborted") == 1
    assert not any(dict(labels).get("direction") == "inbound" for name, labels in samples
                   if "bytes" in name)


def test_job_gauges_are_read_from_the_records_and_go_with_the_job() -> None:
    records: dict[str, JobRecord] = {}
    metrics = AgentMetrics(lambda: records.values())
    running = outbound(state="running", phase="running", started_at=1_700_000_000.5)
    running.publish({"event": "progress", "phase": "precopy", "round": 3,
                     "remaining_bytes": 8_000_000, "dirty_pages_per_s": 250,
                     "throughput_bps": 40_000_000, "wire_bytes": 90_000_000})
    queued = outbound("0123456789ab", state="queued", phase="queued", position=1)
    queued.publish({"event": "queued", "phase": "queued", "position": 1})
    inbound = JobRecord(job_id="ffeeddccbbaa", direction="inbound", vm=None, peer="hosta",
                        state="running", phase="receiving")
    records.update({r.job_id: r for r in (running, queued, inbound)})
    samples = scrape(metrics)
    job = {"job": "a1b2c3d4e5f6", "vm": "web", "peer": "hostb", "direction": "outbound"}
    assert value(samples, "ferry_migration_remaining_bytes", **job) == 8_000_000
    assert value(samples, "ferry_migration_dirty_memory_rate_bytes_per_second",
                 **job) == 250 * 4096
    assert value(samples, "ferry_migration_throughput_bytes_per_second", **job) == 40_000_000
    assert value(samples, "ferry_migration_processed_bytes", **job) == 90_000_000
    assert value(samples, "ferry_migration_iteration", **job) == 3
    assert value(samples, "ferry_migration_phase", phase="precopy", **job) == 1
    assert value(samples, "ferry_migration_start_time_seconds", **job) == 1_700_000_000.5
    # One phase series per job; the queued job shows only its phase and start.
    assert [labels for name, labels in samples if name == "ferry_migration_phase"
            and dict(labels)["job"] == "a1b2c3d4e5f6"] == [frozenset({**job,
                                                                      "phase": "precopy"}.items())]
    waiting = {**job, "job": "0123456789ab"}
    assert value(samples, "ferry_migration_phase", phase="queued", **waiting) == 1
    assert value(samples, "ferry_migration_remaining_bytes", **waiting) is None
    incoming = {"job": "ffeeddccbbaa", "vm": "", "peer": "hosta", "direction": "inbound"}
    assert value(samples, "ferry_migration_phase", phase="receiving", **incoming) == 1
    assert value(samples, "ferry_migrations_queued") == 1
    assert value(samples, "ferry_migrations_running", direction="outbound",
                 phase="precopy") == 1
    assert value(samples, "ferry_migrations_running", direction="inbound",
                 phase="receiving") == 1
    # A phase the records should never show is "other", not a new label value.
    running.phase = "something new"
    assert value(scrape(metrics), "ferry_migration_phase", phase="other", **job) == 1

    records.clear()
    gone = scrape(metrics)
    per_job = {name for name, labels in gone if "job" in dict(labels)}
    assert per_job == set() and "ferry_migration_remaining_bytes" not in names(gone)
    assert value(gone, "ferry_migrations_queued") == 0
    assert "ferry_migrations_running" not in names(gone)


def test_two_agents_in_one_process_have_registries_of_their_own() -> None:
    first, second = AgentMetrics(lambda: []), AgentMetrics(lambda: [])
    first.job_finished(outbound(), completed_report())
    assert value(scrape(first), "ferry_migrations_total", direction="outbound",
                 outcome="completed") == 1
    assert value(scrape(second), "ferry_migrations_total", direction="outbound",
                 outcome="completed") == 0


@pytest.mark.parametrize(("error", "reason"), [
    (ConvergenceTimeout("did not converge"), "timeout"),
    (RemoteFailure("busy: 1 incoming migrations running (max_inbound)"), "destination"),
    (VmNotMigratableError("TCG"), "not_migratable"),
    (UserError("bad"), "user"),
    (TrustError("untrusted"), "trust"),
    (PeerError("link lost"), "peer"),
    (LocalError("disk full"), "local"),
    (ValueError("a bug"), "other"),
])
def test_failure_reason_of_each_error_family(error: BaseException, reason: str) -> None:
    assert failure_reason(error) == reason and reason in FAILURE_REASONS


def test_metrics_listen_in_agent_toml_allows_port_0_and_names_itself_when_bad(
        tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text('metrics_listen = "127.0.0.1:0"\n')
    assert load_config(tmp_path).metrics_listen == ("127.0.0.1", 0)
    assert load_config(tmp_path / "none").metrics_listen is None   # off by default
    (tmp_path / "agent.toml").write_text('metrics_listen = "9100"\n')
    with pytest.raises(UserError,
                       match=r"agent.toml: metrics_listen must be HOST:PORT or \[IPv6\]:PORT"):
        load_config(tmp_path)


async def request(port: int, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send raw bytes to the server; its status line, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert int(headers["Content-Length"]) == len(body)
    return status, headers, body


def test_the_http_handler_serves_get_metrics_and_refuses_the_rest() -> None:
    async def scenario() -> None:
        metrics = AgentMetrics(lambda: [])
        server = MetricsServer(metrics)
        await server.start("127.0.0.1", 0)
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        try:
            status, headers, body = await request(
                int(port), b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
            assert status == "HTTP/1.1 200 OK"
            assert headers["Content-Type"] == CONTENT_TYPE_LATEST
            assert body == metrics.exposition()
            families = {f.name for f in text_string_to_metric_families(body.decode())}
            assert {"ferry_agent_info", "ferry_migrations", "ferry_migrations_queued"} <= families
            status, _, _ = await request(int(port), b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            assert status == "HTTP/1.1 200 OK"
            status, _, _ = await request(int(port), b"GET / HTTP/1.1\r\n\r\n")
            assert status == "HTTP/1.1 404 Not Found"
            status, headers, _ = await request(int(port), b"POST /metrics HTTP/1.1\r\n"
                                               b"Content-Length: 0\r\n\r\n")
            assert status == "HTTP/1.1 405 Method Not Allowed" and headers["Allow"] == "GET"
            status, _, _ = await request(int(port), b"hello\r\n\r\n")
            assert status == "HTTP/1.1 400 Bad Request"
            huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
            status, _, _ = await request(int(port), huge)
            assert status == "HTTP/1.1 431 Request Header Fields Too Large"
        finally:
            await server.close()
        with pytest.raises(OSError):   # closed: nobody listens there any more
            await asyncio.open_connection("127.0.0.1", int(port))
    asyncio.run(scenario())


def test_a_metrics_address_that_cannot_be_bound_is_refused_with_its_name() -> None:
    async def scenario() -> None:
        taken = socket.create_server(("127.0.0.1", 0))
        try:
            port = taken.getsockname()[1]
            with pytest.raises(UserError, match=rf"metrics_listen 127.0.0.1:{port}: cannot "
                                                r"listen: Address already in use"):
                await MetricsServer(AgentMetrics(lambda: [])).start("127.0.0.1", port)
        finally:
            taken.close()
    asyncio.run(scenario())

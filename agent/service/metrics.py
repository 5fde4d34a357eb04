"""The agent's Prometheus endpoint: its figures in a registry of its own, served as
`GET /metrics` by a small HTTP handler on the agent's own event loop.

Two kinds of figures. Counters and the downtime histogram move once per job, when it ends
(`AgentMetrics.job_finished`, from the job's report). Per-job gauges, jobs by phase and the
queue are read from the agent's job records at scrape time (`JobCollector`), so a job's
series are there while it is and gone once it ended. Every metric: docs/metrics.md.

Sizes "by kind" are bytes of guest memory or disk the pages or blocks of that kind stood
for (pages x 4096, disk blocks x 64 KiB), whatever they cost on the wire: a zero page
counts 4096 bytes although it took a few bytes to send. What went on the wire has its own
counters (`..._wire_bytes_total`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.errors import FAILURE_REASONS, UserError
from agent.migration.states import Phase
from agent.qemu.vmspec import PAGE_SIZE
from agent.service.jobs import JobRecord
from agent.storage.disk_source import DISK_BLOCK

log = logging.getLogger(__name__)

DIRECTIONS = ("outbound", "inbound")
OUTCOMES = ("completed", "failed", "cancelled", "unknown")   # a report's `status`
# Report fields counted by kind, and what one of each stands for in bytes.
MEMORY_KINDS = {"data": "data_pages", "zero": "zero_pages", "unchanged": "unchanged_pages",
                "dedup": "dedup_pages"}
DISK_KINDS = {"data": "data_blocks", "zero": "zero_blocks", "dedup": "dedup_blocks"}
# From a pause of a millisecond to one of ten seconds (a forced switchover).
DOWNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0)
# The phases a queued or running job shows: the records' own (queued, running before the
# first progress event, receiving for an incoming job) and the migration's; anything else
# is "other", so the label stays a closed set.
JOB_PHASES = ("queued", "running", "receiving", *(p.value for p in Phase))
JOB_LABELS = ("job", "vm", "peer", "direction")

MAX_REQUEST = 8 << 10        # request line and headers; more is refused (431)
REQUEST_TIMEOUT_S = 10.0     # a client that sends no full request by then is dropped

Records = Callable[[], Iterable[JobRecord]]


class AgentMetrics:
    """One agent's figures, in its own CollectorRegistry (not the process-wide one: tests
    and several agents in one process each have their own)."""

    def __init__(self, records: Records) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Info("ferry_agent", "The ferry agent serving these metrics", registry=r).info(
            {"version": __version__})
        self.memory_bytes = Counter(
            "ferry_migration_memory_bytes", "Guest memory of finished jobs by how its pages "
            "went: kind=data|zero|unchanged|dedup, pages x 4096 bytes",
            ["direction", "kind"], registry=r)
        self.memory_wire_bytes = Counter(
            "ferry_migration_memory_wire_bytes", "Bytes of page batches sent on the wire "
            "(after dedup and compression)", ["direction"], registry=r)
        self.disk_bytes = Counter(
            "ferry_migration_disk_bytes", "Disk contents of finished jobs by how its blocks "
            "went: kind=data|zero|dedup, blocks x 65536 bytes", ["direction", "kind"],
            registry=r)
        self.disk_wire_bytes = Counter(
            "ferry_migration_disk_wire_bytes", "Bytes of disk batches sent on the wire",
            ["direction"], registry=r)
        self.wire_bytes = Counter(
            "ferry_migration_wire_bytes", "All bytes a finished job sent to its peer: page "
            "and disk batches and QEMU's forwarded stream", ["direction"], registry=r)
        self.downtime = Histogram(
            "ferry_migration_downtime_seconds", "Guest downtime of completed migrations, "
            "source STOP to destination RESUME", buckets=DOWNTIME_BUCKETS, registry=r)
        self.migrations = Counter(
            "ferry_migrations", "Finished jobs by outcome (the report's status)",
            ["direction", "outcome"], registry=r)
        self.failures = Counter(
            "ferry_migration_failures", "Failed jobs by reason (the report's error_reason)",
            ["direction", "reason"], registry=r)
        # Every series there from the start, at 0: rate() and increase() see the first job.
        for kind in MEMORY_KINDS:
            self.memory_bytes.labels("outbound", kind)
        for kind in DISK_KINDS:
            self.disk_bytes.labels("outbound", kind)
        for counter in (self.memory_wire_bytes, self.disk_wire_bytes, self.wire_bytes):
            counter.labels("outbound")
        for direction in DIRECTIONS:
            for outcome in OUTCOMES:
                self.migrations.labels(direction, outcome)
            for reason in FAILURE_REASONS:
                self.failures.labels(direction, reason)
        r.register(JobCollector(records))

    def job_finished(self, record: JobRecord, report: dict[str, Any]) -> None:
        """Count a job that ended, once, from its report (a short one for an inbound or a
        queued job: what it lacks counts nothing)."""
        direction = record.direction if record.direction in DIRECTIONS else "outbound"
        status = str(report.get("status"))
        outcome = status if status in OUTCOMES else "failed"
        self.migrations.labels(direction, outcome).inc()
        if outcome == "failed":
            reason = report.get("error_reason")
            self.failures.labels(direction,
                                 reason if reason in FAILURE_REASONS else "other").inc()
        for kind, field in MEMORY_KINDS.items():
            pages = _count(report.get(field))
            if pages:
                self.memory_bytes.labels(direction, kind).inc(pages * PAGE_SIZE)
        for disk in report.get("disks") or ():
            if isinstance(disk, dict):
                for kind, field in DISK_KINDS.items():
                    blocks = _count(disk.get(field))
                    if blocks:
                        self.disk_bytes.labels(direction, kind).inc(blocks * DISK_BLOCK)
        for counter, field in ((self.memory_wire_bytes, "ram_wire_bytes"),
                               (self.disk_wire_bytes, "disk_bytes"),
                               (self.wire_bytes, "wire_bytes")):
            counted = _count(report.get(field))
            if counted:
                counter.labels(direction).inc(counted)
        downtime_ms = report.get("downtime_ms")
        if outcome == "completed" and isinstance(downtime_ms, int | float) \
                and not isinstance(downtime_ms, bool) and downtime_ms >= 0:
            self.downtime.observe(downtime_ms / 1000)

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)


def _count(value: object) -> int:
    """A report's count, or 0 for anything that is not a non-negative whole number."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class JobCollector(Collector):
    """Figures of the jobs queued and running now, read from the agent's records at each
    scrape: a job's series end with the job."""

    def __init__(self, records: Records) -> None:
        self.records = records

    def collect(self) -> Iterator[Metric]:
        records = list(self.records())
        remaining = _job_gauge("ferry_migration_remaining_bytes",
                               "Guest memory still to send, as QEMU counts it")
        dirty = _job_gauge("ferry_migration_dirty_memory_rate_bytes_per_second",
                           "How fast the guest dirties memory (QEMU's dirty-pages-rate x "
                           "4096)")
        throughput = _job_gauge("ferry_migration_throughput_bytes_per_second",
                                "Bytes sent to the peer per second since the job began")
        processed = _job_gauge("ferry_migration_processed_bytes",
                               "Bytes sent to the peer so far")
        iteration = _job_gauge("ferry_migration_iteration",
                               "QEMU's dirty-log iterations so far")
        started = _job_gauge("ferry_migration_start_time_seconds",
                             "When the job was requested (Unix time)")
        phase = GaugeMetricFamily("ferry_migration_phase", "1 for the phase the job is in",
                                  labels=[*JOB_LABELS, "phase"])
        by_phase: dict[tuple[str, str], int] = {}
        queued = 0
        for record in records:
            labels = [record.job_id, record.vm or "", record.peer, record.direction]
            current = record.phase if record.phase in JOB_PHASES else "other"
            phase.add_metric([*labels, current], 1)
            started.add_metric(labels, record.started_at)
            if record.state == "queued":
                queued += 1
                continue
            key = (record.direction, current)
            by_phase[key] = by_phase.get(key, 0) + 1
            event = record.latest if record.latest and \
                record.latest.get("event") == "progress" else {}
            for family, field, scale in ((remaining, "remaining_bytes", 1),
                                         (dirty, "dirty_pages_per_s", PAGE_SIZE),
                                         (throughput, "throughput_bps", 1),
                                         (processed, "wire_bytes", 1),
                                         (iteration, "round", 1)):
                value = event.get(field)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    family.add_metric(labels, value * scale)
        running = GaugeMetricFamily("ferry_migrations_running",
                                    "Jobs running now by direction and phase",
                                    labels=["direction", "phase"])
        for direction, current in sorted(by_phase):
            running.add_metric([direction, current], by_phase[direction, current])
        yield from (remaining, dirty, throughput, processed, iteration, started, phase,
                    running)
        yield GaugeMetricFamily("ferry_migrations_queued",
                                "Outbound jobs waiting for a place (max_outbound)",
                                value=queued)


def _job_gauge(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(JOB_LABELS))


def format_address(host: str, port: int) -> str:
    """HOST:PORT, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsServer:
    """HTTP/1.x on host:port answering `GET /metrics` with the registry, 404 for other
    paths, 405 for other methods; one request per connection. On the agent's own loop
    (not prometheus-client's threaded server): a scrape reads the job records between two
    steps of the jobs, never while one of them changes."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, host, port,
                                                      limit=MAX_REQUEST, reuse_address=True)
        except OSError as exc:   # asyncio's own text repeats the address: the errno's
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise UserError(f"metrics_listen {format_address(host, port)}: cannot listen: "
                            f"{why}") from exc
        log.info("metrics on http://%s/metrics", self.address)

    @property
    def address(self) -> str:
        """The address bound (its real port when port 0 was asked for)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return format_address(host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                              REQUEST_TIMEOUT_S)
            except asyncio.LimitOverrunError:
                await _respond(writer, 431, "Request Header Fields Too Large",
                               b"request too large\n")
                return
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            status, reason, body, headers = self._answer(head)
            await _respond(writer, status, reason, body, headers)
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        """The response to one request's head: status, reason, body, extra headers."""
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, "Bad Request", b"bad request line\n", {}
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return 405, "Method Not Allowed", b"only GET\n", {"Allow": "GET"}
        if target != b"/metrics":
            return 404, "Not Found", b"see /metrics\n", {}
        return 200, "OK", self.metrics.exposition(), {"Content-Type": CONTENT_TYPE_LATEST}


async def _respond(writer: asyncio.StreamWriter, status: int, reason: str, body: bytes,
                   headers: dict[str, str] | None = None) -> None:
    fields = {"Content-Type": "text/plain; charset=utf-8", **(headers or {}),
              "Content-Length": str(len(body)), "Connection": "close"}
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    writer.write(head.encode("latin-1") + body)
    await writer.drain()

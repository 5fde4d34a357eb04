"""The agent's jobs as operators see them: every job running or queued here (outbound and
inbound), the limits that queue outbound jobs, and the bounded history of finished jobs'
reports in `HOME/history.jsonl` (newest `history_limit`, default 500, kept across
restarts)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import UserError

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
DEFAULT_HISTORY_LIMIT = 500

Event = dict[str, Any]


@dataclass
class JobRecord:
    """One job as the control socket shows it, from the request until its report."""

    job_id: str
    direction: str                      # "outbound" (this agent is the source), "inbound",
                                        # or "local" (a disk move on this host)
    vm: str | None
    peer: str
    state: str = "queued"               # queued, running, then the report's status
    phase: str = "queued"
    position: int = 0                   # 1-based place in the queue while queued
    started_at: float = field(default_factory=time.time)   # wall clock: when requested
    running_at: float | None = None
    ended_at: float | None = None
    latest: Event | None = None         # the latest progress (or queued) event
    report: Event | None = None
    detached: bool = False
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _listeners: list[asyncio.Queue[Event]] = field(default_factory=list)

    def summary(self) -> Event:
        """The job's row: what `jobs` and `job` return."""
        out: Event = {"job": self.job_id, "direction": self.direction, "vm": self.vm,
                      "peer": self.peer, "state": self.state, "phase": self.phase,
                      "started_at": round(self.started_at, 3),
                      "running_at": round(self.running_at, 3) if self.running_at else None,
                      "detached": self.detached}
        if self.state == "queued":
            out["position"] = self.position
        if self.latest is not None:
            out["progress"] = self.latest
        return out

    def publish(self, event: Event) -> None:
        """Remember a progress or queued event and hand it to everyone following."""
        if event.get("event") in ("progress", "queued"):
            self.latest = event
            if "phase" in event:
                self.phase = str(event["phase"])
        for queue in self._listeners:
            queue.put_nowait(event)

    def finish(self, report: Event) -> None:
        self.report = report
        self.state = str(report.get("status", "failed"))
        self.phase = str(report.get("phase", self.phase))
        self.ended_at = time.time()
        self.done.set()
        self.publish(report)

    def listen(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._listeners.append(queue)
        return queue

    def unlisten(self, queue: asyncio.Queue[Event]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(queue)


class Limiter:
    """At most `limit` jobs at once; the others wait first come, first served, and are told
    their place in the queue whenever it changes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running: set[str] = set()
        self.waiting: collections.OrderedDict[str, tuple[JobRecord, asyncio.Future[None]]] = \
            collections.OrderedDict()

    def queued(self) -> list[JobRecord]:
        return [record for record, _ in self.waiting.values()]

    def enter(self, record: JobRecord) -> asyncio.Future[None]:
        """A future done once the job may run: at once when a place is free (and nobody
        waits before it), else when the jobs before it have left."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(self.running) < self.limit and not self.waiting:
            self.running.add(record.job_id)
            future.set_result(None)
        else:
            self.waiting[record.job_id] = (record, future)
            self._tell_positions()
        return future

    def leave(self, job_id: str) -> None:
        """The job ended, or was dropped while waiting: let the next ones in."""
        waiting = self.waiting.pop(job_id, None)
        if waiting is not None:
            waiting[1].cancel()
        self.running.discard(job_id)
        while self.waiting and len(self.running) < self.limit:
            next_id, (record, future) = self.waiting.popitem(last=False)
            record.position = 0
            self.running.add(next_id)
            future.set_result(None)
        self._tell_positions()

    def _tell_positions(self) -> None:
        for position, (record, _) in enumerate(self.waiting.values(), 1):
            if record.position != position:
                record.position = position
                record.publish({"event": "queued", "phase": "queued", "job": record.job_id,
                                "position": position, "running": len(self.running),
                                "limit": self.limit})


class History:
    """Finished jobs' reports, one JSON object a line in HOME/history.jsonl, oldest first.

    Bounded to the newest `limit` reports: appending past the bound rewrites the file
    without the oldest (atomically: a temporary file renamed over it), so the file never
    holds more than `limit` lines. A line that does not parse (a torn write of a killed
    agent) is skipped."""

    def __init__(self, home: Path, limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        self.path = home / HISTORY_FILE
        self.limit = max(1, limit)
        self.entries: collections.deque[Event] = collections.deque(self._load(),
                                                                   maxlen=self.limit)
        self._lines = self._count_lines()

    def _load(self) -> Iterable[Event]:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    def _count_lines(self) -> int:
        try:
            with open(self.path, "rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def append(self, entry: Event) -> None:
        self.entries.append(entry)
        try:
            if self._lines + 1 > self.limit:
                self._rewrite()
            else:
                with open(self.path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                self._lines += 1
        except OSError as exc:
            log.error("cannot write the job history %s: %s", self.path, exc)

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for entry in self.entries:
                f.write(json.dumps(entry) + "\n")
        os.replace(tmp, self.path)
        self._lines = len(self.entries)

    def newest(self, limit: int | None = None) -> list[Event]:
        """Up to `limit` reports, newest first."""
        items = list(reversed(self.entries))
        return items if limit is None else items[:max(0, limit)]

    def find(self, job_id: str) -> Event | None:
        """The report of job_id (or of the one job whose id starts with it)."""
        matches = [e for e in reversed(self.entries) if str(e.get("job", "")) == job_id]
        if matches:
            return matches[0]
        prefixed = {str(e.get("job")): e for e in self.entries
                    if job_id and str(e.get("job", "")).startswith(job_id)}
        if len(prefixed) > 1:
            raise UserError(f"job id {job_id!r} is ambiguous: {', '.join(sorted(prefixed))}")
        return next(iter(prefixed.values()), None)


def history_entry(record: JobRecord, report: Event) -> Event:
    """What the history keeps of a finished job: its report and when it ran."""
    entry = {k: v for k, v in report.items() if k != "event"}
    entry.update(job=record.job_id, direction=record.direction,
                 vm=report.get("vm") or record.vm, peer=record.peer,
                 started_at=round(record.started_at, 3),
                 ended_at=round(record.ended_at or time.time(), 3))
    return entry


async def follow(record: JobRecord, send: Callable[[Event], Awaitable[None]],
                 stop: asyncio.Event) -> Event | None:
    """Send `record`'s events as they come until it ends (returning its report) or `stop`
    is set (None)."""
    queue = record.listen()
    try:
        if record.done.is_set():
            return record.report
        if record.latest is not None:
            await send(record.latest)
        while True:
            getter = asyncio.ensure_future(queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (getter, stopper):
                if not task.done():
                    task.cancel()
            if getter.done() and not getter.cancelled():
                event = getter.result()
                if event.get("event") == "result":
                    return record.report
                await send(event)
            elif stop.is_set():
                return None
    finally:
        record.unlisten(queue)

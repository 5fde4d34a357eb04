"""A job's timeline and the guest's health after it moved.

While a job runs, a `Sampler` takes one sample a second: the job's own figures (phase,
wire throughput, QEMU's remaining bytes and dirty rate) and CPU seconds per second from
/proc (agent.procfs): the guest's vCPU threads (its pace: 1.0 is one vCPU running all
the time; a throttled or starved guest shows lower), its whole QEMU, this agent. Samples
are compact rows under a list of field names, bounded by `Series`: a long job keeps
coarser samples (pairs merged), never more than MAX_SAMPLES.

After the resume the destination keeps sampling its QEMU for the health window and tells
the source (HEALTH); `health` compares the guest's pace after the resume with its pace
before the switchover.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.procfs import CpuMeter, CpuRates

SAMPLE_INTERVAL_S = 1.0
MAX_SAMPLES = 600
"""Samples a timeline keeps at most: 10 minutes at one a second; longer jobs keep one per
2, 4, ... seconds. (The picture is 1200 px wide; a history of 500 reports stays tens of
MiB at worst.)"""
HEALTH_TOLERANCE = 0.2
"""The guest is healthy when its pace after the resume is at least (1 - this) of before."""
IDLE_PACE = 0.02
"""vCPU seconds per second below which a guest counts as idle: its pace says nothing."""
BEFORE_SAMPLES = 3
"""How many of the last samples before the switchover make the pace `before`."""
HEALTH_MARGIN_S = 5.0
"""How long past the destination's health window the source waits for HEALTH."""
MAX_HEALTH_WINDOW_S = 60.0
"""The longest health window a source waits for, whatever the destination says."""

CPU_FIELDS = ("vcpu_pace", "qemu_cpu", "agent_cpu")
SOURCE_FIELDS = ("t", "phase", "wire_bps", "remaining_bytes", "dirty_bps", "throttle",
                 *CPU_FIELDS)
"""t: seconds since the job began; wire_bps: bytes on the wire per second (pages, stream,
disks); remaining_bytes and dirty_bps: QEMU's last query-migrate; throttle: auto-converge
(0..1); vcpu_pace, qemu_cpu, agent_cpu: CPU seconds per second of the guest's vCPU
threads, its whole QEMU, this agent."""
DESTINATION_FIELDS = ("t", *CPU_FIELDS)
LEVELS = frozenset({"t", "phase", "remaining_bytes", "throttle"})
"""Fields that are a state at the sample's time (a merge keeps the later); the others are
rates over the sample's interval (a merge averages them)."""
# Phases in which the source guest runs at its own pace (not stopped, not throttled).
FREE_PHASES = frozenset({"preparing", "precopy"})

Row = list[Any]
Probe = Callable[[], dict[str, Any]]


def _merge(rows: Sequence[Row], fields: Sequence[str]) -> Row:
    """One row standing for consecutive rows: the last one's levels, the rates' mean."""
    out = list(rows[-1])
    for i, name in enumerate(fields):
        if name in LEVELS:
            continue
        values = [r[i] for r in rows if isinstance(r[i], (int, float))]
        if values:
            mean = sum(values) / len(values)
            out[i] = round(mean) if all(isinstance(v, int) for v in values) else round(mean, 3)
        else:
            out[i] = None
    return out


class Series:
    """Rows of samples, at most `limit`: when full, pairs merge and later samples are
    merged `stride` at a time, so the rows stay evenly spaced."""

    def __init__(self, fields: Sequence[str], limit: int = MAX_SAMPLES) -> None:
        if limit < 2:
            raise ValueError(f"a series needs room for 2 rows, not {limit}")
        self.fields = tuple(fields)
        self.limit = limit
        self.rows: list[Row] = []
        self.stride = 1            # samples per row
        self._pending: list[Row] = []

    def add(self, row: Row) -> None:
        self._pending.append(row)
        if len(self._pending) < self.stride:
            return
        self.rows.append(_merge(self._pending, self.fields))
        self._pending = []
        if len(self.rows) >= self.limit:
            self.rows = [_merge(self.rows[i:i + 2], self.fields)
                         for i in range(0, len(self.rows), 2)]
            self.stride *= 2

    def snapshot(self) -> list[Row]:
        """Every row, the samples not yet merged into one included."""
        tail = [_merge(self._pending, self.fields)] if self._pending else []
        return self.rows + tail

    def column(self, name: str) -> list[Any]:
        i = self.fields.index(name)
        return [row[i] for row in self.snapshot()]


class Sampler:
    """Samples once every `interval_s` while started: `probe`'s figures (its counters in
    `rates` turned into per-second rates) and the CPU rates of a QEMU and this agent."""

    def __init__(self, fields: Sequence[str], probe: Probe | None = None, *,
                 started: float | None = None, rates: dict[str, str] | None = None,
                 interval_s: float = SAMPLE_INTERVAL_S, limit: int = MAX_SAMPLES) -> None:
        self.started = time.monotonic() if started is None else started
        # The wall clock at `started`: QEMU's event times (STOP, RESUME) are wall clock.
        self.wall_started = time.time() - (time.monotonic() - self.started)
        self.series = Series(fields, limit)
        self.interval_s = interval_s
        self._probe = probe or dict
        self._rates = rates or {}                     # row field -> probe counter
        self._counters: dict[str, float] = {}
        self._last = time.monotonic()
        self._agent = CpuMeter(os.getpid())
        self._qemu: CpuMeter | None = None
        self._task: asyncio.Task[None] | None = None

    def watch_qemu(self, pid: int, vcpu_tids: Sequence[int]) -> None:
        """From now on, sample this QEMU and these of its threads (its vCPUs)."""
        self._qemu = CpuMeter(pid, vcpu_tids)

    def tick(self, now: float | None = None) -> Row:
        """Take one sample now (the loop does so every interval)."""
        now = time.monotonic() if now is None else now
        seconds = now - self._last
        self._last = now
        figures = self._probe()
        for field, counter in self._rates.items():
            value = figures.get(counter)
            before = self._counters.get(counter)
            if isinstance(value, (int, float)):
                self._counters[counter] = value
                figures[field] = (round((value - before) / seconds)
                                  if before is not None and seconds > 0 else None)
        agent = self._agent.read(now)
        qemu = self._qemu.read(now) if self._qemu is not None else CpuRates(None, None)
        figures.update(t=round(now - self.started, 3), vcpu_pace=_round(qemu.threads),
                       qemu_cpu=_round(qemu.process), agent_cpu=_round(agent.process))
        row = [figures.get(name) for name in self.series.fields]
        self.series.add(row)
        return row

    def finish(self) -> None:
        """Stop sampling at the end of what is measured, with a last sample of the part
        of an interval since the previous one (unless too short to measure CPU time)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
            if time.monotonic() - self._last >= self.interval_s / 10:
                self.tick()

    def start(self) -> None:
        if self._task is None:
            self._last = time.monotonic()
            figures = self._probe()
            for counter in self._rates.values():   # the first rate counts from here
                value = figures.get(counter)
                if isinstance(value, (int, float)):
                    self._counters[counter] = value
            self._task = asyncio.create_task(self._run(), name="sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            self.tick()
            next_at += self.interval_s
            # After a stall (a blocked loop) sample again one interval on, not in a burst.
            next_at = max(next_at, time.monotonic() + self.interval_s / 2)

    def to_json(self) -> dict[str, Any]:
        """The samples as a report shows them."""
        return {"interval_s": self.interval_s * self.series.stride,
                "fields": list(self.series.fields), "samples": self.series.snapshot()}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def peer_number(value: object) -> float | None:
    """A finite, non-negative number from the peer's message, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0 <= value < float("inf") else None


def destination_rows(samples: object) -> list[Row]:
    """The destination's samples from its HEALTH (rows of DESTINATION_FIELDS), as far as
    they are well formed, at most MAX_SAMPLES: figures for the report only, never a
    reason to fail (t may be negative: before the resume)."""
    if not isinstance(samples, list):
        return []
    rows: list[Row] = []
    for row in samples[-MAX_SAMPLES:]:
        if isinstance(row, list) and len(row) == len(DESTINATION_FIELDS):
            t, *rates = row
            if isinstance(t, (int, float)) and not isinstance(t, bool) and abs(t) < 1e7:
                rows.append([float(t), *(peer_number(r) for r in rates)])
    return rows


# ---------------------------------------------------------------------------- health

def pace_before(series: Series) -> tuple[float | None, bool]:
    """The guest's pace in the last samples before the switchover in which it ran freely
    (preparing, pre-copy), and False; if auto-converge throttled it all along, the last
    throttled samples' and True; (None, False) without any."""
    rows = series.snapshot()
    phase, pace = series.fields.index("phase"), series.fields.index("vcpu_pace")
    for phases, throttled in ((FREE_PHASES, False), ({"throttling"}, True)):
        paces = [r[pace] for r in rows if r[phase] in phases and r[pace] is not None]
        if paces:
            last = paces[-BEFORE_SAMPLES:]
            return round(sum(last) / len(last), 3), throttled
    return None, False


def health(before: float | None, after: float | None, *, window_s: float,
           before_throttled: bool = False, tolerance: float = HEALTH_TOLERANCE,
           reason: str | None = None) -> dict[str, Any]:
    """The health verdict: healthy (pace after >= (1 - tolerance) of before), slow, idle
    (no pace to compare: the guest hardly ran before), or unknown (`reason`)."""
    out: dict[str, Any] = {"verdict": "unknown", "ok": None, "before": before,
                           "before_throttled": before_throttled, "after": after,
                           "ratio": None, "tolerance": tolerance, "window_s": window_s}
    if before is None or after is None:
        out["reason"] = reason or ("no pace measured before the switchover" if before is None
                                   else "no pace measured after the resume")
        return out
    if before < IDLE_PACE:
        out.update(verdict="idle", reason=f"the guest used under {IDLE_PACE} vCPU-s/s "
                                          f"before the switchover: nothing to compare")
        return out
    ratio = round(after / before, 3)
    ok = ratio >= 1 - tolerance
    out.update(verdict="healthy" if ok else "slow", ok=ok, ratio=ratio)
    return out


def health_line(h: dict[str, Any] | None) -> str:
    """The report's human line about the guest's health."""
    if not h:
        return "not measured"
    if h.get("verdict") in ("healthy", "slow"):
        throttled = " (throttled)" if h.get("before_throttled") else ""
        return (f"{h['after']:.2f} vCPU-s/s, {h['ratio'] * 100:.0f}% of before "
                f"({h['before']:.2f}{throttled}): {h['verdict']}")
    if h.get("verdict") == "idle":
        return f"{h.get('after')} vCPU-s/s: idle ({h.get('reason')})"
    return f"unknown ({h.get('reason', 'no reason given')})"

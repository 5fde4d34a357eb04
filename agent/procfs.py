"""CPU time of processes and threads from /proc: what a QEMU and its vCPUs, and an agent,
have used so far, and as CPU seconds per second between two readings.

A process or thread may end between listing and reading (QEMU quits after a migration,
a thread exits): such a reading is None (a whole process gone) or leaves the thread out
(one thread gone), never an error.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# QEMU names its vCPU threads so only with `-name ...,debug-threads=on`: "CPU 0/KVM",
# "CPU 1/TCG", or "ALL CPUs/TCG" for single-threaded TCG. Without it every thread is
# "qemu-system-x86" and the vCPU thread ids come from QMP's query-cpus-fast instead.
VCPU_COMM = re.compile(r"CPU \d+/(KVM|TCG)|ALL CPUs/TCG")


def _stat_cpu_seconds(path: str) -> float | None:
    """utime + stime of a /proc/.../stat file, in seconds; None if it is gone."""
    try:
        with open(path, "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat.rsplit(b")", 1)[-1].split()
    try:
        # After the name: state is fields[0]; utime and stime are fields 14 and 15 of
        # proc(5), so 11 and 12 here.
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (IndexError, ValueError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads included; None if it is
    gone."""
    return _stat_cpu_seconds(f"/proc/{pid}/stat")


def threads_cpu_seconds(pid: int, tids: Iterable[int]) -> float | None:
    """The sum over these threads of process pid; a thread gone is left out; None if the
    process is gone."""
    if not os.path.exists(f"/proc/{pid}"):
        return None
    total = 0.0
    for tid in tids:
        seconds = _stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
        if seconds is not None:
            total += seconds
    return total


def named_vcpu_threads(pid: int) -> list[int]:
    """Thread ids of pid whose name is a QEMU vCPU thread's (debug-threads=on)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return []
    found = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if VCPU_COMM.fullmatch(comm):
            found.append(int(tid))
    return sorted(found)


@dataclass(frozen=True, slots=True)
class CpuRates:
    """CPU seconds per second since the previous reading (None: not measurable)."""

    process: float | None
    threads: float | None


class CpuMeter:
    """CPU seconds per second of one process and of a set of its threads (the vCPUs),
    between successive `read`s."""

    def __init__(self, pid: int, tids: Iterable[int] = ()) -> None:
        self.pid = pid
        self.tids = tuple(tids)
        self._at, self._process, self._threads = self._counters()

    def _counters(self) -> tuple[float, float | None, float | None]:
        """(when, process, threads): the time is the middle of the reads, since a reader
        preempted between its clock and /proc (a loaded host) would count CPU seconds
        spent after that time (a spinning thread read 1.07 CPU s per second)."""
        before = time.monotonic()
        process = cpu_seconds(self.pid)
        threads = threads_cpu_seconds(self.pid, self.tids) if self.tids else None
        return (before + time.monotonic()) / 2, process, threads

    def read(self, now: float | None = None) -> CpuRates:
        at, process, threads = self._counters()
        now = at if now is None else now
        seconds = now - self._at
        rates = CpuRates(_rate(self._process, process, seconds),
                         _rate(self._threads, threads, seconds))
        self._at, self._process, self._threads = now, process, threads
        return rates


def _rate(before: float | None, after: float | None, seconds: float) -> float | None:
    if before is None or after is None or seconds <= 0:
        return None
    # A thread that ended between readings takes its time with it: never below zero.
    return max(0.0, after - before) / seconds

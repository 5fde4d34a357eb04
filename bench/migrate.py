"""ferry's live migration against QEMU's own, same guest, same machine, measured in one run.

    python -m bench migrate [--quick] [--case MIB] [--link RATE] [--only ROW] [--json]
                            [--repeat N] [--ferry-ram private|file] [--ferry-arg ARG]
                            [--ferry-dest-ram-dir DIR] [--no-save]

Each row boots a fresh self-checking test guest (agent.guest) that fills part of its RAM
at boot and then rewrites a working set at a fixed rate, waits until it completed a pass,
and migrates it. Guests (`--quick`: the first two, both judged; `--case MIB` picks sizes):

- 1 GiB, 512 MiB filled, 5000 pages/s rewritten (19.5 MiB/s)        target
- 4 GiB, 2 GiB filled, 5000 pages/s                                  target
- 256 MiB, 128 MiB filled, 5000 pages/s; 1 GiB at 20000 pages/s      information (full run)

Every guest has N MiB + 8 KiB of RAM: QEMU < 9.0 under TCG loses dirty pages in its own
migration when a RAM block is a multiple of 64 pages (DESIGN §7), for ferry too.

Rows, for every guest:

- qemu plain: QEMU's own migration, the source's RAM a shared file (what ferry's destination
  uses; x-ignore-shared off, so QEMU copies RAM itself) to a second QEMU with the same argv
  plus `-incoming defer`. max-bandwidth 100 GB/s, downtime-limit 300 ms (ferry's default).
- ferry default: two real agents (agent.localpair), `ferry vm start --ram private` (plain
  `-m` RAM, the setup of qemu plain-private; `--ferry-ram file` for a shared file) and
  `ferry migrate NAME --to hostb --json`. The destination is always ferry's shared RAM file.
  Total and downtime come from ferry's report.
- ferry custom (`--ferry-arg ARG`, repeatable): the ferry row with other `ferry migrate`
  options, e.g. `--compress zstd:1`; shown with them in its notes, never judged.
- qemu multifd-zstd: as plain, plus multifd with 2 channels and zstd on both sides.
- qemu plain-private: as plain, with QEMU's usual private anonymous RAM (`-m` only) on both
  sides. The shared file costs QEMU's own migration time here (2-4x the total on loopback,
  measured), so this is QEMU at its best and the loopback reference.

A guest in a RAM file is read from the file; one in private RAM over QMP (HMP `xp` for the
mailbox, `pmemsave` for the fill); ferry's destination always from its RAM file.

Modes:

- loopback (default): each row runs in a private network namespace of its own (QEMU rows:
  both QEMUs; ferry: both agents, listening on 127.0.0.1 there, and the source QEMU).
- `--link RATE` (e.g. 1gbit): two namespaces joined by a veth pair (10.77.0.1/24 and
  10.77.0.2/24, inside them only), both ends shaped with `tc ... tbf rate RATE`. The source
  side (source QEMU; agent a) runs in the first, the destination side (destination QEMU
  listening on 10.77.0.2; agent b listening there, and the QEMU it starts) in the second.
  Namespaces are deleted after every row, also on Ctrl-C and SIGTERM.

Figures:

- downtime_ms: QMP event time STOP on the source to RESUME on the destination (QEMU's own
  timestamps), for every row.
- total_ms includes preparing the destination: ferry's report counts from the source agent
  taking the job until the guest runs on the destination and the source QEMU quit; QEMU's
  from launching the destination QEMU until the guest RESUMEd there (QEMU's own
  `total-time`, `migrate` to completion, is kept as qemu_total_ms).
- wire_bytes: what crossed the namespace's loopback (loopback; both directions, frame
  bytes) or the veth, both directions (link), for every row: QEMU 7.2 counts multifd pages
  before compression, so its own figure would overstate multifd-zstd. ferry's own count
  is kept as ferry_wire_bytes. Without namespaces: ferry's and QEMU's own figures.
- CPU seconds (utime + stime, all threads) over the migration, each process apart:
  src_agent/dst_agent (ferry's agents, /proc before they stop), src_qemu (from the start
  of the migration until the source QEMU exits: ferry's source QEMU quits by itself, so the
  bench adopts it as a child subreaper and reads wait4's rusage; QEMU rows read /proc
  before the kill) and dst_qemu (from its launch to the end of the migration). The guest
  busy-waits, so a QEMU's figure includes about one core for every second its guest ran;
  dst_qemu_cpu_verified_s is the destination QEMU once verification is over.
- ok: the destination guest kept running for two full passes over its working set with
  0 errors, and its boot-time fill arrived intact (XXH3-128 before/after).

Targets, for every judged guest, ratios against rows of the same run (medians with
--repeat):

- loopback: ferry's downtime <= 1.25x and total <= 1.25x QEMU plain-private's.
- link: ferry's total <= 0.6x, wire bytes <= 0.6x and downtime <= 1x QEMU plain's.

The same ratios against the other plain row are printed for information, as are the other
rows. Exit code 0 when every target of the run is met, 1 when not (or a row failed), 130
when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import xxhash

from agent.errors import FerryError
from agent.guest import PAGE_SIZE, GuestConfig, MailboxState, build_guest
from agent.guest.build import default_cache_dir
from agent.guest.remote import read_mailbox_over_qmp
from agent.guest.workload import guest_config
from agent.localpair import (
    LOOPBACK,
    AgentPair,
    NetnsLink,
    free_port,
    rate_bits,
    read_guest,
)
from agent.procfs import cpu_seconds as proc_cpu_seconds
from agent.qemu import qmp, vm
from agent.ramdir import huge_pages
from agent.state import vms
from bench import met_text, run_async, sigterm_as_interrupt
from bench import parser as bench_parser

MIB = 1 << 20
KIB = 1 << 10
# DESIGN §7: a RAM block that is not a multiple of 64 pages keeps QEMU 7.2's TCG dirty log
# correct; +8 KiB (2 pages) does that and changes nothing else about the guest.
RAM_EXTRA = 8 * KIB
VM_NAME = "bench"
FERRY_MODE = "default"
CUSTOM_MODE = "custom"          # a ferry row run with --ferry-arg: shown, never judged
FERRY_RAM_CHOICES = ("private", "file")
LOOPBACK_LINK = "loopback"
QEMU_MODES = ("plain", "multifd-zstd", "plain-private")
PRIVATE_RAM_MODES = ("plain-private",)
CPU_KEYS = ("src_agent_cpu_s", "dst_agent_cpu_s", "src_qemu_cpu_s", "dst_qemu_cpu_s")
ROW_KEYS = ("tool", "mode", "link", "guest_mib", "dirty_mib_s", "total_ms", "downtime_ms",
            "wire_bytes", *CPU_KEYS, "ok")
# QEMU's parameters for the baseline: bandwidth unlimited in practice, ferry's default
# downtime limit, and for multifd the channel count of a 2-core machine.
QEMU_MAX_BANDWIDTH = 100 * 10**9
DOWNTIME_LIMIT_MS = 300
MULTIFD_CHANNELS = 2
# Boot: SeaBIOS + clock calibration (~0.2 s) and the fill at >= 10k pages/s on a slow host.
BOOT_TIMEOUT_S = 10.0
FILL_PAGES_PER_S_FLOOR = 10_000
MIGRATE_TIMEOUT_S = 180.0
RESUME_TIMEOUT_S = 15.0
# ferry's source QEMU gets `quit` right after the commit; it exits within milliseconds.
SOURCE_EXIT_TIMEOUT_S = 10.0
REAP_TIMEOUT_S = 5.0
# After the switchover the guest must finish this many full passes over its working set:
# the pass cut by the migration, then one that checks every page written before it.
VERIFY_PASSES = 2
POLL_S = 0.02
# Long per-row fields kept in the saved results but not printed.
LOG_KEYS = ("agent_log", "report")
RESULTS_DIR = Path(__file__).with_name("results")
PR_SET_CHILD_SUBREAPER = 36     # prctl(2)


class BenchError(FerryError):
    """A benchmark row could not be measured (setup failed, a migration did not finish)."""


# ---------------------------------------------------------------------------- cases and rows

@dataclass(frozen=True, slots=True)
class Case:
    """One guest to migrate: RAM (MiB, +8 KiB), boot-time fill (MiB), pages rewritten per s."""

    guest_mib: int
    fill_mib: int
    rate: int
    target: bool = False        # the targets are judged on this case

    @property
    def ram_size(self) -> int:
        return self.guest_mib * MIB + RAM_EXTRA

    @property
    def memory_arg(self) -> str:
        """The size for `ferry vm start --memory` (K, as QEMU would print it)."""
        return f"{self.ram_size // KIB}K"

    @property
    def dirty_mib_s(self) -> float:
        return round(self.rate * PAGE_SIZE / MIB, 1)

    @property
    def label(self) -> str:
        return f"{self.guest_mib} MiB guest, {self.dirty_mib_s:g} MiB/s dirty"

    def config(self) -> GuestConfig:
        return guest_config(self.guest_mib, self.fill_mib, self.rate)


BASE_CASE = Case(guest_mib=1024, fill_mib=512, rate=5000, target=True)
BIG_CASE = Case(guest_mib=4096, fill_mib=2048, rate=5000, target=True)
QUICK_CASES = (BASE_CASE, BIG_CASE)
FULL_CASES = (*QUICK_CASES, Case(guest_mib=256, fill_mib=128, rate=5000),
              Case(guest_mib=1024, fill_mib=512, rate=20000))
ROW_NAMES = ("qemu-plain", "ferry-default", "qemu-multifd-zstd", "qemu-plain-private")


def select_cases(cases: Sequence[Case], sizes: Sequence[int]) -> tuple[Case, ...]:
    """The cases whose guest has one of `sizes` MiB (all when none is given)."""
    return tuple(c for c in cases if not sizes or c.guest_mib in sizes)


def link_label(rate: str | None) -> str:
    return LOOPBACK_LINK if rate is None else rate


def make_row(tool: str, mode: str, case: Case, *, link: str = LOOPBACK_LINK,
             total_ms: float | None, downtime_ms: float | None, wire_bytes: int | None,
             ok: bool, cpu: dict[str, float | None] | None = None,
             **extra: Any) -> dict[str, Any]:
    """One result row: the common keys in order, then tool-specific extras."""
    row: dict[str, Any] = {
        "tool": tool, "mode": mode, "link": link, "guest_mib": case.guest_mib,
        "dirty_mib_s": case.dirty_mib_s,
        "total_ms": None if total_ms is None else round(total_ms, 1),
        "downtime_ms": None if downtime_ms is None else round(downtime_ms, 1),
        "wire_bytes": wire_bytes,
    }
    for key in CPU_KEYS:
        value = (cpu or {}).get(key)
        row[key] = None if value is None else round(value, 2)
    row["ok"] = bool(ok)
    row.update(extra)
    return row


def failed_row(tool: str, mode: str, case: Case, error: str, *, link: str = LOOPBACK_LINK,
               cpu: dict[str, float | None] | None = None, **extra: Any) -> dict[str, Any]:
    return make_row(tool, mode, case, link=link, total_ms=None, downtime_ms=None,
                    wire_bytes=None, ok=False, cpu=cpu, error=error, **extra)


# ---------------------------------------------------------------------------- targets

@dataclass(frozen=True, slots=True)
class Target:
    """ferry's `key` must be at most max_ratio times the QEMU `baseline` row's."""

    name: str            # "downtime", "total", "wire"
    key: str             # the row field compared
    baseline: str        # the QEMU mode compared with
    max_ratio: float


LOOPBACK_TARGETS = (Target("downtime", "downtime_ms", "plain-private", 1.25),
                    Target("total", "total_ms", "plain-private", 1.25))
LINK_TARGETS = (Target("total", "total_ms", "plain", 0.6),
                Target("wire", "wire_bytes", "plain", 0.6),
                Target("downtime", "downtime_ms", "plain", 1.0))
# The same ratios against the other plain row, printed for information.
OTHER_BASELINE = {"plain": "plain-private", "plain-private": "plain"}


def targets_for(link: str) -> tuple[Target, ...]:
    return LOOPBACK_TARGETS if link == LOOPBACK_LINK else LINK_TARGETS


def info_targets_for(link: str) -> tuple[Target, ...]:
    return tuple(replace(t, baseline=OTHER_BASELINE[t.baseline]) for t in targets_for(link))


@dataclass(frozen=True, slots=True)
class Verdict:
    """One target: ferry's figure against the limit set by a QEMU row's, for one case."""

    target: Target
    guest_mib: int
    dirty_mib_s: float
    ferry: float | None
    qemu: float | None
    met: bool
    why: str = ""        # set when the rows cannot be compared
    runs: int = 1        # figures are medians when more than one

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def baseline(self) -> str:
        return self.target.baseline

    @property
    def max_ratio(self) -> float:
        return self.target.max_ratio

    @property
    def ratio(self) -> float | None:
        if self.ferry is None or not self.qemu:
            return None
        return self.ferry / self.qemu

    def _figure(self, value: float) -> str:
        if self.target.key == "wire_bytes":
            return f"{value / MIB:.1f} MiB"
        return f"{value:.0f} ms"

    def text(self) -> str:
        head = (f"{self.name:<8} ferry <= {self.max_ratio:g}x qemu {self.baseline} "
                f"({self.guest_mib} MiB, {self.dirty_mib_s:g} MiB/s): ")
        if self.why:
            return head + f"NOT met: {self.why}"
        assert self.ferry is not None and self.qemu is not None
        median = "medians " if self.runs > 1 else ""
        ratio = f"{self.ratio:.2f}" if self.ratio is not None else "-"
        return head + (f"{met_text(self.met)} ({median}"
                       f"{self._figure(self.ferry)} vs {self._figure(self.qemu)}, "
                       f"ratio {ratio})")

    def as_json(self) -> dict[str, Any]:
        return {"target": self.name, "key": self.target.key, "baseline": self.baseline,
                "guest_mib": self.guest_mib, "dirty_mib_s": self.dirty_mib_s,
                "ferry": self.ferry, "qemu": self.qemu, "max_ratio": self.max_ratio,
                "ratio": None if self.ratio is None else round(self.ratio, 3),
                "met": self.met, "why": self.why}


def _group(rows: Iterable[dict[str, Any]], tool: str, mode: str, case: Case,
           link: str) -> list[dict[str, Any]]:
    return [row for row in rows
            if (row["tool"], row["mode"], row["guest_mib"], row["dirty_mib_s"],
                row.get("link", LOOPBACK_LINK)) == (tool, mode, case.guest_mib,
                                                    case.dirty_mib_s, link)]


def verdicts(rows: Sequence[dict[str, Any]], cases: Iterable[Case], link: str = LOOPBACK_LINK,
             targets: Sequence[Target] | None = None) -> list[Verdict]:
    """The targets (by default the link's) for every case that has ferry and baseline rows.

    With repeated runs each side's figure is its median. A failed row (not ok, or a figure
    missing) fails the target: a baseline that lost the guest is no baseline, and a ferry
    run that did is no result.
    """
    out = []
    for case in cases:
        ferry = _group(rows, "ferry", FERRY_MODE, case, link)
        for target in targets_for(link) if targets is None else targets:
            qemu_rows = _group(rows, "qemu", target.baseline, case, link)
            if not ferry or not qemu_rows:
                continue
            f_values = [row[target.key] for row in ferry]
            q_values = [row[target.key] for row in qemu_rows]
            f_bad = next((row for row in ferry if not row["ok"]), None)
            q_bad = next((row for row in qemu_rows if not row["ok"]), None)
            why = ""
            if f_bad is not None:
                why = f"the ferry run failed ({f_bad.get('error') or 'guest not intact'})"
            elif q_bad is not None:
                why = f"the QEMU baseline failed ({q_bad.get('error') or 'guest not intact'})"
            elif None in f_values or None in q_values:
                why = "a figure is missing"
            f = None if why else statistics.median(f_values)
            q = None if why else statistics.median(q_values)
            met = f is not None and q is not None and f <= target.max_ratio * q
            out.append(Verdict(target=target, guest_mib=case.guest_mib,
                               dirty_mib_s=case.dirty_mib_s, ferry=f, qemu=q, met=met,
                               why=why, runs=min(len(ferry), len(qemu_rows))))
    return out


def targets_met(rows: Sequence[dict[str, Any]], cases: Sequence[Case],
                link: str = LOOPBACK_LINK) -> bool:
    """True when every judged case of the run has all its verdicts and all are met."""
    judged = [c for c in cases if c.target]
    found = verdicts(rows, judged, link)
    return (bool(found) and len(found) == len(targets_for(link)) * len(judged)
            and all(v.met for v in found))


def table(rows: Sequence[dict[str, Any]], cases: Sequence[Case],
          link: str = LOOPBACK_LINK) -> str:
    """The rows as a readable table, then the target verdicts."""
    def num(value: Any, fmt: str) -> str:
        return "-".rjust(int(fmt.split(".")[0])) if value is None else format(value, fmt)

    lines = [f"link: {link}",
             (f"{'tool':<6} {'mode':<13} {'guest':>6} {'dirty':>6} {'total':>7} "
              f"{'downtime':>8} {'wire':>7} {'agent CPU s':>11} {'QEMU CPU s':>11} {'ok':>3}"
              "  notes"),
             (f"{'':<6} {'':<13} {'MiB':>6} {'MiB/s':>6} {'ms':>7} {'ms':>8} {'MiB':>7} "
              f"{'src':>5} {'dst':>5} {'src':>5} {'dst':>5}")]
    repeated = any(row.get("run", 1) > 1 for row in rows)
    for row in rows:
        wire = None if row["wire_bytes"] is None else row["wire_bytes"] / MIB
        notes = [f"run {row.get('run', 1)}"] if repeated else []
        if row["tool"] == "qemu" and row.get("qemu_total_ms") is not None:
            notes.append(f"QEMU's own: total {row['qemu_total_ms']} ms, "
                         f"downtime {row['qemu_downtime_ms']} ms")
        if row["tool"] == "ferry" and row.get("rounds") is not None:
            notes.append(f"{row['rounds']} rounds, source RAM {row.get('source_ram')}"
                         + (f", destination RAM in {row['dest_ram']}"
                            if row.get("dest_ram") else "")
                         + (f", {row['ferry_args']}" if row.get("ferry_args") else ""))
        if row.get("error"):
            notes.append(f"error: {row['error']}")
        elif not row["ok"]:
            notes.append(f"guest: errors {row.get('guest_errors')}, passes after "
                         f"{row.get('passes_after')}, fill intact {row.get('fill_intact')}")
        cpu = " ".join(num(row.get(k), "5.2f") for k in CPU_KEYS)
        lines.append(f"{row['tool']:<6} {row['mode']:<13} {row['guest_mib']:>6} "
                     f"{row['dirty_mib_s']:>6.1f} {num(row['total_ms'], '7.0f')} "
                     f"{num(row['downtime_ms'], '8.1f')} {num(wire, '7.1f')} {cpu} "
                     f"{'yes' if row['ok'] else 'NO':>3}  {'; '.join(notes)}")
    judged = [c for c in cases if c.target]
    for verdict in verdicts(rows, judged, link):
        lines.append("target  " + verdict.text())
    others = [c for c in cases if not c.target]
    for verdict in verdicts(rows, others, link):
        lines.append("(info)  " + verdict.text())
    for verdict in verdicts(rows, cases, link, info_targets_for(link)):
        lines.append("(info)  " + verdict.text())
    lines.append(f"targets: {met_text(targets_met(rows, cases, link))}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the guest

def fill_digest(ram: object, config: GuestConfig) -> str:
    """XXH3-128 of the guest's boot-time fill (written once at boot, never again)."""
    start = config.fill_start_page * PAGE_SIZE
    with (memoryview(ram) as view,  # type: ignore[arg-type]
          view[start:start + config.fill_pages * PAGE_SIZE] as fill):
        return xxhash.xxh3_128_hexdigest(fill)


def file_digest(path: Path) -> str:
    """XXH3-128 of a whole file."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_128_hexdigest(b"")
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data:
            return xxhash.xxh3_128_hexdigest(data)


def file_fill_digest(ram_path: Path | str, config: GuestConfig) -> str:
    with open(ram_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as ram:
        return fill_digest(ram, config)


class GuestView(Protocol):
    """How the bench reads a running guest's mailbox and fill."""

    async def mailbox(self) -> MailboxState: ...

    async def fill_digest(self, config: GuestConfig) -> str: ...


@dataclass
class FileGuest:
    """A guest whose RAM is a shared file: read straight from the file."""

    ram_path: Path | str

    async def mailbox(self) -> MailboxState:
        return read_guest(self.ram_path)

    async def fill_digest(self, config: GuestConfig) -> str:
        return await asyncio.to_thread(file_fill_digest, self.ram_path, config)


@dataclass
class QmpGuest:
    """A guest in private RAM: the mailbox through HMP `xp`, the fill through `pmemsave`."""

    qmp: qmp.Qmp
    scratch: Path                    # a directory on tmpfs for the fill dump

    async def mailbox(self) -> MailboxState:
        return await read_mailbox_over_qmp(self.qmp)

    async def fill_digest(self, config: GuestConfig) -> str:
        dump = self.scratch / f"fill-{os.urandom(4).hex()}.bin"
        try:
            await self.qmp.execute("pmemsave", {"val": config.fill_start_page * PAGE_SIZE,
                                                "size": config.fill_pages * PAGE_SIZE,
                                                "filename": str(dump)})
            return await asyncio.to_thread(file_digest, dump)
        finally:
            dump.unlink(missing_ok=True)


def pass_seconds(config: GuestConfig) -> float:
    return config.ws_pages / max(1, config.rate)


async def wait_first_pass(guest: GuestView, config: GuestConfig,
                          alive: Callable[[], bool]) -> None:
    """Wait until the guest booted, filled and completed one pass over its working set."""
    timeout = (BOOT_TIMEOUT_S + config.fill_pages / FILL_PAGES_PER_S_FLOOR
               + 2 * pass_seconds(config))
    deadline = time.monotonic() + timeout
    while (state := await guest.mailbox()).passes < 1:
        if not alive():
            raise BenchError("the source QEMU exited before the guest got going")
        if time.monotonic() > deadline:
            raise BenchError(f"the guest did not complete a pass within {timeout:.0f} s: "
                             f"{state}")
        await asyncio.sleep(POLL_S)
    if state.errors:
        raise BenchError(f"the guest reports {state.errors} errors before any migration")


async def verify_destination(guest: GuestView, config: GuestConfig,
                             digest: str) -> dict[str, Any]:
    """Watch the migrated guest for VERIFY_PASSES full passes; the figures for its row."""
    first = await guest.mailbox()
    timeout = (VERIFY_PASSES + 1) * pass_seconds(config) + 2.0
    deadline = time.monotonic() + timeout
    while (last := await guest.mailbox()).passes < first.passes + VERIFY_PASSES:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL_S)
    intact = await guest.fill_digest(config) == digest
    passes = last.passes - first.passes
    heartbeat = (last.heartbeat - first.heartbeat) & 0xFFFFFFFF
    return {"guest_ok": (last.errors == 0 and passes >= VERIFY_PASSES and heartbeat > 0
                         and intact),
            "guest_errors": last.errors, "passes_after": passes, "fill_intact": intact}


# ---------------------------------------------------------------------------- processes

def cpu_delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else max(0.0, after - before)


@contextlib.contextmanager
def subreaper() -> Iterator[bool]:
    """Inside, orphans among this process's descendants become its children (prctl
    PR_SET_CHILD_SUBREAPER), so a QEMU that `ferry vm start` left behind can be waited for
    and its CPU read from wait4's rusage. Yields whether the kernel agreed."""
    libc = ctypes.CDLL(None, use_errno=True)
    adopted = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield adopted
    finally:
        if adopted:
            libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def wait_exit_cpu(pid: int, timeout: float) -> float | None:
    """CPU seconds of child `pid` (every thread) once it exits, from wait4's rusage; None
    if it is not our child or does not exit within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, _, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if got == pid:
            return float(usage.ru_utime + usage.ru_stime)
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_S / 4)


def reap(pids: Iterable[int]) -> None:
    """Collect adopted children that were killed (a zombie would hold its pid)."""
    for pid in pids:
        deadline = time.monotonic() + REAP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                got, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if got == pid or not Path(f"/proc/{pid}").exists():
                break
            time.sleep(POLL_S)


# ---------------------------------------------------------------------------- networks

class NetNs:
    """A private network namespace whose loopback counts exactly the bytes of a migration.

    Loopback in a namespace is the same kernel path as the host's; its lo sees every packet
    of both directions once (as rx).
    """

    def __init__(self) -> None:
        self.name = f"ferry-bench-{os.getpid()}-{os.urandom(3).hex()}"
        self.created = False

    def create(self) -> bool:
        """Create it with lo up; False (and nothing left behind) where we may not."""
        if shutil.which("ip") is None:
            return False
        self.created = True             # before: an interrupt may come any time
        made = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, check=False)
        if made.returncode != 0:
            self.delete()
            return False
        up = subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"],
                            capture_output=True, check=False)
        if up.returncode != 0:
            self.delete()
        return self.created

    def prefix(self) -> list[str]:
        """Run a command inside it (`ip netns exec` execs: the pid stays the command's)."""
        return ["ip", "netns", "exec", self.name] if self.created else []

    def lo_rx_bytes(self) -> int:
        shown = subprocess.run(["ip", "-n", self.name, "-j", "-s", "link", "show", "lo"],
                               capture_output=True, text=True, check=True)
        return int(json.loads(shown.stdout)[0]["stats64"]["rx"]["bytes"])

    def delete(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
            self.created = False


class RowNet(Protocol):
    """Where a row's source and destination side run, and what counts its wire bytes."""

    @property
    def link(self) -> str: ...

    @property
    def dest_host(self) -> str:
        """Where the destination listens."""

    @property
    def wire_from(self) -> str | None:
        """What wire_bytes() counts; None when nothing does."""

    def prefix(self, side: int) -> list[str]: ...

    def wire_bytes(self) -> int | None: ...

    def agent_pair(self, root: Path, allow: tuple[Path, ...]) -> AgentPair: ...


@dataclass
class LoopbackNet:
    """Both sides in one private namespace (or on the host's loopback where none can be made)."""

    netns: NetNs = field(default_factory=NetNs)

    @property
    def link(self) -> str:
        return LOOPBACK_LINK

    @property
    def dest_host(self) -> str:
        return LOOPBACK

    @property
    def wire_from(self) -> str | None:
        return "netns loopback" if self.netns.created else None

    def prefix(self, side: int) -> list[str]:
        return self.netns.prefix()

    def wire_bytes(self) -> int | None:
        return self.netns.lo_rx_bytes() if self.netns.created else None

    def agent_pair(self, root: Path, allow: tuple[Path, ...]) -> AgentPair:
        return AgentPair.create(root, allow, prefix=self.netns.prefix())


@dataclass
class LinkNet:
    """Source side in one namespace, destination side in another, joined by a shaped veth."""

    veth: NetnsLink

    @property
    def link(self) -> str:
        return self.veth.rate or "veth"

    @property
    def dest_host(self) -> str:
        return self.veth.addresses[1]

    @property
    def wire_from(self) -> str | None:
        return "veth"

    def prefix(self, side: int) -> list[str]:
        return self.veth.prefix_argv(side)

    def wire_bytes(self) -> int | None:
        return sum(self.veth.device_bytes())

    def agent_pair(self, root: Path, allow: tuple[Path, ...]) -> AgentPair:
        return AgentPair.create(root, allow, link=self.veth)


def bench_link(rate: str) -> NetnsLink:
    return NetnsLink(rate=rate, name_prefix=f"ferry-bench-{os.getpid()}-")


@contextlib.contextmanager
def row_network(rate: str | None, note: Callable[[str], None]) -> Iterator[RowNet]:
    """The row's network, removed on the way out (after what runs in it is gone)."""
    if rate is None:
        net = LoopbackNet()
        try:
            if not net.netns.create():
                note("no network namespace here: wire bytes are the tools' own counts")
            yield net
        finally:
            net.netns.delete()
    else:
        veth = bench_link(rate)
        try:
            veth.create()
            yield LinkNet(veth)
        finally:
            veth.delete()


# ---------------------------------------------------------------------------- QEMU native

def qemu_caps(mode: str) -> dict[str, Any]:
    names = ["events"] + (["multifd"] if mode == "multifd-zstd" else [])
    return {"capabilities": [{"capability": n, "state": True} for n in names]}


def qemu_params(mode: str) -> dict[str, Any]:
    if mode not in QEMU_MODES:
        raise ValueError(f"unknown QEMU mode {mode!r}")
    params: dict[str, Any] = {"max-bandwidth": QEMU_MAX_BANDWIDTH,
                              "downtime-limit": DOWNTIME_LIMIT_MS}
    if mode == "multifd-zstd":
        params.update({"multifd-channels": MULTIFD_CHANNELS, "multifd-compression": "zstd"})
    return params


def create_ram_file(path: Path, size: int) -> None:
    """A sparse RAM file of the guest's size (as agent.guest.boot_guest makes)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def qemu_spec(directory: Path, ram_path: Path, case: Case, kernel: Path,
              accel: vm.AccelChoice, *extra: str) -> vm.LaunchSpec:
    directory.mkdir()
    return vm.LaunchSpec(name=VM_NAME, ram_size=case.ram_size, ram_path=ram_path,
                         qmp_path=directory / "qmp.sock", serial_path=directory / "serial.log",
                         pidfile=directory / "qemu.pid", log_path=directory / "qemu.log",
                         kernel=kernel, extra_args=extra, accel=accel)


def private_ram_argv(argv: Sequence[str]) -> list[str]:
    """QEMU's usual setup: the same command line with plain `-m` RAM (private, anonymous)."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        value = next(args, None) if arg in ("-object", "-machine") else None
        if arg == "-object" and value is not None and value.startswith(f"{vm.RAM_BACKEND_TYPE},"):
            continue
        if arg == "-machine" and value is not None:
            value = ",".join(p for p in value.split(",") if not p.startswith("memory-backend="))
        out += [arg] if value is None else [arg, value]
    return out


async def launch_on(net: RowNet, side: int, spec: vm.LaunchSpec, *,
                    private_ram: bool) -> vm.QemuProcess:
    assert spec.accel is not None
    argv = vm.qemu_argv(spec, spec.accel)
    return await vm.launch(spec, argv=net.prefix(side) + (private_ram_argv(argv) if private_ram
                                                           else argv))


async def completed_info(q: qmp.Qmp) -> dict[str, Any]:
    """query-migrate once QEMU filled in its final figures (they lag the event a little)."""
    deadline = time.monotonic() + 2.0
    while True:
        info: dict[str, Any] = await q.execute("query-migrate")
        if info.get("total-time") or time.monotonic() > deadline:
            return info
        await asyncio.sleep(POLL_S)


async def _qemu_run(case: Case, mode: str, work: Path, shm: Path, accel: vm.AccelChoice,
                    net: RowNet, stack: contextlib.ExitStack,
                    note: Callable[[str], None]) -> dict[str, Any]:
    config = case.config()
    kernel = build_guest(config)
    private = mode in PRIVATE_RAM_MODES
    src_spec = qemu_spec(work / "src", shm / "src.ram", case, kernel, accel)
    dst_spec = qemu_spec(work / "dst", shm / "dst.ram", case, kernel, accel,
                         "-incoming", "defer")
    note(f"qemu {mode}: booting a {case.label} guest")
    if not private:
        create_ram_file(src_spec.ram_path, case.ram_size)
    src = await launch_on(net, 0, src_spec, private_ram=private)
    stack.callback(src.cleanup)
    async with qmp.connect(src_spec.qmp_path) as src_q:
        src_guest = QmpGuest(src_q, shm) if private else FileGuest(src_spec.ram_path)
        await wait_first_pass(src_guest, config, lambda: src.returncode is None)
        digest = await src_guest.fill_digest(config)
        note(f"qemu {mode}: migrating over {net.link}")

        started = time.monotonic()
        src_cpu_before = proc_cpu_seconds(src.pid)
        dst = await launch_on(net, 1, dst_spec, private_ram=private)
        stack.callback(dst.cleanup)
        async with qmp.connect(dst_spec.qmp_path) as dst_q:
            for q in (src_q, dst_q):
                await q.execute("migrate-set-capabilities", qemu_caps(mode))
                await q.execute("migrate-set-parameters", qemu_params(mode))
            uri = f"tcp:{net.dest_host}:{free_port()}"
            await dst_q.execute("migrate-incoming", {"uri": uri})
            prepared = time.monotonic()
            wire_before = net.wire_bytes()
            src_mark, dst_mark = src_q.event_mark(), dst_q.event_mark()
            await src_q.execute("migrate", {"uri": uri})
            end = await src_q.wait_event(
                "MIGRATION", after=src_mark, timeout=MIGRATE_TIMEOUT_S,
                match=lambda ev: ev.data.get("status") in ("completed", "failed", "cancelled"))
            if end.data["status"] != "completed":
                info = await src_q.execute("query-migrate")
                raise BenchError(f"QEMU migration {end.data['status']}: "
                                 f"{info.get('error-desc', 'no detail')}")
            resume = await dst_q.wait_event("RESUME", after=dst_mark, timeout=RESUME_TIMEOUT_S)
            finished = time.monotonic()
            wire_after = net.wire_bytes()
            cpu = {"src_qemu_cpu_s": cpu_delta(proc_cpu_seconds(src.pid), src_cpu_before),
                   "dst_qemu_cpu_s": proc_cpu_seconds(dst.pid)}
            info = await completed_info(src_q)
            stops = src_q.events("STOP", after=src_mark)
            if not stops:
                raise BenchError("the source QEMU sent no STOP event during its migration")
            downtime_ms = (resume.timestamp_us - stops[0].timestamp_us) / 1000
            dst_guest = QmpGuest(dst_q, shm) if private else FileGuest(dst_spec.ram_path)
            check = await verify_destination(dst_guest, config, digest)
            dst_verified = proc_cpu_seconds(dst.pid)
    ram = info.get("ram", {})
    wire = None if wire_before is None or wire_after is None else wire_after - wire_before
    return make_row(
        "qemu", mode, case, link=net.link, total_ms=(finished - started) * 1000,
        downtime_ms=downtime_ms, wire_bytes=wire if wire is not None else ram.get("transferred"),
        ok=check.pop("guest_ok"), cpu=cpu,
        wire_bytes_from=net.wire_from if wire is not None else "QEMU ram.transferred",
        qemu_total_ms=info.get("total-time"), qemu_downtime_ms=info.get("downtime"),
        qemu_setup_ms=info.get("setup-time"),
        dest_prepare_ms=round((prepared - started) * 1000, 1),
        qemu_ram_transferred=ram.get("transferred"), dirty_syncs=ram.get("dirty-sync-count"),
        normal_pages=ram.get("normal"), duplicate_pages=ram.get("duplicate"),
        dst_qemu_cpu_verified_s=None if dst_verified is None else round(dst_verified, 2),
        **check)


def qemu_row(case: Case, mode: str, note: Callable[[str], None],
             rate: str | None = None) -> dict[str, Any]:
    """QEMU's own migration of a fresh guest; everything it started is gone afterwards."""
    accel = vm.choose_accel()
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="ferry-bench-", dir=vm.SHM_DIR))
    try:
        with contextlib.ExitStack() as stack:   # kills both QEMUs, even on Ctrl-C
            # Entered first, so removed last: after the QEMUs in it are gone.
            net = stack.enter_context(row_network(rate, note))
            return run_async(_qemu_run(case, mode, work, shm, accel, net, stack, note))
    except FerryError as exc:
        return failed_row("qemu", mode, case, str(exc), link=link_label(rate))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


# ---------------------------------------------------------------------------- ferry

def ferry_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def migration_log(pair: AgentPair) -> list[str]:
    """Both agents' INFO lines about the migration (where ferry's time went)."""
    lines = []
    for name, text in (("a", pair.a.log()), ("b", pair.b.log())):
        lines += [f"{name}: {line.split(': ', 2)[-1]}" for line in text.splitlines()
                  if " INFO agent.migration." in line]
    return lines


async def source_ready(record: vms.VmRecord, config: GuestConfig, scratch: Path) -> str:
    """Wait for the source guest's first pass; its fill digest. Leaves no QMP session open
    (QEMU serves one client at a time, and the agent needs it)."""
    if record.ram_path:
        guest: GuestView = FileGuest(record.ram_path)
        await wait_first_pass(guest, config, record.alive)
        return await guest.fill_digest(config)
    async with qmp.connect(record.qmp_path) as monitor:
        guest = QmpGuest(monitor, scratch)
        await wait_first_pass(guest, config, record.alive)
        return await guest.fill_digest(config)


def ferry_row(case: Case, note: Callable[[str], None], rate: str | None = None,
              ram: str = "private", ferry_args: Sequence[str] = (),
              dest_ram_dir: Path | None = None) -> dict[str, Any]:
    """ferry's migration of a fresh guest between two agents (loopback or across the link).
    With `ferry_args` the row is mode CUSTOM_MODE: the targets judge ferry's defaults only.
    With `dest_ram_dir` the destination agent's ram_dir is a fresh directory in it."""
    mode = CUSTOM_MODE if ferry_args else FERRY_MODE
    config = case.config()
    link = link_label(rate)
    root = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    scratch = Path(tempfile.mkdtemp(prefix="ferry-bench-", dir=vm.SHM_DIR))
    adopted_pids: list[int] = []
    try:
        with contextlib.ExitStack() as stack:
            # Unwound in reverse: subreaper off, agents and QEMUs gone, zombies reaped,
            # then the namespaces removed.
            net = stack.enter_context(row_network(rate, note))
            stack.callback(reap, adopted_pids)
            pair = net.agent_pair(root, allow=(default_cache_dir(),))
            stack.callback(pair.cleanup)
            if dest_ram_dir is not None:
                pair.b.use_ram_dir(Path(tempfile.mkdtemp(prefix="ferry-bench-",
                                                         dir=dest_ram_dir)))
                stack.callback(shutil.rmtree, pair.b.ram_dir, ignore_errors=True)
            adopted = stack.enter_context(subreaper())
            kernel = build_guest(config)
            # No health window: the guest's seconds at the destination after the resume
            # would count as the destination QEMU's CPU of the migration.
            with open(pair.b.home / "agent.toml", "a") as f:
                f.write("health_window_s = 0\n")
            pair.start()
            note(f"ferry {mode}: booting a {case.label} guest ({ram} RAM)")
            started = subprocess.run(
                net.prefix(0) + ferry_argv(
                    "vm", "start", VM_NAME, "--memory", case.memory_arg, "--ram", ram,
                    "--home", str(pair.a.home), "--", "-kernel", str(kernel)),
                capture_output=True, text=True, check=False)
            if started.returncode != 0:
                raise BenchError(f"ferry vm start --memory {case.memory_arg} --ram {ram} "
                                 f"failed: {started.stderr.strip()}")
            source = pair.a.vm_record(VM_NAME)
            adopted_pids.append(source.pid)
            pair.extra_pids.append(source.pid)    # its record goes once it migrated
            digest = run_async(source_ready(source, config, scratch))
            note(f"ferry {mode}: migrating over {link}")

            agents_before, src_before = pair.cpu_seconds(), proc_cpu_seconds(source.pid)
            wire_before = net.wire_bytes()
            rc, report, stderr = pair.migrate(VM_NAME, *ferry_args, timeout=MIGRATE_TIMEOUT_S)
            wire_after = net.wire_bytes()
            agents_after = pair.cpu_seconds()
            cpu = {"src_agent_cpu_s": cpu_delta(agents_after[0], agents_before[0]),
                   "dst_agent_cpu_s": cpu_delta(agents_after[1], agents_before[1])}
            logged = migration_log(pair)
            if rc != 0 or report.get("status") != "completed":
                cpu["src_qemu_cpu_s"] = cpu_delta(proc_cpu_seconds(source.pid), src_before)
                why = (report.get("error") or " ".join(stderr.strip().splitlines()[-1:])
                       or f"exit {rc}")
                return failed_row("ferry", mode, case, f"ferry migrate: {why}",
                                  link=link, cpu=cpu, report=report, agent_log=logged,
                                  source_ram=ram)
            src_after = wait_exit_cpu(source.pid, SOURCE_EXIT_TIMEOUT_S) if adopted else None
            cpu["src_qemu_cpu_s"] = cpu_delta(
                src_after if src_after is not None else proc_cpu_seconds(source.pid),
                src_before)
            dest_pid = int(report.get("dest_pid") or 0)
            cpu["dst_qemu_cpu_s"] = proc_cpu_seconds(dest_pid) if dest_pid else None
            dest = pair.b.vm_record(VM_NAME)
            check = run_async(verify_destination(FileGuest(dest.ram_path), config, digest))
            dst_verified = proc_cpu_seconds(dest_pid) if dest_pid else None
            wire = (None if wire_before is None or wire_after is None
                    else wire_after - wire_before)
            return make_row(
                "ferry", mode, case, link=link, total_ms=report.get("total_ms"),
                downtime_ms=report.get("downtime_ms"),
                wire_bytes=wire if wire is not None else report.get("wire_bytes"),
                ok=check.pop("guest_ok"), cpu=cpu, source_ram=ram,
                ferry_args=" ".join(ferry_args),
                dest_ram=None if dest_ram_dir is None else (
                    f"{dest_ram_dir} (huge pages)" if huge_pages(dest_ram_dir)
                    else str(dest_ram_dir)),
                wire_bytes_from=net.wire_from if wire is not None else "ferry report",
                ferry_wire_bytes=report.get("wire_bytes"), rounds=report.get("rounds"),
                compression_ratio=report.get("compression_ratio"),
                data_pages=report.get("data_pages"), zero_pages=report.get("zero_pages"),
                dedup_pages=report.get("dedup_pages"),
                unchanged_pages=report.get("unchanged_pages"),
                device_state_bytes=report.get("device_state_bytes"),
                qemu_downtime_ms=report.get("qemu_downtime_ms"),
                switchover_ms=report.get("switchover_ms"),
                dst_qemu_cpu_verified_s=None if dst_verified is None else round(dst_verified, 2),
                report=report, agent_log=logged, **check)
    except (FerryError, RuntimeError) as exc:     # RuntimeError: an agent did not start
        return failed_row("ferry", mode, case, str(exc), link=link, source_ram=ram)
    except subprocess.TimeoutExpired:
        return failed_row("ferry", mode, case,
                          f"ferry migrate did not finish within {MIGRATE_TIMEOUT_S:g} s",
                          link=link, source_ram=ram)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------- driver

def run_rows(cases: Sequence[Case], only: Sequence[str], note: Callable[[str], None],
             repeat: int = 1, rate: str | None = None,
             ferry_ram: str = "private", ferry_args: Sequence[str] = (),
             dest_ram_dir: Path | None = None) -> Iterator[dict[str, Any]]:
    """Every row of every case, `repeat` times, in ROW_NAMES order (ferry between QEMU modes).

    Repeats are interleaved (all kinds, then all kinds again) so that load from other work
    on the machine falls on every kind alike.
    """
    for case in cases:
        for run in range(1, repeat + 1):
            for name in ROW_NAMES:
                if only and name not in only:
                    continue
                tool, mode = name.split("-", 1)
                row = (ferry_row(case, note, rate, ferry_ram, ferry_args, dest_ram_dir)
                       if tool == "ferry"
                       else qemu_row(case, mode, note, rate))
                row["run"] = run
                yield row


def save(rows: Sequence[dict[str, Any]], cases: Sequence[Case], link: str,
         meta: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"migrate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    judged = [v.as_json() | {"judged": True}
              for v in verdicts(rows, [c for c in cases if c.target], link)]
    info = [v.as_json() | {"judged": False}
            for v in (verdicts(rows, [c for c in cases if not c.target], link)
                      + verdicts(rows, cases, link, info_targets_for(link)))]
    path.write_text(json.dumps({
        **meta, "link": link, "rows": rows, "verdicts": judged + info,
        "targets_met": targets_met(rows, cases, link)}, indent=1) + "\n")
    return path


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = bench_parser("migrate", __doc__)
    parser.add_argument("--quick", action="store_true",
                        help="only the judged guests, 1 GiB and 4 GiB (one row per tool "
                             "and mode each)")
    parser.add_argument("--case", action="append", type=int, default=[], metavar="MIB",
                        help="only the guests of this size in MiB, e.g. 1024 or 4096 "
                             "(repeatable)")
    parser.add_argument("--link", metavar="RATE",
                        help="migrate across two network namespaces joined by a veth pair "
                             "shaped to RATE with tbf (e.g. 1gbit) instead of loopback")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--only", action="append", choices=ROW_NAMES, default=[],
                        help="run only this row kind (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run every row N times; verdicts compare medians (default 1)")
    parser.add_argument("--ferry-ram", choices=FERRY_RAM_CHOICES, default="private",
                        help="RAM of ferry's source guest: plain -m private memory, as qemu "
                             "plain-private (default), or a shared file")
    parser.add_argument("--ferry-dest-ram-dir", type=Path, metavar="DIR",
                        help="keep the destination agent's RAM files in DIR (its ram_dir), "
                             "e.g. a tmpfs mounted with huge=within_size (README, 'Start VMs')")
    parser.add_argument("--ferry-arg", action="append", default=[], metavar="ARG",
                        help="pass ARG on to `ferry migrate` (repeatable; e.g. "
                             "--ferry-arg=--compress --ferry-arg=zstd:1): the ferry row is then "
                             "'ferry custom', shown but not judged against the targets")
    parser.add_argument("--no-save", action="store_true",
                        help=f"do not write the results to {RESULTS_DIR}/")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.link is not None:
        try:
            rate_bits(args.link)
        except ValueError as exc:
            parser.error(f"--link: {exc}")
    args.cases = select_cases(QUICK_CASES if args.quick else FULL_CASES, args.case)
    if not args.cases:
        sizes = sorted({c.guest_mib for c in (QUICK_CASES if args.quick else FULL_CASES)})
        parser.error(f"--case: no guest of that size here (sizes: "
                     f"{', '.join(map(str, sizes))} MiB)")
    return args


def main(argv: Sequence[str]) -> int:
    """`python -m bench migrate`: 0 when the targets hold, 1 when not, 130 on Ctrl-C."""
    args = parse_args(argv)
    cases: tuple[Case, ...] = args.cases
    link = link_label(args.link)

    def note(text: str) -> None:
        print(f"bench migrate: {text}", file=sys.stderr, flush=True)

    accel = vm.choose_accel()
    meta: dict[str, Any] = {"accel": accel.accel.value, "accel_reason": accel.reason,
                            "cpus": os.cpu_count(), "load_before": os.getloadavg(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    note(f"accelerator {accel.accel.value} ({accel.reason}); link {link}; load average "
         f"{' '.join(f'{x:.2f}' for x in meta['load_before'])} on {os.cpu_count()} CPUs")
    rows: list[dict[str, Any]] = []
    try:
        with sigterm_as_interrupt():
            for row in run_rows(cases, args.only, note, args.repeat, args.link,
                                args.ferry_ram, args.ferry_arg, args.ferry_dest_ram_dir):
                rows.append(row)
                note(f"{row['tool']} {row['mode']}: total {row['total_ms']} ms, downtime "
                     f"{row['downtime_ms']} ms, ok {row['ok']}"
                     + (f" ({row['error']})" if row.get("error") else ""))
    except KeyboardInterrupt:
        note("interrupted; everything started was cleaned up")
        return 130
    meta["load_after"] = os.getloadavg()
    if not args.no_save:
        note(f"results saved to {save(rows, cases, link, meta)}")
    if args.json:
        print(json.dumps([{k: v for k, v in row.items() if k not in LOG_KEYS} for row in rows],
                         indent=1))
    else:
        print(f"accelerator {meta['accel']}; load average before "
              f"{meta['load_before'][0]:.2f}, after {meta['load_after'][0]:.2f} "
              f"({meta['cpus']} CPUs)")
        print(table(rows, cases, link))
    return 0 if targets_met(rows, cases, link) else 1

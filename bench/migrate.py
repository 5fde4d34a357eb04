"""ferry's live migration against QEMU's own, same guest, same machine, measured in one run.

    python -m bench migrate [--quick] [--json] [--repeat N] [--only ROW] [--no-save]

Each row boots a fresh self-checking test guest (agent.guest) that fills part of its RAM
at boot and then rewrites a working set at a fixed rate, waits until it completed a pass,
and migrates it over loopback:

- ferry default: two real agents (agent.localpair), `ferry vm start` + `ferry migrate
  NAME --to hostb --json`; total, downtime and wire bytes come from ferry's report.
- qemu plain / qemu multifd-zstd: QEMU's own migration from the same guest (shared RAM
  file, x-ignore-shared off so QEMU copies RAM itself) to a second QEMU with the same
  argv plus `-incoming defer`, over tcp:127.0.0.1. max-bandwidth 100 GB/s, downtime-limit
  300 ms (ferry's default); multifd-zstd adds multifd with 2 channels and zstd on both.
- qemu plain-private: as plain, but with QEMU's usual private anonymous RAM (`-m` only)
  on both sides. The shared file ferry needs makes QEMU's own migration slower here
  (1.5-2.5x the total time, measured), so this row shows ferry against QEMU at its best;
  the guest is then read over QMP (HMP `xp`, `pmemsave`) instead of from the file.

Equal terms (DESIGN §7): QEMU < 9.0 under TCG loses dirty pages in its own migration when
a RAM block is a multiple of 64 pages, so every guest has N MiB + 8 KiB of RAM, for
ferry too. Downtime is the same for every row: QMP event time STOP on the source to
RESUME on the destination (QEMU's own timestamps). total_ms includes preparing the
destination: ferry's report counts from the source agent taking the job (it then connects
and has the destination QEMU started) until the guest runs on the destination and the
source QEMU quit; the QEMU figure counts from launching the destination QEMU until the
guest RESUMEd there, and QEMU's own `total-time` (`migrate` to completion) is kept as
qemu_total_ms. ok means the destination guest kept running for two full passes over its
working set with 0 errors, and its boot-time fill arrived intact (XXH3-128 before/after).

QEMU's wire bytes are what crossed the loopback of a private network namespace both QEMUs
run in (QEMU 7.2 counts multifd pages before compression); ferry's come from its report.

Targets (1 GiB guest dirtying ~20 MiB/s): ferry's downtime <= QEMU plain's and ferry's
total <= 1.5x QEMU plain's; the same ratios against plain-private are printed for
information. Exit code 0 when met, 1 when not (or a row failed), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import xxhash

from agent.guest.workload import guest_config
from agent.errors import FerryError
from agent.guest import (
    MAILBOX_ADDR,
    PAGE_SIZE,
    GuestConfig,
    MailboxState,
    build_guest,
    read_mailbox,
)
from agent.guest.build import default_cache_dir
from agent.localpair import AgentPair, free_port, read_guest
from agent.qemu import qmp, vm
from bench import parser as bench_parser

MIB = 1 << 20
KIB = 1 << 10
# DESIGN §7: a RAM block that is not a multiple of 64 pages keeps QEMU 7.2's TCG dirty log
# correct; +8 KiB (2 pages) does that and changes nothing else about the guest.
RAM_EXTRA = 8 * KIB
VM_NAME = "bench"
FERRY_MODE = "default"
# plain-private: QEMU's usual setup (plain `-m` RAM, private and anonymous) instead of the
# shared file ferry needs; the file costs QEMU time here (see the module docstring).
QEMU_MODES = ("plain", "multifd-zstd", "plain-private")
PRIVATE_RAM_MODES = ("plain-private",)
ROW_KEYS = ("tool", "mode", "guest_mib", "dirty_mib_s", "total_ms", "downtime_ms",
            "wire_bytes", "ok")
# QEMU's parameters for the baseline: bandwidth unlimited in practice, ferry's default
# downtime limit, and for multifd the channel count of a 2-core machine.
QEMU_MAX_BANDWIDTH = 100 * 10**9
DOWNTIME_LIMIT_MS = 300
MULTIFD_CHANNELS = 2
# Targets, checked on the target case (a 1 GiB guest at the base dirty rate) against QEMU
# plain on the same shared-file guest; the same ratios against QEMU with private RAM are
# printed for information.
TARGET_BASELINE = "plain"
INFO_BASELINES = ("plain-private",)
DOWNTIME_RATIO_MAX = 1.0
TOTAL_RATIO_MAX = 1.5
# Boot: SeaBIOS + clock calibration (~0.2 s) and the fill at >= 10k pages/s on a slow host.
BOOT_TIMEOUT_S = 10.0
FILL_PAGES_PER_S_FLOOR = 10_000
MIGRATE_TIMEOUT_S = 120.0
RESUME_TIMEOUT_S = 15.0
# After the switchover the guest must finish this many full passes over its working set:
# the pass cut by the migration, then one that checks every page written before it.
VERIFY_PASSES = 2
POLL_S = 0.02
# The mailbox's status and config words (mailbox.py: 0x00 .. 0x57).
MAILBOX_WORDS = 0x58 // 4
MAILBOX_BYTES = MAILBOX_ADDR + MAILBOX_WORDS * 4
# Long per-row fields kept in the saved results but not printed.
LOG_KEYS = ("round_log", "agent_log", "report")
RESULTS_DIR = Path(__file__).with_name("results")
ROUND_LINE = re.compile(r"migration \w+ (?:round (?P<round>\d+)|(?P<final>final) round): "
                        r"(?P<pages>\d+) pages in (?P<send>\d+) ms after a (?P<scan>\d+) ms scan")


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
QUICK_CASES = (BASE_CASE,)
FULL_CASES = (BASE_CASE, Case(guest_mib=256, fill_mib=128, rate=5000),
              Case(guest_mib=1024, fill_mib=512, rate=20000))
ROW_NAMES = ("qemu-plain", "ferry-default", "qemu-multifd-zstd", "qemu-plain-private")


def make_row(tool: str, mode: str, case: Case, *, total_ms: float | None,
             downtime_ms: float | None, wire_bytes: int | None, ok: bool,
             **extra: Any) -> dict[str, Any]:
    """One result row: the common keys in order, then tool-specific extras."""
    row: dict[str, Any] = {
        "tool": tool, "mode": mode, "guest_mib": case.guest_mib,
        "dirty_mib_s": case.dirty_mib_s,
        "total_ms": None if total_ms is None else round(total_ms, 1),
        "downtime_ms": None if downtime_ms is None else round(downtime_ms, 1),
        "wire_bytes": wire_bytes, "ok": bool(ok),
    }
    row.update(extra)
    return row


def failed_row(tool: str, mode: str, case: Case, error: str, **extra: Any) -> dict[str, Any]:
    return make_row(tool, mode, case, total_ms=None, downtime_ms=None, wire_bytes=None,
                    ok=False, error=error, **extra)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One target: ferry's figure against the limit set by a QEMU row's, for one case."""

    name: str            # "downtime" or "total"
    baseline: str        # the QEMU mode compared with
    guest_mib: int
    dirty_mib_s: float
    ferry: float | None
    qemu: float | None
    max_ratio: float
    met: bool
    why: str = ""        # set when the rows cannot be compared
    runs: int = 1        # figures are medians when more than one

    @property
    def ratio(self) -> float | None:
        if self.ferry is None or not self.qemu:
            return None
        return self.ferry / self.qemu

    def text(self) -> str:
        head = (f"{self.name:<8} ferry <= {self.max_ratio:g}x qemu {self.baseline} "
                f"({self.guest_mib} MiB, {self.dirty_mib_s:g} MiB/s): ")
        if self.why:
            return head + f"NOT met: {self.why}"
        median = "medians " if self.runs > 1 else ""
        return head + (f"{'met' if self.met else 'NOT met'} ({median}{self.ferry:.0f} ms vs "
                       f"{self.qemu:.0f} ms, ratio {self.ratio:.2f})")


def _group(rows: Iterable[dict[str, Any]], tool: str, mode: str,
           case: Case) -> list[dict[str, Any]]:
    return [row for row in rows
            if (row["tool"], row["mode"], row["guest_mib"], row["dirty_mib_s"]) == (
                tool, mode, case.guest_mib, case.dirty_mib_s)]


def verdicts(rows: Sequence[dict[str, Any]], cases: Iterable[Case],
             baseline: str = TARGET_BASELINE) -> list[Verdict]:
    """The two targets for every case that has both ferry and QEMU `baseline` rows.

    With repeated runs each side's figure is its median. A failed row (not ok, or a figure
    missing) fails the target: a baseline that lost the guest is no baseline, and a ferry
    run that did is no result.
    """
    out = []
    for case in cases:
        ferry = _group(rows, "ferry", FERRY_MODE, case)
        qemu_rows = _group(rows, "qemu", baseline, case)
        if not ferry or not qemu_rows:
            continue
        for name, key, max_ratio in (("downtime", "downtime_ms", DOWNTIME_RATIO_MAX),
                                     ("total", "total_ms", TOTAL_RATIO_MAX)):
            f_values = [row[key] for row in ferry]
            q_values = [row[key] for row in qemu_rows]
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
            met = f is not None and q is not None and f <= max_ratio * q
            out.append(Verdict(name=name, baseline=baseline, guest_mib=case.guest_mib,
                               dirty_mib_s=case.dirty_mib_s, ferry=f, qemu=q,
                               max_ratio=max_ratio, met=met, why=why,
                               runs=min(len(ferry), len(qemu_rows))))
    return out


def targets_met(rows: Sequence[dict[str, Any]], cases: Sequence[Case]) -> bool:
    """True when every target case has its verdicts and all of them are met."""
    judged = [c for c in cases if c.target]
    found = verdicts(rows, judged)
    return bool(found) and len(found) == 2 * len(judged) and all(v.met for v in found)


def table(rows: Sequence[dict[str, Any]], cases: Sequence[Case]) -> str:
    """The rows as a readable table, then the target verdicts."""
    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [(f"{'tool':<6} {'mode':<13} {'guest':>6} {'dirty':>7} {'total':>8} "
              f"{'downtime':>9} {'wire':>9} {'ok':>3}  notes"),
             f"{'':<6} {'':<13} {'MiB':>6} {'MiB/s':>7} {'ms':>8} {'ms':>9} {'MiB':>9}"]
    repeated = any(row.get("run", 1) > 1 for row in rows)
    for row in rows:
        wire = None if row["wire_bytes"] is None else row["wire_bytes"] / MIB
        notes = [f"run {row.get('run', 1)}"] if repeated else []
        if row["tool"] == "qemu" and row.get("qemu_total_ms") is not None:
            notes.append(f"QEMU's own: total {row['qemu_total_ms']} ms, "
                         f"downtime {row['qemu_downtime_ms']} ms")
        if row["tool"] == "ferry" and row.get("rounds") is not None:
            notes.append(f"{row['rounds']} rounds")
        if row.get("error"):
            notes.append(f"error: {row['error']}")
        elif not row["ok"]:
            notes.append(f"guest: errors {row.get('guest_errors')}, passes after "
                         f"{row.get('passes_after')}, fill intact {row.get('fill_intact')}")
        lines.append(f"{row['tool']:<6} {row['mode']:<13} {row['guest_mib']:>6} "
                     f"{row['dirty_mib_s']:>7.1f} {num(row['total_ms'], '8.0f')} "
                     f"{num(row['downtime_ms'], '9.1f')} {num(wire, '9.1f')} "
                     f"{'yes' if row['ok'] else 'NO':>3}  {'; '.join(notes)}")
    judged = {(c.guest_mib, c.dirty_mib_s) for c in cases if c.target}
    for baseline in (TARGET_BASELINE, *INFO_BASELINES):
        for verdict in verdicts(rows, cases, baseline):
            is_target = (baseline == TARGET_BASELINE
                         and (verdict.guest_mib, verdict.dirty_mib_s) in judged)
            lines.append(("target  " if is_target else "(info)  ") + verdict.text())
    lines.append(f"targets: {'met' if targets_met(rows, cases) else 'NOT met'}")
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
    _buffer: bytearray = field(default_factory=lambda: bytearray(MAILBOX_BYTES))

    async def mailbox(self) -> MailboxState:
        text = await self.qmp.hmp(f"xp /{MAILBOX_WORDS}wx {MAILBOX_ADDR:#x}")
        words = [int(word, 16) for line in text.splitlines() if ":" in line
                 for word in line.split(":", 1)[1].split()]
        if len(words) != MAILBOX_WORDS:
            raise BenchError(f"cannot read the guest's mailbox over HMP: {text.strip()!r}")
        struct.pack_into(f"<{MAILBOX_WORDS}I", self._buffer, MAILBOX_ADDR, *words)
        return read_mailbox(self._buffer)

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


class NetNs:
    """A private network namespace whose loopback counts exactly the bytes QEMU migrates.

    QEMU 7.2 counts multifd pages before compression (ram.transferred, multifd-bytes), so
    its own figure overstates what multifd-zstd sends; the namespace's lo counter does not.
    Loopback in a namespace is the same kernel path as the host's.
    """

    def __init__(self) -> None:
        self.name = f"ferry-bench-{os.getpid()}-{os.urandom(3).hex()}"
        self.created = False

    def create(self) -> bool:
        """Create it with lo up; False (and nothing left behind) where we may not."""
        if shutil.which("ip") is None:
            return False
        made = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, check=False)
        if made.returncode != 0:
            return False
        self.created = True
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


async def launch_in(netns: NetNs, spec: vm.LaunchSpec, *, private_ram: bool) -> vm.QemuProcess:
    assert spec.accel is not None
    argv = vm.qemu_argv(spec, spec.accel)
    return await vm.launch(spec, argv=netns.prefix() + (private_ram_argv(argv) if private_ram
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
                    netns: NetNs, stack: contextlib.ExitStack,
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
    src = await launch_in(netns, src_spec, private_ram=private)
    stack.callback(src.cleanup)
    async with qmp.connect(src_spec.qmp_path) as src_q:
        src_guest = QmpGuest(src_q, shm) if private else FileGuest(src_spec.ram_path)
        await wait_first_pass(src_guest, config, lambda: src.returncode is None)
        digest = await src_guest.fill_digest(config)
        note(f"qemu {mode}: migrating")

        started = time.monotonic()
        dst = await launch_in(netns, dst_spec, private_ram=private)
        stack.callback(dst.cleanup)
        async with qmp.connect(dst_spec.qmp_path) as dst_q:
            for q in (src_q, dst_q):
                await q.execute("migrate-set-capabilities", qemu_caps(mode))
                await q.execute("migrate-set-parameters", qemu_params(mode))
            uri = f"tcp:127.0.0.1:{free_port()}"
            await dst_q.execute("migrate-incoming", {"uri": uri})
            prepared = time.monotonic()
            rx_before = netns.lo_rx_bytes() if netns.created else 0
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
            wire = netns.lo_rx_bytes() - rx_before if netns.created else None
            info = await completed_info(src_q)
            stops = src_q.events("STOP", after=src_mark)
            if not stops:
                raise BenchError("the source QEMU sent no STOP event during its migration")
            downtime_ms = (resume.timestamp_us - stops[0].timestamp_us) / 1000
            dst_guest = QmpGuest(dst_q, shm) if private else FileGuest(dst_spec.ram_path)
            check = await verify_destination(dst_guest, config, digest)
    ram = info.get("ram", {})
    return make_row(
        "qemu", mode, case, total_ms=(finished - started) * 1000, downtime_ms=downtime_ms,
        wire_bytes=wire if wire is not None else ram.get("transferred"),
        ok=check.pop("guest_ok"),
        wire_bytes_from="netns loopback" if wire is not None else "QEMU ram.transferred",
        qemu_total_ms=info.get("total-time"), qemu_downtime_ms=info.get("downtime"),
        qemu_setup_ms=info.get("setup-time"),
        dest_prepare_ms=round((prepared - started) * 1000, 1),
        qemu_ram_transferred=ram.get("transferred"), dirty_syncs=ram.get("dirty-sync-count"),
        normal_pages=ram.get("normal"), duplicate_pages=ram.get("duplicate"), **check)


def qemu_row(case: Case, mode: str, note: Callable[[str], None]) -> dict[str, Any]:
    """QEMU's own migration of a fresh guest; everything it started is gone afterwards."""
    accel = vm.choose_accel()
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="ferry-bench-", dir=vm.SHM_DIR))
    netns = NetNs()
    try:
        with contextlib.ExitStack() as stack:   # kills both QEMUs, even on Ctrl-C
            stack.callback(netns.delete)        # runs last, after the QEMUs in it are gone
            if not netns.create():
                note("no network namespace here: QEMU's wire bytes are its own ram.transferred")
            return asyncio.run(_qemu_run(case, mode, work, shm, accel, netns, stack, note))
    except FerryError as exc:
        return failed_row("qemu", mode, case, str(exc))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


# ---------------------------------------------------------------------------- ferry

def ferry_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def round_log(agent_log: str) -> list[dict[str, Any]]:
    """The source agent's per-round INFO lines: pages, send ms and scan ms of each round."""
    rounds = []
    for match in ROUND_LINE.finditer(agent_log):
        rounds.append({"round": "final" if match["final"] else int(match["round"]),
                       "pages": int(match["pages"]), "send_ms": int(match["send"]),
                       "scan_ms": int(match["scan"])})
    return rounds


def migration_log(pair: AgentPair) -> list[str]:
    """Both agents' INFO lines about the migration (where ferry's time went)."""
    lines = []
    for name, text in (("a", pair.a.log()), ("b", pair.b.log())):
        lines += [f"{name}: {line.split(': ', 2)[-1]}" for line in text.splitlines()
                  if " INFO agent.migration." in line]
    return lines


def ferry_row(case: Case, note: Callable[[str], None]) -> dict[str, Any]:
    """ferry's migration of a fresh guest between two local agents."""
    config = case.config()
    root = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    pair = AgentPair.create(root, allow=(default_cache_dir(),))
    try:
        kernel = build_guest(config)
        pair.start()
        note(f"ferry {FERRY_MODE}: booting a {case.label} guest")
        started = subprocess.run(
            ferry_argv("vm", "start", VM_NAME, "--memory", case.memory_arg, "--home",
                       str(pair.a.home), "--", "-kernel", str(kernel)),
            capture_output=True, text=True, check=False)
        if started.returncode != 0:
            raise BenchError(f"ferry vm start --memory {case.memory_arg} failed: "
                             f"{started.stderr.strip()}")
        source = pair.a.vm_record(VM_NAME)
        asyncio.run(wait_first_pass(FileGuest(source.ram_path), config, source.alive))
        digest = file_fill_digest(source.ram_path, config)
        note(f"ferry {FERRY_MODE}: migrating")
        rc, report, stderr = pair.migrate(VM_NAME, timeout=MIGRATE_TIMEOUT_S)
        rounds, logged = round_log(pair.a.log()), migration_log(pair)
        if rc != 0 or report.get("status") != "completed":
            why = report.get("error") or " ".join(stderr.strip().splitlines()[-1:]) or f"exit {rc}"
            return failed_row("ferry", FERRY_MODE, case, f"ferry migrate: {why}",
                              report=report, round_log=rounds, agent_log=logged)
        dest = pair.b.vm_record(VM_NAME)
        check = asyncio.run(verify_destination(FileGuest(dest.ram_path), config, digest))
        return make_row(
            "ferry", FERRY_MODE, case, total_ms=report.get("total_ms"),
            downtime_ms=report.get("downtime_ms"), wire_bytes=report.get("wire_bytes"),
            ok=check.pop("guest_ok"), rounds=report.get("rounds"),
            compression_ratio=report.get("compression_ratio"),
            data_pages=report.get("data_pages"), zero_pages=report.get("zero_pages"),
            dedup_pages=report.get("dedup_pages"),
            device_state_bytes=report.get("device_state_bytes"), round_log=rounds,
            agent_log=logged, **check)
    except FerryError as exc:
        return failed_row("ferry", FERRY_MODE, case, str(exc))
    except subprocess.TimeoutExpired:
        return failed_row("ferry", FERRY_MODE, case,
                          f"ferry migrate did not finish within {MIGRATE_TIMEOUT_S:g} s")
    finally:
        pair.cleanup()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- driver

def run_rows(cases: Sequence[Case], only: Sequence[str], note: Callable[[str], None],
             repeat: int = 1) -> Iterator[dict[str, Any]]:
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
                row = ferry_row(case, note) if tool == "ferry" else qemu_row(case, mode, note)
                row["run"] = run
                yield row


def save(rows: Sequence[dict[str, Any]], cases: Sequence[Case], meta: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"migrate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        **meta, "rows": rows,
        "verdicts": [{"target": v.name, "baseline": v.baseline, "guest_mib": v.guest_mib,
                      "dirty_mib_s": v.dirty_mib_s, "ferry_ms": v.ferry, "qemu_ms": v.qemu,
                      "max_ratio": v.max_ratio, "met": v.met, "why": v.why}
                     for baseline in (TARGET_BASELINE, *INFO_BASELINES)
                     for v in verdicts(rows, cases, baseline)],
        "targets_met": targets_met(rows, cases)}, indent=1) + "\n")
    return path


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same cleanup as Ctrl-C


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = bench_parser("migrate", __doc__)
    parser.add_argument("--quick", action="store_true",
                        help="only the 1 GiB target case (one row per tool and mode)")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--only", action="append", choices=ROW_NAMES, default=[],
                        help="run only this row kind (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run every row N times; verdicts compare medians (default 1)")
    parser.add_argument("--no-save", action="store_true",
                        help=f"do not write the results to {RESULTS_DIR}/")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    """`python -m bench migrate`: 0 when the targets hold, 1 when not, 130 on Ctrl-C."""
    args = parse_args(argv)
    cases = QUICK_CASES if args.quick else FULL_CASES

    def note(text: str) -> None:
        print(f"bench migrate: {text}", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGTERM, _terminate)
    accel = vm.choose_accel()
    meta: dict[str, Any] = {"accel": accel.accel.value, "accel_reason": accel.reason,
                            "cpus": os.cpu_count(), "load_before": os.getloadavg(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    note(f"accelerator {accel.accel.value} ({accel.reason}); load average "
         f"{' '.join(f'{x:.2f}' for x in meta['load_before'])} on {os.cpu_count()} CPUs")
    rows: list[dict[str, Any]] = []
    try:
        for row in run_rows(cases, args.only, note, args.repeat):
            rows.append(row)
            note(f"{row['tool']} {row['mode']}: total {row['total_ms']} ms, downtime "
                 f"{row['downtime_ms']} ms, ok {row['ok']}"
                 + (f" ({row['error']})" if row.get("error") else ""))
    except KeyboardInterrupt:
        note("interrupted; everything started was cleaned up")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    meta["load_after"] = os.getloadavg()
    if not args.no_save:
        note(f"results saved to {save(rows, cases, meta)}")
    if args.json:
        print(json.dumps([{k: v for k, v in row.items() if k not in LOG_KEYS} for row in rows],
                         indent=1))
    else:
        print(f"accelerator {meta['accel']}; load average before "
              f"{meta['load_before'][0]:.2f}, after {meta['load_after'][0]:.2f} "
              f"({meta['cpus']} CPUs)")
        print(table(rows, cases))
    return 0 if targets_met(rows, cases) else 1

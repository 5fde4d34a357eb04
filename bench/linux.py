"""ferry against QEMU's own live migration on a real Linux guest, with a table, JSON and plots.

    python -m bench linux [--quick] [--json] [--out DIR] [--only ROW] [--scenario NAME]
                          [--repeat N]

The guest (bench.linuxguest: Debian's kernel, busybox and a static C workload) fills 3/4
of its RAM (leaving the kernel at least 128 MiB) with pages of realistic compressibility,
rewrites them at the scenario's dirty rate and verifies every page against the generation
it must hold, printing a status line a second on its serial console. Every row boots a
fresh guest with private RAM (`-m`), waits for its first full pass, migrates it, and reads
the destination's console until two more full passes are over. Guests get N MiB + 8 KiB
of RAM for every tool alike (QEMU < 9.0 under TCG loses dirty pages when a RAM block is a
multiple of 64 pages).

Rows (tools and modes):

- ferry-default: two real agents (agent.localpair), `ferry vm start --ram private` and
  `ferry migrate NAME --to hostb --json`; ferry-compress-off adds `--compress off`,
  ferry-dedup-off `--no-dedup`.
- qemu-plain: QEMU's own migration between two QEMUs with the same argv (the destination
  with `-incoming defer`), max-bandwidth 100 GB/s, downtime-limit 300 ms (ferry's default).
- qemu-xbzrle: plain with xbzrle, its cache a quarter of the guest's RAM.
- qemu-multifd-zstd: plain with 2 multifd channels and zstd.

Links: loopback (both sides in one private network namespace), or two namespaces joined
by a veth pair shaped with tbf (agent.localpair.NetnsLink), source side in the first.

Scenarios: `--quick` is the 1 GiB guest dirtying 50 MiB/s on loopback and on 1 Gbit/s,
ferry-default against qemu-plain and qemu-xbzrle. The full run adds every mode, 100 Mbit/s,
a 4 GiB guest, dirty rates 0 and 200 MiB/s, A->B->A (the VM migrated back), and a guest
with a 1 GiB virtio disk (qcow2) whose blocks it rewrites at 5 MiB/s with O_DIRECT and
verifies by O_DIRECT reads: ferry copies it (`--disk-map`), QEMU by its block migration
(the `block` capability, QEMU 7.2) into an empty image of the same size.

Per row: total_ms (ferry: its report, job start to resume; QEMU: launching the destination
to RESUME), downtime_ms (QMP STOP on the source to RESUME on the destination, QEMU's event
timestamps, for every tool), wire_bytes (the namespace's loopback or the veth counters,
both directions, for every tool), CPU seconds of each agent and QEMU, iterations (ferry's
rounds; QEMU's dirty-sync-count), converged (completed within the pre-copy budget: ferry's
default --timeout of 120 s, after which it rolls back; QEMU's migration is cancelled after
as long), and guest_ok (the destination console: two full passes after the resume, every
line 0 errors; with a disk also a full pass over it).

Targets (same run, 1 GiB guest, 50 MiB/s): on 1 Gbit/s ferry's total and wire bytes <=
0.5x qemu-plain's and its downtime <= the best QEMU mode's; on loopback ferry's total <=
1.0x qemu-plain's. A missed target comes with ferry's profile from its report's timeline
(time, CPU and wire rate per phase; time per round).

Output in --out DIR (default bench/results/linux-DATE): results.json, table.md, and PNGs:
bars.png (total, downtime, wire bytes per scenario and tool) and ferry-timeline.png (one
ferry run's timeline, agent.commands.plot). Exit 0 when every judged target is met.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.errors import FerryError, QmpTimeoutError
from agent.guest.build import default_cache_dir
from agent.localpair import AgentPair, free_port, rate_bits
from agent.procfs import cpu_seconds as proc_cpu_seconds
from agent.qemu import qmp, vm
from bench import linuxguest, met_text, run_async, sigterm_as_interrupt
from bench import parser as bench_parser
from bench.linuxguest import LinuxGuest
from bench.migrate import (
    BenchError,
    LinkNet,
    RowNet,
    completed_info,
    cpu_delta,
    reap,
    row_network,
    subreaper,
    wait_exit_cpu,
)

MIB = 1 << 20
KIB = 1 << 10
RAM_EXTRA = 8 * KIB                 # DESIGN §7, for every tool alike
VM_NAME = "bench"
LOOPBACK = "loopback"
FERRY_MODES = {"default": (), "compress-off": ("--compress", "off"),
               "dedup-off": ("--no-dedup",)}
QEMU_MODES = ("plain", "xbzrle", "multifd-zstd")
ROW_NAMES = (*(f"ferry-{m}" for m in FERRY_MODES), *(f"qemu-{m}" for m in QEMU_MODES))
QEMU_MAX_BANDWIDTH = 100 * 10**9
DOWNTIME_LIMIT_MS = 300
MULTIFD_CHANNELS = 2
XBZRLE_CACHE_SHARE = 4              # the cache is RAM / this
WS_SHARE = (3, 4)                   # the working set is 3/4 of the guest's RAM,
KERNEL_RESERVE_MIB = 128            # leaving at least this to the kernel (a smaller guest)
BOOT_TIMEOUT_S = 60.0
FIRST_PASS_TIMEOUT_S = 60.0
MIGRATE_TIMEOUT_S = 300.0           # ferry migrate's process, whatever happens
# QEMU's pre-copy budget: ferry's default --timeout (120 s), then QEMU's migration is
# cancelled and the row says it did not converge.
QEMU_CONVERGE_TIMEOUT_S = 120.0
RESUME_TIMEOUT_S = 15.0
SOURCE_EXIT_TIMEOUT_S = 10.0
VERIFY_PASSES = 2                   # the pass cut by the switchover, then a whole one
VERIFY_LINES = 3                    # at least this many status lines after the resume
VERIFY_TIMEOUT_S = 60.0
CPU_KEYS = ("src_agent_cpu_s", "dst_agent_cpu_s", "src_qemu_cpu_s", "dst_qemu_cpu_s")
LOG_KEYS = ("report", "agent_log")
RESULTS_DIR = Path(__file__).with_name("results")


# ---------------------------------------------------------------------------- scenarios

@dataclass(frozen=True, slots=True)
class Scenario:
    """One guest on one link, migrated by every row named in `rows`."""

    guest_mib: int
    dirty_mib_s: float
    link: str                       # LOOPBACK or a tc rate such as "1gbit"
    rows: tuple[str, ...]
    round_trip: bool = False        # A -> B, then back B -> A
    disk_mib: int = 0               # a virtio disk (qcow2) of this size, 0: none
    disk_mib_s: float = 0           # its blocks rewritten at this rate

    @property
    def name(self) -> str:
        trip = "-a-b-a" if self.round_trip else ""
        disk = f"-disk{self.disk_mib}M-w{self.disk_mib_s:g}" if self.disk_mib else ""
        return f"{self.guest_mib}M-{self.link}-d{self.dirty_mib_s:g}{disk}{trip}"

    def guest_args(self, guest: LinuxGuest, disk: Path | None) -> list[str]:
        """The QEMU arguments of this scenario's guest, its disk image at `disk`."""
        args = guest.qemu_args(self.ws_mib, self.dirty_mib_s,
                               disk_mib_s=self.disk_mib_s if self.disk_mib else None)
        if self.disk_mib:
            assert disk is not None
            args += ["-drive", f"file={disk},format=qcow2,if=none,id=d0",
                     "-device", "virtio-blk-pci,drive=d0,id=vd0"]
        return args

    @property
    def ws_mib(self) -> int:
        return max(1, min(self.guest_mib * WS_SHARE[0] // WS_SHARE[1],
                          self.guest_mib - KERNEL_RESERVE_MIB))

    @property
    def ram_size(self) -> int:
        return self.guest_mib * MIB + RAM_EXTRA

    @property
    def rate(self) -> str | None:
        return None if self.link == LOOPBACK else self.link


QUICK_ROWS = ("ferry-default", "qemu-plain", "qemu-xbzrle")
QUICK = (Scenario(1024, 50, LOOPBACK, QUICK_ROWS), Scenario(1024, 50, "1gbit", QUICK_ROWS))
FULL = (
    Scenario(1024, 50, LOOPBACK, ROW_NAMES),
    Scenario(1024, 50, "1gbit", ROW_NAMES),
    Scenario(1024, 50, "100mbit", ("ferry-default", "qemu-plain", "qemu-xbzrle",
                                   "qemu-multifd-zstd")),
    Scenario(1024, 0, "1gbit", QUICK_ROWS),
    Scenario(1024, 200, "1gbit", QUICK_ROWS),
    Scenario(4096, 50, "1gbit", ("ferry-default", "qemu-plain", "qemu-multifd-zstd")),
    Scenario(1024, 50, "1gbit", ("ferry-default", "qemu-plain"), round_trip=True),
    # QEMU copies the disk by its (deprecated, 7.2) block migration: plain only.
    Scenario(1024, 50, "1gbit", ("ferry-default", "qemu-plain"), disk_mib=1024,
             disk_mib_s=5),
)
NOT_MEASURED: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- rows

def make_row(scenario: Scenario, name: str, *, leg: str = "A->B", **figures: Any) -> dict[str, Any]:
    """One result row: the common keys in order (None where not measured), then extras."""
    tool, mode = name.split("-", 1)
    row: dict[str, Any] = {"scenario": scenario.name, "tool": tool, "mode": mode,
                           "link": scenario.link, "guest_mib": scenario.guest_mib,
                           "ws_mib": scenario.ws_mib, "dirty_mib_s": scenario.dirty_mib_s,
                           "leg": leg}
    for key in ("total_ms", "downtime_ms", "wire_bytes", *CPU_KEYS, "iterations"):
        value = figures.pop(key, None)
        digits = 1 if key.endswith("_ms") else 2
        row[key] = round(value, digits) if isinstance(value, float) else value
    row["converged"] = bool(figures.pop("converged", False))
    row["guest_ok"] = bool(figures.pop("guest_ok", False))
    row.update(figures)
    return row


def console_verdict(before: str, after_text: str) -> dict[str, Any]:
    """Whether the guest came through: the source console's last status (before the
    migration) and the destination's lines since; two full passes after, 0 errors in all."""
    src, dst = linuxguest.statuses(before), linuxguest.statuses(after_text)
    errors = linuxguest.error_lines(before) + linuxguest.error_lines(after_text)
    passes = dst[-1].passes - dst[0].passes if dst else 0
    disk_passes = (None if not dst or dst[0].disk_passes is None
                   else (dst[-1].disk_passes or 0) - dst[0].disk_passes)
    ok = (bool(src) and len(dst) >= VERIFY_LINES and passes >= VERIFY_PASSES
          and (disk_passes is None or disk_passes >= 1)
          and all(s.bad == 0 for s in src + dst) and not errors)
    return {"guest_ok": ok, "passes_after": passes, "disk_passes_after": disk_passes,
            "status_lines_after": len(dst),
            "guest_errors": max((s.bad for s in src + dst), default=None),
            "error_lines": errors[:5],
            "last_status": asdict(dst[-1]) if dst else None}


def verified(text: str) -> bool:
    dst = linuxguest.statuses(text)
    disk_done = (not dst or dst[0].disk_passes is None
                 or (dst[-1].disk_passes or 0) - dst[0].disk_passes >= 1)
    return ((len(dst) >= VERIFY_LINES and dst[-1].passes - dst[0].passes >= VERIFY_PASSES
             and disk_done)
            or any(s.bad for s in dst))


def dirty_achieved(text: str) -> float | None:
    """MiB/s the guest actually rewrote over its status lines (TCG may fall short)."""
    lines = linuxguest.statuses(text)
    if len(lines) < 2 or lines[-1].t == lines[0].t:
        return None
    pages = lines[-1].written - lines[0].written
    return round(pages * linuxguest.PAGE_SIZE / MIB / (lines[-1].t - lines[0].t), 1)


def first_pass(text: str) -> bool:
    """The guest verified its whole working set once, and has run long enough for its
    dirty rate to show (VERIFY_LINES status lines)."""
    lines = linuxguest.statuses(text)
    return len(lines) >= VERIFY_LINES and lines[-1].passes >= 1


def wait_source(serial: Path, alive: Callable[[], bool]) -> str:
    try:
        text = linuxguest.wait_console(serial, first_pass, BOOT_TIMEOUT_S + FIRST_PASS_TIMEOUT_S,
                                       alive)
    except (TimeoutError, RuntimeError) as exc:
        raise BenchError(f"the source guest did not complete a pass: {exc}") from None
    bad = [s for s in linuxguest.statuses(text) if s.bad] or linuxguest.error_lines(text)
    if bad:
        raise BenchError(f"the source guest failed before any migration: {text[-400:]!r}")
    return text


def wait_destination(serial: Path) -> str:
    """The destination's console once verified() or after VERIFY_TIMEOUT_S (the verdict
    then tells what was missing)."""
    with contextlib.suppress(TimeoutError, RuntimeError):
        return linuxguest.wait_console(serial, verified, VERIFY_TIMEOUT_S)
    return linuxguest.read_console(serial)


# ---------------------------------------------------------------------------- QEMU rows

def qemu_caps(mode: str, disk: bool = False) -> dict[str, Any]:
    names = ["events"] + {"plain": [], "xbzrle": ["xbzrle"],
                          "multifd-zstd": ["multifd"]}[mode] + (["block"] if disk else [])
    return {"capabilities": [{"capability": n, "state": True} for n in names]}


def qemu_params(mode: str, ram_size: int) -> dict[str, Any]:
    if mode not in QEMU_MODES:
        raise ValueError(f"unknown QEMU mode {mode!r}")
    params: dict[str, Any] = {"max-bandwidth": QEMU_MAX_BANDWIDTH,
                              "downtime-limit": DOWNTIME_LIMIT_MS}
    if mode == "xbzrle":
        params["xbzrle-cache-size"] = ram_size // XBZRLE_CACHE_SHARE // MIB * MIB
    if mode == "multifd-zstd":
        params.update({"multifd-channels": MULTIFD_CHANNELS, "multifd-compression": "zstd"})
    return params


def create_disk(path: Path, size_mib: int) -> Path:
    """An empty qcow2 image (the guest fills it; a destination's gets QEMU's copy)."""
    done = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path),
                           f"{size_mib}M"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"qemu-img create {path}: {done.stderr.strip()}")
    return path


def qemu_spec(directory: Path, scenario: Scenario, guest: LinuxGuest,
              accel: vm.AccelChoice, *extra: str) -> vm.LaunchSpec:
    """A QEMU in `directory` (with its own empty disk image when the scenario has one)."""
    directory.mkdir()
    disk = (create_disk(directory / "disk.qcow2", scenario.disk_mib) if scenario.disk_mib
            else None)
    return vm.LaunchSpec(name=VM_NAME, ram_size=scenario.ram_size,
                         ram_path=directory / "unused.ram", qmp_path=directory / "qmp.sock",
                         serial_path=directory / "serial.log", pidfile=directory / "qemu.pid",
                         log_path=directory / "qemu.log", private_ram=True, accel=accel,
                         extra_args=(*scenario.guest_args(guest, disk), *extra))


async def launch_on(net: RowNet, side: int, spec: vm.LaunchSpec) -> vm.QemuProcess:
    assert spec.accel is not None
    return await vm.launch(spec, argv=net.prefix(side) + vm.qemu_argv(spec, spec.accel))


async def _qemu_leg(scenario: Scenario, mode: str, net: RowNet, src: vm.QemuProcess,
                    src_q: qmp.Qmp, dst_spec: vm.LaunchSpec, dst_side: int,
                    stack: contextlib.ExitStack, sessions: contextlib.AsyncExitStack, leg: str,
                    note: Callable[[str], None]
                    ) -> tuple[dict[str, Any], vm.QemuProcess, qmp.Qmp]:
    """One migration from `src` to a QEMU launched from dst_spec; its row, the new QEMU
    and the QMP session to it (QEMU serves one at a time)."""
    before = linuxguest.read_console(src.spec.serial_path)
    note(f"qemu {mode}: migrating {leg} over {scenario.link}")
    started = time.monotonic()
    src_cpu_before = proc_cpu_seconds(src.pid)
    dst = await launch_on(net, dst_side, dst_spec)
    stack.callback(dst.cleanup)
    dst_q = await sessions.enter_async_context(session(dst_spec.qmp_path))
    for q in (src_q, dst_q):
        await q.execute("migrate-set-capabilities", qemu_caps(mode, bool(scenario.disk_mib)))
        await q.execute("migrate-set-parameters", qemu_params(mode, scenario.ram_size))
    uri = f"tcp:{side_host(net, dst_side)}:{free_port()}"
    await dst_q.execute("migrate-incoming", {"uri": uri})
    wire_before = net.wire_bytes()
    src_mark, dst_mark = src_q.event_mark(), dst_q.event_mark()
    await src_q.execute("migrate", {"uri": uri})
    try:
        end = await src_q.wait_event(
            "MIGRATION", after=src_mark, timeout=QEMU_CONVERGE_TIMEOUT_S,
            match=lambda ev: ev.data.get("status") in ("completed", "failed", "cancelled"))
    except QmpTimeoutError:
        info = await src_q.execute("query-migrate")
        await src_q.execute("migrate_cancel")
        ram = info.get("ram", {})
        return make_row(scenario, f"qemu-{mode}", leg=leg, converged=False,
                        iterations=ram.get("dirty-sync-count"),
                        not_converged=True,
                        error=f"did not converge within {QEMU_CONVERGE_TIMEOUT_S:g} s "
                              f"(still {ram.get('remaining', '?')} bytes to send; cancelled)",
                        ), dst, dst_q
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
    # The source's guest would spin on a core the destination's needs to verify.
    with contextlib.suppress(FerryError):      # QEMU may close the socket before replying
        await src_q.execute("quit")
    after = await asyncio.to_thread(wait_destination, dst_spec.serial_path)
    ram = info.get("ram", {})
    wire = None if wire_before is None or wire_after is None else wire_after - wire_before
    row = make_row(
        scenario, f"qemu-{mode}", leg=leg, total_ms=(finished - started) * 1000,
        downtime_ms=(resume.timestamp_us - stops[0].timestamp_us) / 1000,
        wire_bytes=wire if wire is not None else ram.get("transferred"),
        iterations=ram.get("dirty-sync-count"), converged=True, **cpu,
        **console_verdict(before, after),
        wire_bytes_from=net.wire_from or "QEMU ram.transferred",
        dirty_achieved_mib_s=dirty_achieved(before),
        qemu_total_ms=info.get("total-time"), qemu_downtime_ms=info.get("downtime"),
        qemu_ram_transferred=ram.get("transferred"),
        xbzrle=info.get("xbzrle-cache"))
    return row, dst, dst_q


@contextlib.asynccontextmanager
async def session(path: Path) -> AsyncIterator[qmp.Qmp]:
    """A QMP session whose end does not fail when its QEMU quit (the migrated source)."""
    connection = qmp.connect(path)
    monitor = await connection.__aenter__()
    try:
        yield monitor
    finally:
        with contextlib.suppress(FerryError):
            await connection.__aexit__(None, None, None)


def side_host(net: RowNet, side: int) -> str:
    """Where a destination on `side` listens: loopback, or that side's veth address."""
    if isinstance(net, LinkNet):
        return net.veth.addresses[side]
    return net.dest_host


async def _qemu_rows(scenario: Scenario, mode: str, guest: LinuxGuest, work: Path,
                     accel: vm.AccelChoice, net: RowNet, stack: contextlib.ExitStack,
                     note: Callable[[str], None]) -> list[dict[str, Any]]:
    src_spec = qemu_spec(work / "a1", scenario, guest, accel)
    note(f"qemu {mode}: booting a {scenario.guest_mib} MiB guest ({scenario.ws_mib} MiB "
         f"working set, {scenario.dirty_mib_s:g} MiB/s)")
    src = await launch_on(net, 0, src_spec)
    stack.callback(src.cleanup)
    await asyncio.to_thread(wait_source, src_spec.serial_path, lambda: src.returncode is None)
    # QMP sessions close here, before `stack` kills the QEMUs.
    async with contextlib.AsyncExitStack() as sessions:
        src_q = await sessions.enter_async_context(session(src_spec.qmp_path))
        row, dst, dst_q = await _qemu_leg(scenario, mode, net, src, src_q,
                                   qemu_spec(work / "b1", scenario, guest, accel,
                                             "-incoming", "defer"), 1, stack, sessions,
                                   "A->B", note)
        rows = [row]
        if scenario.round_trip and row["guest_ok"]:
            back, _, _ = await _qemu_leg(scenario, mode, net, dst, dst_q,
                                      qemu_spec(work / "a2", scenario, guest, accel,
                                                "-incoming", "defer"), 0, stack, sessions,
                                      "B->A", note)
            rows.append(back)
    return rows


def qemu_rows(scenario: Scenario, mode: str, guest: LinuxGuest,
              note: Callable[[str], None]) -> list[dict[str, Any]]:
    """QEMU's own migration of a fresh guest (and back, for a round trip)."""
    accel = vm.choose_accel()
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-linux-"))
    try:
        with contextlib.ExitStack() as stack:   # kills every QEMU, even on Ctrl-C
            net = stack.enter_context(row_network(scenario.rate, note))
            return run_async(_qemu_rows(scenario, mode, guest, work, accel, net, stack, note))
    except FerryError as exc:
        return [make_row(scenario, f"qemu-{mode}", error=str(exc))]
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- ferry rows

def ferry_migrate(pair: AgentPair, source_home: Path, peer: str, args: Sequence[str]
                  ) -> tuple[int, dict[str, Any], str]:
    argv = [sys.executable, "-m", "agent", "migrate", VM_NAME, "--home", str(source_home),
            "--to", peer, "--json", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=MIGRATE_TIMEOUT_S,
                          check=False)
    lines = done.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        report = {}
    return done.returncode, report, done.stderr


def _ferry_leg(scenario: Scenario, mode: str, pair: AgentPair, net: RowNet, leg: str,
               src_pid: int, adopted: bool, adopted_pids: list[int],
               note: Callable[[str], None]) -> dict[str, Any]:
    """One `ferry migrate` of the running VM from one agent to the other; its row."""
    there, back = (pair.a, pair.b) if leg == "A->B" else (pair.b, pair.a)
    peer = "hostb" if leg == "A->B" else "hosta"
    src_serial = there.home / "vms" / VM_NAME / "serial.log"
    dst_serial = back.home / "vms" / VM_NAME / "serial.log"
    before = linuxguest.read_console(src_serial)
    note(f"ferry {mode}: migrating {leg} over {scenario.link}")
    agents_before, src_before = pair.cpu_seconds(), proc_cpu_seconds(src_pid)
    wire_before = net.wire_bytes()
    try:
        rc, report, stderr = ferry_migrate(pair, there.home, peer,
                                           (*FERRY_MODES[mode], *disk_map(scenario, pair, leg)))
    except subprocess.TimeoutExpired:
        return make_row(scenario, f"ferry-{mode}", leg=leg,
                        error=f"ferry migrate did not finish within {MIGRATE_TIMEOUT_S:g} s")
    wire_after = net.wire_bytes()
    agents_after = pair.cpu_seconds()
    i, j = (0, 1) if leg == "A->B" else (1, 0)
    cpu = {"src_agent_cpu_s": cpu_delta(agents_after[i], agents_before[i]),
           "dst_agent_cpu_s": cpu_delta(agents_after[j], agents_before[j])}
    if rc != 0 or report.get("status") != "completed":
        why = (report.get("error") or " ".join(stderr.strip().splitlines()[-1:])
               or f"exit {rc}")
        # ferry's pre-copy budget (--timeout, 120 s) ran out: rolled back, not a loss.
        return make_row(scenario, f"ferry-{mode}", leg=leg, **cpu, report=report,
                        iterations=report.get("rounds"),
                        not_converged=report.get("error_reason") == "timeout",
                        error=f"ferry migrate: {why}")
    src_after = wait_exit_cpu(src_pid, SOURCE_EXIT_TIMEOUT_S) if adopted else None
    cpu["src_qemu_cpu_s"] = cpu_delta(src_after if src_after is not None
                                      else proc_cpu_seconds(src_pid), src_before)
    dest_pid = int(report.get("dest_pid") or 0)
    cpu["dst_qemu_cpu_s"] = proc_cpu_seconds(dest_pid) if dest_pid else None
    if dest_pid:
        adopted_pids.append(dest_pid)
    after = wait_destination(dst_serial)
    wire = None if wire_before is None or wire_after is None else wire_after - wire_before
    return make_row(
        scenario, f"ferry-{mode}", leg=leg, total_ms=report.get("total_ms"),
        downtime_ms=report.get("downtime_ms"),
        wire_bytes=wire if wire is not None else report.get("wire_bytes"),
        iterations=report.get("rounds"), converged=True, **cpu,
        **console_verdict(before, after),
        wire_bytes_from=net.wire_from or "ferry report",
        dirty_achieved_mib_s=dirty_achieved(before),
        ferry_wire_bytes=report.get("wire_bytes"),
        compression_ratio=report.get("compression_ratio"),
        data_pages=report.get("data_pages"), zero_pages=report.get("zero_pages"),
        dedup_pages=report.get("dedup_pages"), switchover_ms=report.get("switchover_ms"),
        dest_pid=dest_pid or None, report=report)


def disk_paths(pair: AgentPair) -> tuple[Path, Path]:
    """The disk image on host a and where its copy goes on host b."""
    return pair.root / "disks-a" / "disk.qcow2", pair.root / "disks-b" / "disk.qcow2"


def disk_map(scenario: Scenario, pair: AgentPair, leg: str) -> tuple[str, ...]:
    if not scenario.disk_mib:
        return ()
    a, b = disk_paths(pair)
    # Back on a, the copy goes beside the original (ferry leaves a source's disk in place).
    return ("--disk-map", f"{a}={b}" if leg == "A->B" else f"{b}={a.with_name('back.qcow2')}")


def ferry_rows(scenario: Scenario, mode: str, guest: LinuxGuest,
               note: Callable[[str], None]) -> list[dict[str, Any]]:
    """ferry's migration of a fresh guest between two agents (and back, for a round trip)."""
    root = Path(tempfile.mkdtemp(prefix="ferry-bench-linux-"))
    adopted_pids: list[int] = []
    name = f"ferry-{mode}"
    try:
        with contextlib.ExitStack() as stack:
            net = stack.enter_context(row_network(scenario.rate, note))
            stack.callback(reap, adopted_pids)
            allow = (default_cache_dir(), root / "disks-a", root / "disks-b")
            pair = net.agent_pair(root, allow=allow)
            disk = None
            if scenario.disk_mib:
                for path in disk_paths(pair):
                    path.parent.mkdir()
                disk = create_disk(disk_paths(pair)[0], scenario.disk_mib)
            pair.a.allow = allow            # a is the destination of a round trip's return
            stack.callback(pair.cleanup)
            adopted = stack.enter_context(subreaper())
            for agent in (pair.a, pair.b):
                # No health window: the destination guest's seconds after the resume would
                # count as its QEMU's CPU of the migration.
                with open(agent.home / "agent.toml", "a") as f:
                    f.write("health_window_s = 0\n")
            pair.start()
            note(f"ferry {mode}: booting a {scenario.guest_mib} MiB guest "
                 f"({scenario.ws_mib} MiB working set, {scenario.dirty_mib_s:g} MiB/s)")
            started = subprocess.run(
                net.prefix(0) + [sys.executable, "-m", "agent", "vm", "start", VM_NAME,
                                 "--memory", f"{scenario.ram_size // KIB}K", "--ram",
                                 "private", "--home", str(pair.a.home), "--",
                                 *scenario.guest_args(guest, disk)],
                capture_output=True, text=True, check=False)
            if started.returncode != 0:
                raise BenchError(f"ferry vm start failed: {started.stderr.strip()}")
            source = pair.a.vm_record(VM_NAME)
            adopted_pids.append(source.pid)
            pair.extra_pids.append(source.pid)
            wait_source(pair.a.home / "vms" / VM_NAME / "serial.log", source.alive)
            rows = [_ferry_leg(scenario, mode, pair, net, "A->B", source.pid, adopted,
                               adopted_pids, note)]
            rows[0]["agent_log"] = migration_log(pair)
            if scenario.round_trip and rows[0]["guest_ok"] and rows[0].get("dest_pid"):
                back = _ferry_leg(scenario, mode, pair, net, "B->A", rows[0]["dest_pid"],
                                  adopted, adopted_pids, note)
                rows.append(back)
            return rows
    except (FerryError, RuntimeError) as exc:     # RuntimeError: an agent did not start
        return [make_row(scenario, name, error=str(exc))]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def migration_log(pair: AgentPair) -> list[str]:
    lines = []
    for name, text in (("a", pair.a.log()), ("b", pair.b.log())):
        lines += [f"{name}: {line.split(': ', 2)[-1]}" for line in text.splitlines()
                  if " INFO agent.migration." in line]
    return lines


def run_rows(scenarios: Sequence[Scenario], only: Sequence[str], guest: LinuxGuest,
             note: Callable[[str], None], repeat: int = 1) -> Iterator[dict[str, Any]]:
    """Every row of every scenario, `repeat` times: all its rows, then all again, so that
    what the machine does meanwhile (its memory reclaimed by the host) falls on each alike."""
    for scenario in scenarios:
        for run in range(1, repeat + 1):
            for name in scenario.rows:
                if only and name not in only:
                    continue
                tool, mode = name.split("-", 1)
                rows = (ferry_rows(scenario, mode, guest, note) if tool == "ferry"
                        else qemu_rows(scenario, mode, guest, note))
                for row in rows:
                    row["run"] = run
                    yield row


# ---------------------------------------------------------------------------- targets

@dataclass(frozen=True, slots=True)
class Target:
    """ferry-default's `key` <= max_ratio x the baseline's (a QEMU mode, or "best": the
    lowest figure of the QEMU rows), in one scenario."""

    scenario: str
    name: str
    key: str
    baseline: str
    max_ratio: float


TARGETS = (Target("1024M-1gbit-d50", "total", "total_ms", "plain", 0.5),
           Target("1024M-1gbit-d50", "wire", "wire_bytes", "plain", 0.5),
           Target("1024M-1gbit-d50", "downtime", "downtime_ms", "best", 1.0),
           Target("1024M-loopback-d50", "total", "total_ms", "plain", 1.0))


def _first_leg(rows: Sequence[dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["scenario"] == scenario and r["leg"] == "A->B"]


def verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target whose scenario ran: ferry's figure, the baseline's, ratio, met."""
    out = []
    for target in TARGETS:
        here = _first_leg(rows, target.scenario)
        ferry = [r for r in here if r["tool"] == "ferry" and r["mode"] == "default"]
        qemu = [r for r in here if r["tool"] == "qemu"
                and (target.baseline == "best" or r["mode"] == target.baseline)]
        if not ferry or not qemu:
            continue
        why = ""
        if any(not r["guest_ok"] for r in ferry):
            why = "the ferry run failed (" + (ferry[0].get("error") or "guest not intact") + ")"
        good = [r for r in qemu if r["guest_ok"] and r[target.key] is not None]
        if not why and not good:
            why = "no QEMU baseline came through"
        f = None if why else statistics.median(r[target.key] for r in ferry)
        # Each mode's median over the runs; "best" is the lowest of those.
        medians = {mode: statistics.median(r[target.key] for r in good if r["mode"] == mode)
                   for mode in dict.fromkeys(r["mode"] for r in good)}
        best = min(medians, key=medians.__getitem__) if medians else None
        q = None if best is None else medians[best]
        ratio = None if f is None or not q else f / q
        out.append({"scenario": target.scenario, "target": target.name, "key": target.key,
                    "baseline": target.baseline if target.baseline != "best" or best is None
                    else f"best ({best})", "max_ratio": target.max_ratio,
                    "runs": len(ferry),
                    "ferry": f, "qemu": q,
                    "ratio": None if ratio is None else round(ratio, 3),
                    "met": ratio is not None and ratio <= target.max_ratio, "why": why})
    return out


def verdict_text(v: dict[str, Any]) -> str:
    head = (f"{v['scenario']}: {v['target']} ferry <= {v['max_ratio']:g}x qemu "
            f"{v['baseline']}: ")
    if v["why"]:
        return head + f"NOT met ({v['why']})"
    unit = (lambda x: f"{x / MIB:.1f} MiB") if v["key"] == "wire_bytes" else (
        lambda x: f"{x:.0f} ms")
    medians = " (medians of {} runs)".format(v["runs"]) if v.get("runs", 1) > 1 else ""
    return head + (f"{met_text(v['met'])}: ratio {v['ratio']:.2f} "
                   f"({unit(v['ferry'])} vs {unit(v['qemu'])}{medians})")


def profile(report: dict[str, Any]) -> dict[str, Any]:
    """Where a ferry run's time went, from its report's timeline: per phase its seconds,
    mean wire and dirty MiB/s, and the CPU seconds of the source agent and QEMU; the mean
    time per round. (The destination's CPU is in the row: dst_agent_cpu_s.)"""
    timeline = report.get("timeline") or {}
    fields = timeline.get("fields") or []
    samples = [s for s in timeline.get("samples") or [] if len(s) == len(fields)]
    interval = float(timeline.get("interval_s") or 1.0)
    phases: dict[str, dict[str, float]] = {}
    for sample in samples:
        s = dict(zip(fields, sample, strict=True))
        p = phases.setdefault(str(s.get("phase")), {"seconds": 0.0, "wire_mib": 0.0,
                                                     "dirty_mib": 0.0, "dirty_s": 0.0,
                                                     "agent_cpu_s": 0.0, "qemu_cpu_s": 0.0})
        p["seconds"] += interval
        for key, name, unit in (("wire_bps", "wire_mib", MIB), ("dirty_bps", "dirty_mib", MIB),
                                ("agent_cpu", "agent_cpu_s", 1), ("qemu_cpu", "qemu_cpu_s", 1)):
            if isinstance(s.get(key), (int, float)):
                p[name] += s[key] * interval / unit
                if key == "dirty_bps":
                    p["dirty_s"] += interval
    # QEMU measures the dirty rate from its second dirty-log sync on: a phase without such
    # a sample has no rate ("-"), not a rate of 0.
    out: dict[str, Any] = {"phases": {
        k: {"seconds": round(v["seconds"], 1),
            "wire_mib_s": round(v["wire_mib"] / v["seconds"], 1) if v["seconds"] else None,
            "dirty_mib_s": round(v["dirty_mib"] / v["dirty_s"], 1) if v["dirty_s"] else None,
            "src_agent_cpu_s": round(v["agent_cpu_s"], 2),
            "src_qemu_cpu_s": round(v["qemu_cpu_s"], 2)} for k, v in phases.items()}}
    rounds = report.get("rounds")
    if rounds and report.get("total_ms"):
        out["ms_per_round"] = round(report["total_ms"] / rounds, 1)   # a mean
    out["rounds"] = rounds
    out["compression"] = report.get("compression_seen")
    return out


# ---------------------------------------------------------------------------- output

def _num(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The rows as a markdown table, the target verdicts, and ferry's profile where missed."""
    lines = [f"Machine: {meta.get('cpus')} CPUs, accelerator {meta.get('accel')}, QEMU "
             f"{meta.get('qemu')}, guest kernel {meta.get('kernel')}; {meta.get('started')}; "
             f"load average {meta.get('load_before', [0])[0]:.2f} before, "
             f"{(meta.get('load_after') or [0])[0]:.2f} after.",
             "",
             "| scenario | tool | leg | total s | downtime ms | wire MiB | agent CPU s "
             "(src/dst) | QEMU CPU s (src/dst) | iterations | converged | guest intact |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    repeated = any(r.get("run", 1) > 1 for r in rows)
    for r in rows:
        run = f" (run {r.get('run', 1)})" if repeated else ""
        intact = "yes" if r["guest_ok"] else (
            f"not migrated: {r['error']}" if r.get("not_converged") else "NO: " + (
                r.get("error") or
                f"errors {r.get('guest_errors')}, passes after {r.get('passes_after')}"))
        agents = ("-" if r["tool"] == "qemu" else
                  f"{_num(r['src_agent_cpu_s'])}/{_num(r['dst_agent_cpu_s'])}")
        lines.append(
            f"| {r['scenario']} | {r['tool']} {r['mode']}{run} | {r['leg']} | "
            f"{_num(r['total_ms'], 1000, 2)} | {_num(r['downtime_ms'], 1, 0)} | "
            f"{_num(r['wire_bytes'], MIB)} | {agents} | "
            f"{_num(r['src_qemu_cpu_s'])}/{_num(r['dst_qemu_cpu_s'])} | "
            f"{r['iterations'] if r['iterations'] is not None else '-'} | "
            f"{'yes' if r['converged'] else 'no'} | {intact} |")
    found = verdicts(rows)
    if found:
        lines += ["", "Targets:", ""]
        lines += [f"- {verdict_text(v)}" for v in found]
    missed = {v["scenario"] for v in found if not v["met"]}
    for scenario in sorted(missed):
        ferry = next((r for r in _first_leg(rows, scenario)
                      if r["tool"] == "ferry" and r["mode"] == "default" and r.get("report")),
                     None)
        if ferry is None:
            continue
        prof = profile(ferry["report"])
        lines += ["", f"ferry's profile in {scenario} ({prof.get('rounds')} rounds, "
                      f"{prof.get('ms_per_round', '-')} ms per round):", "",
                  "| phase | s | wire MiB/s | dirty MiB/s | src agent CPU s | src QEMU CPU s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for phase, p in prof["phases"].items():
            lines.append(f"| {phase} | {p['seconds']} | {_num(p['wire_mib_s'])} | "
                         f"{_num(p['dirty_mib_s'])} | {p['src_agent_cpu_s']} | "
                         f"{p['src_qemu_cpu_s']} |")
    mix = meta.get("mix")
    if mix:
        lines += ["", f"Guest page mix: zstd -3 ratio {mix['zstd_ratio_stream']} over the "
                      f"stream, {mix['zstd_ratio_nonzero_pages']} page by page (non-zero "
                      f"pages); {mix['zero_share']:.0%} zero, {mix['duplicate_share']:.0%} "
                      f"duplicate pages."]
    for text in meta.get("not_measured") or ():
        lines.append(f"\nNot measured: {text}")
    return "\n".join(lines) + "\n"


def results_json(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    found = verdicts(rows)
    return {**meta, "rows": list(rows), "verdicts": found,
            "targets_met": bool(found) and all(v["met"] for v in found),
            "profiles": {v["scenario"]: profile(r["report"])
                         for v in found if not v["met"]
                         for r in _first_leg(rows, v["scenario"])
                         if r["tool"] == "ferry" and r["mode"] == "default" and r.get("report")}}


def draw_bars(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Total time, downtime and wire bytes per scenario (groups) and tool (bars)."""
    from matplotlib.figure import Figure

    first = [r for r in rows if r["leg"] == "A->B"]
    scenarios = list(dict.fromkeys(r["scenario"] for r in first))
    tools = list(dict.fromkeys(f"{r['tool']} {r['mode']}" for r in first))
    fig = Figure(figsize=(max(8, 1.6 * len(scenarios) * max(1, len(tools)) / 3), 9), dpi=100)
    axes = fig.subplots(3, 1)
    width = 0.8 / max(1, len(tools))
    for ax, key, label, scale in ((axes[0], "total_ms", "total s", 1000),
                                  (axes[1], "downtime_ms", "downtime ms", 1),
                                  (axes[2], "wire_bytes", "wire MiB", MIB)):
        for k, tool in enumerate(tools):
            values = []
            for scenario in scenarios:   # the median of the runs that came through
                got = [r[key] for r in first if r["scenario"] == scenario
                       and f"{r['tool']} {r['mode']}" == tool and r["guest_ok"]
                       and r[key] is not None]
                values.append(statistics.median(got) / scale if got else float("nan"))
            ax.bar([i + k * width for i in range(len(scenarios))], values, width, label=tool)
        ax.set_ylabel(label)
        ax.set_xticks([i + width * (len(tools) - 1) / 2 for i in range(len(scenarios))],
                      scenarios, fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", ncol=min(3, len(tools)))
    fig.suptitle("ferry vs QEMU on a Linux guest (missing bar: the row failed)")
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_outputs(out: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]
                  ) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "table.md"]
    written[0].write_text(json.dumps(results_json(rows, meta), indent=1) + "\n")
    written[1].write_text(markdown(rows, meta))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written
    if any(r["leg"] == "A->B" for r in rows):
        draw_bars(rows, out / "bars.png")
        written.append(out / "bars.png")
    from agent.commands.plot import draw_timeline
    ferry = next((r for r in rows if r["tool"] == "ferry" and r["guest_ok"]
                  and (r.get("report") or {}).get("timeline")), None)
    if ferry is not None:
        draw_timeline(ferry["report"], out / "ferry-timeline.png")
        written.append(out / "ferry-timeline.png")
    return written


# ---------------------------------------------------------------------------- driver

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = bench_parser("linux", __doc__)
    parser.add_argument("--quick", action="store_true",
                        help="1 GiB guest at 50 MiB/s on loopback and 1gbit: ferry against "
                             "QEMU plain and xbzrle")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON instead of the markdown table")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help=f"where the table, JSON and plots go (default "
                             f"{RESULTS_DIR}/linux-DATE)")
    parser.add_argument("--only", action="append", choices=ROW_NAMES, default=[],
                        help="run only this row kind (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run every scenario's rows N times, interleaved; targets and "
                             "bars take each row kind's median (default 1)")
    parser.add_argument("--scenario", action="append", default=[], metavar="NAME",
                        help="run only this scenario, e.g. 1024M-1gbit-d50 (repeatable)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: at least 1")
    chosen: tuple[Scenario, ...] = QUICK if args.quick else FULL
    if args.scenario:
        names = {s.name for s in chosen}
        unknown = [n for n in args.scenario if n not in names]
        if unknown:
            parser.error(f"--scenario {unknown[0]}: not a scenario of this run "
                         f"({', '.join(sorted(names))})")
        chosen = tuple(s for s in chosen if s.name in args.scenario)
    offered = {name for s in chosen for name in s.rows}
    absent = [name for name in args.only if name not in offered]
    if absent:
        parser.error(f"--only {absent[0]}: no scenario of this run has that row "
                     f"(they have {', '.join(n for n in ROW_NAMES if n in offered)})")
    for s in chosen:
        if s.rate is not None:
            rate_bits(s.rate)
    args.scenarios = chosen
    return args


def qemu_version() -> str:
    done = subprocess.run([vm.QEMU_BINARY, "--version"], capture_output=True, text=True,
                          check=False)
    return done.stdout.split("\n", 1)[0].removeprefix("QEMU emulator version ").strip()


def main(argv: Sequence[str]) -> int:
    """`python -m bench linux`: 0 when the judged targets hold, 1 when not, 130 on Ctrl-C."""
    args = parse_args(argv)

    def note(text: str) -> None:
        print(f"bench linux: {text}", file=sys.stderr, flush=True)

    try:
        guest = linuxguest.build()
        mix = linuxguest.mix_ratio(guest)
    except FerryError as exc:
        note(f"cannot build the guest: {exc}")
        return 1
    accel = vm.choose_accel()
    meta: dict[str, Any] = {
        "accel": accel.accel.value, "accel_reason": accel.reason, "cpus": os.cpu_count(),
        "qemu": qemu_version(), "kernel": guest.version, "mix": mix,
        "load_before": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick, "scenarios": [s.name for s in args.scenarios],
        "not_measured": list(NOT_MEASURED)}
    note(f"accelerator {accel.accel.value}; guest kernel {guest.version}; page mix {mix}")
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        with sigterm_as_interrupt():
            for row in run_rows(args.scenarios, args.only, guest, note, args.repeat):
                rows.append(row)
                note(f"{row['scenario']} {row['tool']} {row['mode']} {row['leg']}: total "
                     f"{row['total_ms']} ms, downtime {row['downtime_ms']} ms, wire "
                     f"{_num(row['wire_bytes'], MIB)} MiB, intact {row['guest_ok']}"
                     + (f" ({row['error']})" if row.get("error") else ""))
    except KeyboardInterrupt:
        note("interrupted; everything started was cleaned up")
        return 130
    meta["load_after"] = os.getloadavg()
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    out = args.out or RESULTS_DIR / f"linux-{time.strftime('%Y%m%d-%H%M%S')}"
    for path in write_outputs(out, rows, meta):
        note(f"wrote {path}")
    if args.json:
        print(json.dumps({**results_json(rows, meta),
                          "rows": [{k: v for k, v in r.items() if k not in LOG_KEYS}
                                   for r in rows]}, indent=1))
    else:
        print(markdown(rows, meta), end="")
    found = verdicts(rows)
    return 0 if found and all(v["met"] for v in found) else 1

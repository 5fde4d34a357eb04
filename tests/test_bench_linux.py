"""`python -m bench linux`: the Linux guest built from Debian's packages and booted, its
checker caught on a page corrupted from outside and on a stale page (negative controls),
and the table, JSON, verdicts and plots built from rows."""

from __future__ import annotations

import asyncio
import gzip
import json
import mmap
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.qemu import vm
from bench import linux, linuxguest

GUEST_MIB = 256
WS_MIB = 24
DISK_MIB = 16
BOOT_S = 50.0


# ---------------------------------------------------------------------------- the guest

@pytest.fixture(scope="module")
def guest() -> linuxguest.LinuxGuest:
    """The bench guest (downloads Debian's packages into the cache the first time)."""
    missing = [t for t in ("apt-get", "apt-cache", "dpkg-deb", "gcc") if not shutil.which(t)]
    if missing:
        pytest.skip(f"building the Linux guest needs {', '.join(missing)}")
    try:
        return linuxguest.build()
    except linuxguest.GuestBuildError as exc:
        if "downloading" in str(exc) or "apt-cache depends" in str(exc):
            pytest.skip(f"Debian's mirror is not reachable from here: {exc}")
        raise


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ferry-lx-"))      # unix socket paths stay short
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def boot(guest: linuxguest.LinuxGuest, directory: Path, dirty: float,
         selftest: str = "", disk: Path | None = None) -> vm.QemuProcess:
    """The guest in a QEMU whose RAM is a shared file on /dev/shm (the host can write it);
    with `disk` (a raw image) its workload also checks that disk, rewriting nothing."""
    args = guest.qemu_args(WS_MIB, dirty, selftest, disk_mib_s=None if disk is None else 0)
    if disk is not None:
        args += ["-drive", f"file={disk},format=raw,if=none,id=d0",
                 "-device", "virtio-blk-pci,drive=d0"]
    spec = vm.LaunchSpec(
        name="lx", ram_size=GUEST_MIB * linux.MIB + linux.RAM_EXTRA,
        ram_path=Path(tempfile.mkdtemp(prefix="ferry-lx-", dir=vm.SHM_DIR)) / "lx.ram",
        qmp_path=directory / "qmp.sock", serial_path=directory / "serial.log",
        pidfile=directory / "qemu.pid", log_path=directory / "qemu.log",
        extra_args=tuple(args))
    return asyncio.run(vm.launch(spec))


def stop(proc: vm.QemuProcess) -> None:
    proc.cleanup()
    shutil.rmtree(proc.spec.ram_path.parent, ignore_errors=True)


def wait_status(proc: vm.QemuProcess, done: Any, timeout: float = BOOT_S) -> str:
    return linuxguest.wait_console(proc.spec.serial_path, done, timeout,
                                   lambda: proc.returncode is None)


@pytest.mark.qemu
def test_checker_catches_a_page_corrupted_from_outside(guest: linuxguest.LinuxGuest,
                                                       short_dir: Path) -> None:
    """Negative control: one byte of working-set page 0 changed in the RAM file by the
    host (no rewrites at dirty rate 0) makes the next pass report an error."""
    proc = boot(guest, short_dir, dirty=0)
    try:
        text = wait_status(proc, lambda t: any(s.passes >= 1 for s in linuxguest.statuses(t)))
        assert all(s.errors == 0 for s in linuxguest.statuses(text)), text[-800:]
        phys = linuxguest.probe_address(text)
        assert phys is not None, text[-800:]
        with open(proc.spec.ram_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as ram:
            ram[phys + 100] ^= 0x5A
        text = wait_status(proc, lambda t: any(s.errors for s in linuxguest.statuses(t)),
                           timeout=20)
    finally:
        stop(proc)
    assert any("ERROR page 0 " in line for line in linuxguest.error_lines(text)), text[-800:]


@pytest.mark.qemu
def test_guest_runs_clean_and_its_disk_checker_catches_a_changed_block(
        guest: linuxguest.LinuxGuest, short_dir: Path) -> None:
    """The guest boots, loads virtio_blk from its initramfs, dirties memory while checking
    it and its disk (O_DIRECT reads) with no error; then a block the host overwrites on
    the disk is reported (the negative control), memory still intact."""
    disk = short_dir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_MIB * linux.MIB)
    proc = boot(guest, short_dir, dirty=8, disk=disk)
    try:
        # Three status lines (three seconds), two full passes over memory, one over the disk.
        text = wait_status(proc, lambda t: len(lines := linuxguest.statuses(t)) >= 3
                           and lines[-1].passes >= 2 and (lines[-1].disk_passes or 0) >= 1)
        lines = linuxguest.statuses(text)
        assert all(s.bad == 0 for s in lines) and not linuxguest.error_lines(text), text
        assert lines[-1].written > lines[0].written     # it dirties pages while it checks
        assert f"ws_pages={WS_MIB * 256}" in text
        with open(disk, "r+b") as f:
            f.seek(5 * linuxguest.PAGE_SIZE + 200)
            f.write(os.urandom(16))
        text = wait_status(proc, lambda t: any(s.disk_errors for s in linuxguest.statuses(t)),
                           timeout=20)
    finally:
        stop(proc)
    assert any("ERROR disk block 5 " in line for line in linuxguest.error_lines(text)), text
    assert all(s.errors == 0 for s in linuxguest.statuses(text))


@pytest.mark.qemu
def test_checker_catches_a_stale_page(guest: linuxguest.LinuxGuest, short_dir: Path) -> None:
    """Negative control: a page put back to its previous generation (a page a migration
    failed to resend) is reported, not only a garbled one."""
    proc = boot(guest, short_dir, dirty=8, selftest="stale")
    try:
        text = wait_status(proc, lambda t: any(s.errors for s in linuxguest.statuses(t)))
    finally:
        stop(proc)
    assert "FERRY-WL selftest stale: page" in text
    assert linuxguest.error_lines(text), text[-800:]


def test_page_mix_compresses_like_memory_not_like_zeros(guest: linuxguest.LinuxGuest) -> None:
    mix = linuxguest.mix_ratio(guest, pages=2048)
    assert 0.15 <= mix["zero_share"] <= 0.25 and 0.05 <= mix["duplicate_share"] <= 0.15
    # Text and records compress, random pages do not: well above 1, far below all-zero.
    assert 1.3 <= mix["zstd_ratio_nonzero_pages"] <= 4.0, mix


def test_initramfs_is_newc_with_console_and_init(guest: linuxguest.LinuxGuest) -> None:
    raw = gzip.decompress(guest.initrd.read_bytes())
    assert raw.startswith(b"070701")
    for name in (b"init\0", b"bin/busybox\0", b"workload\0", b"dev/console\0",
                 b"lib/modules/virtio_blk.ko\0", b"TRAILER!!!\0"):
        assert name in raw


def test_workload_refuses_bad_arguments(guest: linuxguest.LinuxGuest) -> None:
    binary = linuxguest.workload_binary(guest)
    done = subprocess.run([str(binary)], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "usage" in done.stderr
    done = subprocess.run([str(binary), "0", "5"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "out of range" in done.stderr


def test_append_line_refuses_nonsense() -> None:
    assert "ferry.ws_mib=8 ferry.dirty_mib_s=2.5" in linuxguest.append_line(8, 2.5)
    with pytest.raises(ValueError, match="working set"):
        linuxguest.append_line(0, 1)


# ---------------------------------------------------------------------------- rows and output

SCENARIO = next(s for s in linux.QUICK if s.link == "1gbit")
LOOP = next(s for s in linux.QUICK if s.link == linux.LOOPBACK)


def row(scenario: linux.Scenario, name: str, total: float, downtime: float, wire: int,
        ok: bool = True, **extra: Any) -> dict[str, Any]:
    return linux.make_row(scenario, name, total_ms=total, downtime_ms=downtime,
                          wire_bytes=wire, converged=ok, guest_ok=ok, iterations=4, **extra)


def report(phases: list[str]) -> dict[str, Any]:
    fields = ["t", "phase", "wire_bps", "remaining_bytes", "dirty_bps", "throttle",
              "vcpu_pace", "qemu_cpu", "agent_cpu"]
    samples = [[i + 1.0, p, 50 * linux.MIB, 100, 10 * linux.MIB, 0, 1.0, 0.5, 0.25]
               for i, p in enumerate(phases)]
    return {"job": "j1", "vm": "bench", "peer": "hostb", "status": "completed",
            "downtime_ms": 90, "rounds": 3, "total_ms": 3000.0,
            "timeline": {"fields": fields, "samples": samples, "interval_s": 1.0,
                         "marks": {"stop_s": 2.5, "resume_s": 2.6}}}


def test_verdicts_judge_ratios_against_the_right_baselines() -> None:
    rows = [row(SCENARIO, "ferry-default", 4000, 100, 400 * linux.MIB, report=report(["a"])),
            row(SCENARIO, "qemu-plain", 10000, 300, 1000 * linux.MIB),
            row(SCENARIO, "qemu-xbzrle", 12000, 80, 900 * linux.MIB),
            row(LOOP, "ferry-default", 3000, 50, 10),
            row(LOOP, "qemu-plain", 2000, 60, 10)]
    found = {(v["scenario"], v["target"]): v for v in linux.verdicts(rows)}
    total = found[(SCENARIO.name, "total")]
    assert total["met"] and total["ratio"] == 0.4
    assert found[(SCENARIO.name, "wire")]["met"]
    downtime = found[(SCENARIO.name, "downtime")]
    assert not downtime["met"] and downtime["baseline"] == "best (xbzrle)"
    assert downtime["qemu"] == 80
    assert not found[(LOOP.name, "total")]["met"] and found[(LOOP.name, "total")]["ratio"] == 1.5
    table = linux.markdown(rows, {"cpus": 2, "accel": "tcg", "load_before": [1.0],
                                  "load_after": [1.0]})
    assert table.count("| ferry default |") == 2 and "| qemu xbzrle |" in table
    assert "NOT met: ratio 1.25" in table and "met: ratio 0.40" in table
    assert f"ferry's profile in {SCENARIO.name}" in table    # the downtime target missed
    assert not linux.results_json(rows, {})["targets_met"]


def test_repeated_runs_are_judged_by_each_kinds_median() -> None:
    """With --repeat, one slow run of either side moves no verdict: medians per row kind."""
    runs = [(5400, 3300, 3200), (2900, 3100, 3500), (3200, 3000, 3100)]
    rows = []
    for run, (ferry, plain, xbzrle) in enumerate(runs, 1):
        for r in (row(LOOP, "ferry-default", ferry, 50, 10),
                  row(LOOP, "qemu-plain", plain, 60, 10),
                  row(LOOP, "qemu-xbzrle", xbzrle, 20, 10)):
            r["run"] = run
            rows.append(r)
    found = {v["target"]: v for v in linux.verdicts(rows) if v["scenario"] == LOOP.name}
    total = found["total"]
    assert (total["ferry"], total["qemu"], total["runs"]) == (3200, 3100, 3)
    assert not total["met"] and total["ratio"] == round(3200 / 3100, 3)
    table = linux.markdown(rows, {"load_before": [0.0]})
    assert "| ferry default (run 3) |" in table and "(medians of 3 runs)" in table


def test_a_failed_row_fails_its_targets_and_says_why() -> None:
    rows = [linux.make_row(SCENARIO, "ferry-default", error="ferry migrate: boom"),
            row(SCENARIO, "qemu-plain", 10000, 300, 1000)]
    found = linux.verdicts(rows)
    assert found and not any(v["met"] for v in found)
    assert all("boom" in v["why"] for v in found)
    rows = [row(SCENARIO, "ferry-default", 1000, 10, 10),
            row(SCENARIO, "qemu-plain", 10000, 300, 1000, ok=False)]
    assert {v["why"] for v in linux.verdicts(rows)
            if v["target"] == "total"} == {"no QEMU baseline came through"}
    assert "NO: errors" in linux.markdown(rows, {"load_before": [0.0]})


def test_a_migration_that_did_not_converge_is_not_called_a_lost_guest() -> None:
    rows = [linux.make_row(SCENARIO, "qemu-plain", not_converged=True, iterations=9,
                           error="did not converge within 120 s"),
            linux.make_row(SCENARIO, "qemu-xbzrle", error="QEMU migration failed")]
    table = linux.markdown(rows, {"load_before": [0.0]})
    assert "| no | not migrated: did not converge within 120 s |" in table
    assert "| no | NO: QEMU migration failed |" in table


def test_console_verdict_counts_the_disk_when_there_is_one() -> None:
    line = ("FERRY-WL t={} pass={} checked=1 written=1 errors=0 disk_pass={} disk_written=1 "
            "disk_errors={}\n")
    before = line.format(1, 1, 0, 0)
    good = "".join(line.format(t, t, t // 2, 0) for t in range(1, 5))
    assert linux.console_verdict(before, good)["guest_ok"]
    assert not linux.console_verdict(before, "".join(line.format(t, t, 0, 0)
                                                     for t in range(1, 5)))["guest_ok"]
    verdict = linux.console_verdict(before, good + line.format(5, 5, 3, 2))
    assert not verdict["guest_ok"] and verdict["guest_errors"] == 2


def test_console_verdict_needs_passes_and_zero_errors() -> None:
    line = "FERRY-WL t={} pass={} checked=1 written=1 errors={}\n"
    before = line.format(1, 1, 0)
    good = "".join(line.format(t, t, 0) for t in range(1, 5))
    assert linux.console_verdict(before, good)["guest_ok"]
    assert not linux.console_verdict(before, line.format(1, 1, 0) + line.format(2, 1, 0)
                                     + line.format(3, 2, 0))["guest_ok"]   # one pass only
    bad = good + line.format(5, 5, 1)
    verdict = linux.console_verdict(before, bad)
    assert not verdict["guest_ok"] and verdict["guest_errors"] == 1
    assert not linux.console_verdict("", good)["guest_ok"]   # source never seen running


def test_profile_sums_time_and_cpu_per_phase() -> None:
    prof = linux.profile(report(["precopy", "precopy", "stop-and-copy"]))
    assert prof["phases"]["precopy"] == {"seconds": 2.0, "wire_mib_s": 50.0,
                                         "dirty_mib_s": 10.0, "src_agent_cpu_s": 0.5,
                                         "src_qemu_cpu_s": 1.0}
    assert prof["ms_per_round"] == 1000.0


def test_profile_averages_the_dirty_rate_over_measured_samples_only() -> None:
    """Before QEMU's second dirty-log sync its rate is unmeasured (null), not 0."""
    rep = report(["precopy", "precopy", "precopy", "completed"])
    samples = rep["timeline"]["samples"]
    for sample in samples[:2] + samples[3:]:
        sample[4] = None
    phases = linux.profile(rep)["phases"]
    assert phases["precopy"]["dirty_mib_s"] == 10.0 and phases["precopy"]["seconds"] == 3.0
    assert phases["completed"]["dirty_mib_s"] is None


def test_outputs_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [row(SCENARIO, "ferry-default", 4000, 100, 400, report=report(["precopy"])),
            row(SCENARIO, "qemu-plain", 10000, 300, 1000)]
    written = linux.write_outputs(tmp_path / "out", rows, {"load_before": [0.0]})
    names = {p.name for p in written}
    assert names == {"results.json", "table.md", "bars.png", "ferry-timeline.png"}
    for path in written:
        assert path.stat().st_size > 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["tool"] for r in data["rows"]] == ["ferry", "qemu"]
    assert (tmp_path / "out" / "bars.png").read_bytes()[:4] == b"\x89PNG"


def test_command_line_refuses_an_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        linux.parse_args(["--quick", "--scenario", "nope"])
    assert "1024M-1gbit-d50" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        linux.parse_args(["--quick", "--only", "ferry-dedup-off"])
    assert "no scenario of this run has that row" in capsys.readouterr().err
    args = linux.parse_args(["--quick", "--scenario", SCENARIO.name])
    assert [s.name for s in args.scenarios] == [SCENARIO.name]
    assert os.fspath(linux.RESULTS_DIR).endswith("bench/results")


# ---------------------------------------------------------------------------- harness rows

@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ferry-default", "qemu-plain"])
def test_harness_migrates_a_guest_with_a_disk_there_and_back(guest: linuxguest.LinuxGuest,
                                                             name: str) -> None:
    """The harness's rows with the real tools: a small guest with a disk, migrated A->B and
    back, comes through intact both times with every figure measured."""
    scenario = linux.Scenario(256, 4, linux.LOOPBACK, (name,), round_trip=True, disk_mib=32,
                              disk_mib_s=1)
    notes: list[str] = []
    rows = list(linux.run_rows([scenario], [], guest, notes.append))
    assert [r["leg"] for r in rows] == ["A->B", "B->A"], rows
    for made in rows:
        assert made["guest_ok"] and made["converged"], made
        assert made["passes_after"] >= linux.VERIFY_PASSES and made["disk_passes_after"] >= 1
        assert 0 < made["downtime_ms"] < made["total_ms"]
        # The disk crossed the wire too (QEMU's block migration, ferry's disk copy).
        assert made["wire_bytes"] > scenario.disk_mib * linux.MIB
        assert made["iterations"] >= 1 and made["dst_qemu_cpu_s"] > 0
    if name.startswith("ferry"):
        assert rows[0]["src_agent_cpu_s"] > 0 and rows[0]["report"]["status"] == "completed"

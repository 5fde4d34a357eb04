"""bench migrate: rows, verdicts and helpers without QEMU; one small real run per row kind."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.guest import MAGIC, MAILBOX_ADDR, PAGE_SIZE, GuestConfig, GuestState, write_config
from agent.qemu import vm
from agent.qemu.vmspec import parse_size
from bench import migrate as bm

CASE = bm.BASE_CASE


def row(tool: str, mode: str, total: float | None, downtime: float | None, ok: bool = True,
        case: bm.Case = CASE, **extra: Any) -> dict[str, Any]:
    return bm.make_row(tool, mode, case, total_ms=total, downtime_ms=downtime,
                       wire_bytes=1 << 20, ok=ok, **extra)


def test_case_ram_is_not_a_multiple_of_64_pages_and_ferry_parses_its_size():
    assert CASE.ram_size == (1 << 30) + 8192
    assert CASE.memory_arg == "1048584K"
    assert parse_size(CASE.memory_arg, default_suffix="m") == CASE.ram_size
    for case in bm.FULL_CASES:
        assert (case.ram_size // PAGE_SIZE) % 64 != 0
        assert case.ram_size % PAGE_SIZE == 0
    assert CASE.dirty_mib_s == 19.5
    assert CASE.config().ws_pages == 10_000 and CASE.config().rate == 5000
    assert [c for c in bm.QUICK_CASES if c.target] == [CASE]


def test_make_row_has_the_common_keys_first_and_rounds():
    made = row("ferry", "default", 1234.56, 7.04, rounds=3)
    assert tuple(made)[:len(bm.ROW_KEYS)] == bm.ROW_KEYS
    assert made["total_ms"] == 1234.6 and made["downtime_ms"] == 7.0
    assert made["guest_mib"] == 1024 and made["rounds"] == 3
    failed = bm.failed_row("qemu", "plain", CASE, "boom")
    assert failed["ok"] is False and failed["error"] == "boom" and failed["total_ms"] is None


@pytest.mark.parametrize(("ferry", "qemu", "downtime_met", "total_met"), [
    ((1000, 50), (800, 60), True, True),
    ((1200, 50), (800, 60), True, True),       # exactly 1.5x
    ((1201, 50), (800, 60), True, False),
    ((500, 61), (800, 60), False, True),
])
def test_verdicts_compare_ferry_with_qemu_plain(ferry, qemu, downtime_met, total_met):
    rows = [row("qemu", "plain", *qemu), row("ferry", "default", *ferry),
            row("qemu", "multifd-zstd", 1, 1)]
    found = {v.name: v for v in bm.verdicts(rows, [CASE])}
    assert found["downtime"].met is downtime_met and found["total"].met is total_met
    assert found["total"].qemu == qemu[0]       # plain, not multifd
    assert bm.targets_met(rows, [CASE]) is (downtime_met and total_met)


def test_repeated_runs_compare_medians():
    rows = [row("qemu", "plain", 800, 10), row("ferry", "default", 5000, 50),
            row("qemu", "plain", 900, 60), row("ferry", "default", 1000, 9),
            row("qemu", "plain", 5000, 8), row("ferry", "default", 1100, 11)]
    found = {v.name: v for v in bm.verdicts(rows, [CASE])}
    assert (found["total"].ferry, found["total"].qemu) == (1100, 900)
    assert (found["downtime"].ferry, found["downtime"].qemu) == (11, 10)
    assert found["total"].met and not found["downtime"].met
    assert found["total"].runs == 3 and "medians 1100 ms vs 900 ms" in found["total"].text()
    rows[3] = bm.failed_row("ferry", "default", CASE, "lost")
    assert not bm.targets_met(rows, [CASE])


def test_a_failed_row_fails_the_targets_and_says_why():
    rows = [row("qemu", "plain", 800, 60, ok=False), row("ferry", "default", 100, 1)]
    assert not bm.targets_met(rows, [CASE])
    assert all("QEMU baseline failed" in v.text() for v in bm.verdicts(rows, [CASE]))
    rows = [row("qemu", "plain", 800, 60), bm.failed_row("ferry", "default", CASE, "no")]
    assert not bm.targets_met(rows, [CASE])
    assert "ferry run failed (no)" in bm.verdicts(rows, [CASE])[0].text()


def test_targets_need_every_target_case_measured():
    assert not bm.targets_met([], [CASE])
    assert not bm.targets_met([row("ferry", "default", 1, 1)], [CASE])
    other = bm.FULL_CASES[1]
    rows = [row("qemu", "plain", 800, 60), row("ferry", "default", 100, 1),
            row("qemu", "plain", 100, 1, case=other), row("ferry", "default", 900, 90, case=other)]
    # The non-target case misses its targets, which is reported but does not decide.
    assert bm.targets_met(rows, bm.FULL_CASES)
    text = bm.table(rows, bm.FULL_CASES)
    assert "targets: met" in text
    assert "(info)  total    ferry <= 1.5x qemu plain (256 MiB" in text


def test_table_lists_rows_info_baselines_and_the_verdict():
    rows = [row("qemu", "plain", 2000, 8, qemu_total_ms=1900, qemu_downtime_ms=7),
            row("ferry", "default", 1200, 60, rounds=2),
            row("qemu", "plain-private", 1300, 12),
            bm.failed_row("qemu", "multifd-zstd", CASE, "QEMU migration failed: x")]
    text = bm.table(rows, [CASE])
    assert "QEMU's own: total 1900 ms" in text and "2 rounds" in text
    assert "error: QEMU migration failed: x" in text
    assert "target  downtime ferry <= 1x qemu plain (1024 MiB, 19.5 MiB/s): NOT met" in text
    assert "target  total    ferry <= 1.5x qemu plain (1024 MiB, 19.5 MiB/s): met" in text
    assert "(info)  total    ferry <= 1.5x qemu plain-private" in text
    assert text.endswith("targets: NOT met")


def test_round_log_reads_the_source_agents_info_lines():
    log = ("ferry: INFO agent.migration.source: migration ab12 round 0: 141342 pages in 1235 ms"
           " after a 0 ms scan\nferry: DEBUG something else\n"
           "ferry: INFO agent.migration.source: migration ab12 round 1: 900 pages in 9 ms after"
           " a 61 ms scan\n"
           "ferry: INFO agent.migration.source: migration ab12 final round: 1651 pages in 25 ms"
           " after a 69 ms scan\n")
    assert bm.round_log(log) == [
        {"round": 0, "pages": 141342, "send_ms": 1235, "scan_ms": 0},
        {"round": 1, "pages": 900, "send_ms": 9, "scan_ms": 61},
        {"round": "final", "pages": 1651, "send_ms": 25, "scan_ms": 69}]


def test_qemu_modes_set_what_the_issue_asks():
    for mode in bm.QEMU_MODES:
        params = bm.qemu_params(mode)
        assert params["max-bandwidth"] >= 100 * 10**9 and params["downtime-limit"] == 300
    caps = {c["capability"] for c in bm.qemu_caps("multifd-zstd")["capabilities"]}
    assert caps == {"events", "multifd"}
    assert bm.qemu_params("multifd-zstd")["multifd-compression"] == "zstd"
    assert bm.qemu_params("multifd-zstd")["multifd-channels"] == 2
    assert "multifd-compression" not in bm.qemu_params("plain")
    assert {c["capability"] for c in bm.qemu_caps("plain")["capabilities"]} == {"events"}
    with pytest.raises(ValueError):
        bm.qemu_params("postcopy")


def test_private_ram_argv_drops_only_the_shared_file(tmp_path: Path):
    accel = vm.AccelChoice(vm.Accel.TCG, "test")
    spec = bm.qemu_spec(tmp_path / "d", tmp_path / "g.ram", CASE, tmp_path / "k.elf", accel,
                        "-incoming", "defer")
    argv = vm.qemu_argv(spec, accel)
    private = bm.private_ram_argv(argv)
    assert not any("memory-backend" in arg for arg in private)
    assert private[private.index("-machine") + 1] == vm.MACHINE_TYPE
    assert private[private.index("-m") + 1] == "1048584K"
    assert private[-2:] == ["-incoming", "defer"]
    assert len(argv) - len(private) == 2


class FakeHmp:
    """Answers `xp` like QEMU's HMP from a buffer; pmemsave is not needed here."""

    def __init__(self, ram: bytearray) -> None:
        self.ram = ram

    async def hmp(self, line: str) -> str:
        _, fmt, addr = line.split()
        count, base = int(fmt[1:-2]), int(addr, 16)
        words = struct.unpack_from(f"<{count}I", self.ram, base)
        return "".join(f"{base + i * 4:016x}: " + " ".join(f"0x{w:08x}" for w in words[i:i + 4])
                       + "\r\n" for i in range(0, count, 4))


def test_qmp_guest_reads_the_mailbox_over_hmp(tmp_path: Path):
    ram = bytearray(MAILBOX_ADDR + PAGE_SIZE)
    struct.pack_into("<8I", ram, MAILBOX_ADDR, MAGIC, 1, 4321, 7, 0, 0xFFFFFFFF, 0xFFFFFFFF,
                     int(GuestState.RUNNING))
    write_config(ram, GuestConfig(ws_pages=10_000, rate=5000))
    guest = bm.QmpGuest(FakeHmp(ram), tmp_path)  # type: ignore[arg-type]
    state = asyncio.run(guest.mailbox())
    assert state.running and state.heartbeat == 4321 and state.passes == 7
    assert state.errors == 0 and state.first_error_page is None
    assert state.config.ws_pages == 10_000 and state.config.rate == 5000


# ---------------------------------------------------------------------------- real runs

SMALL = bm.Case(guest_mib=64, fill_mib=16, rate=2000)


def leftovers() -> list[str]:
    mine = f"ferry-bench-{os.getpid()}-"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=False).stdout
    return [line for line in names.splitlines() if line.startswith(mine)]


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("name", ["qemu-plain", "ferry-default", "qemu-plain-private"])
def test_small_guest_migrates_intact(name: str):
    notes: list[str] = []
    (made,) = bm.run_rows([SMALL], [name], notes.append)
    assert made["ok"], made
    assert made["passes_after"] >= bm.VERIFY_PASSES and made["fill_intact"]
    assert made["downtime_ms"] > 0 and made["total_ms"] > made["downtime_ms"]
    assert made["wire_bytes"] > SMALL.fill_mib * (1 << 20) // 2
    assert leftovers() == []

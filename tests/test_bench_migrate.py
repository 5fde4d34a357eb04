"""bench migrate: rows, verdicts, arguments and helpers without QEMU; the namespace link
set up and torn down for real; one small real run per row kind."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.errors import LocalError
from agent.guest import MAGIC, MAILBOX_ADDR, PAGE_SIZE, GuestConfig, GuestState, write_config
from agent.localpair import (
    LINK_ADDRESSES,
    AgentPair,
    NetnsLink,
    rate_bits,
    tbf_args,
)
from agent.procfs import cpu_seconds as proc_cpu_seconds
from agent.qemu import vm
from agent.qemu.vmspec import parse_size
from bench import migrate as bm

CASE = bm.BASE_CASE
BIG = bm.BIG_CASE
LINK = "1gbit"


def row(tool: str, mode: str, total: float | None, downtime: float | None, ok: bool = True,
        case: bm.Case = CASE, wire: int | None = 1 << 20, link: str = bm.LOOPBACK_LINK,
        **extra: Any) -> dict[str, Any]:
    return bm.make_row(tool, mode, case, link=link, total_ms=total, downtime_ms=downtime,
                       wire_bytes=wire, ok=ok, **extra)


def both(rows_for: Any) -> list[dict[str, Any]]:
    """The same rows for the 1 GiB and the 4 GiB guest."""
    return [r for case in (CASE, BIG) for r in rows_for(case)]


# ---------------------------------------------------------------------------- cases and rows

def test_case_ram_is_not_a_multiple_of_64_pages_and_ferry_parses_its_size():
    assert CASE.ram_size == (1 << 30) + 8192
    assert CASE.memory_arg == "1048584K"
    assert parse_size(CASE.memory_arg, default_suffix="m") == CASE.ram_size
    assert BIG.ram_size == (4 << 30) + 8192 and BIG.memory_arg == "4194312K"
    for case in bm.FULL_CASES:
        assert (case.ram_size // PAGE_SIZE) % 64 != 0
        assert case.ram_size % PAGE_SIZE == 0
    assert CASE.dirty_mib_s == BIG.dirty_mib_s == 19.5
    assert CASE.config().ws_pages == 10_000 and CASE.config().rate == 5000
    # The same fill share and dirty rate; the fill stays below the 3 GiB of low RAM.
    assert BIG.fill_mib / BIG.guest_mib == CASE.fill_mib / CASE.guest_mib == 0.5
    big = BIG.config()
    assert big.fill_pages == 2048 * 256
    assert (big.fill_start_page + big.fill_pages) * PAGE_SIZE < 3 << 30
    assert [c for c in bm.QUICK_CASES if c.target] == [CASE, BIG]


def test_make_row_has_the_common_keys_first_and_rounds():
    made = row("ferry", "default", 1234.56, 7.04, rounds=3,
               cpu={"src_agent_cpu_s": 1.234, "dst_qemu_cpu_s": 0.5})
    assert tuple(made)[:len(bm.ROW_KEYS)] == bm.ROW_KEYS
    assert made["total_ms"] == 1234.6 and made["downtime_ms"] == 7.0
    assert made["guest_mib"] == 1024 and made["rounds"] == 3 and made["link"] == "loopback"
    assert made["src_agent_cpu_s"] == 1.23 and made["dst_qemu_cpu_s"] == 0.5
    assert made["dst_agent_cpu_s"] is None
    failed = bm.failed_row("qemu", "plain", CASE, "boom", link=LINK)
    assert failed["ok"] is False and failed["error"] == "boom" and failed["total_ms"] is None
    assert failed["link"] == LINK and failed["src_qemu_cpu_s"] is None
    failed = bm.failed_row("ferry", "default", CASE, "lost", cpu={"src_qemu_cpu_s": 2.2199999})
    assert tuple(failed)[:len(bm.ROW_KEYS)] == bm.ROW_KEYS and failed["src_qemu_cpu_s"] == 2.22


# ---------------------------------------------------------------------------- verdicts

@pytest.mark.parametrize(("ferry", "qemu", "downtime_met", "total_met"), [
    ((1000, 50), (800, 60), True, True),
    ((1000, 75), (800, 60), True, True),       # exactly 1.25x both
    ((1001, 50), (800, 60), True, False),
    ((500, 75.1), (800, 60), False, True),
])
def test_loopback_verdicts_compare_ferry_with_qemu_plain_private(ferry, qemu, downtime_met,
                                                                 total_met):
    rows = both(lambda case: [row("qemu", "plain", 1, 1, case=case),
                              row("ferry", "default", *ferry, case=case),
                              row("qemu", "multifd-zstd", 1, 1, case=case),
                              row("qemu", "plain-private", *qemu, case=case)])
    found = bm.verdicts(rows, [CASE, BIG])
    assert [(v.guest_mib, v.name) for v in found] == [
        (1024, "downtime"), (1024, "total"), (4096, "downtime"), (4096, "total")]
    by = {(v.guest_mib, v.name): v for v in found}
    for mib in (1024, 4096):
        assert by[mib, "downtime"].met is downtime_met and by[mib, "total"].met is total_met
        assert by[mib, "total"].qemu == qemu[0]      # plain-private, not plain or multifd
        assert by[mib, "total"].baseline == "plain-private"
    assert bm.targets_met(rows, [CASE, BIG]) is (downtime_met and total_met)


def test_the_4_gib_guest_is_judged_too():
    rows = both(lambda case: [row("qemu", "plain-private", 800, 60, case=case),
                              row("ferry", "default", 900, 60, case=case)])
    assert bm.targets_met(rows, [CASE, BIG])
    rows[-1] = row("ferry", "default", 1100, 60, case=BIG)     # 1.375x on 4 GiB only
    assert not bm.targets_met(rows, [CASE, BIG])
    assert bm.targets_met(rows, [CASE])                         # --case 1024


@pytest.mark.parametrize(("ferry", "wire", "met"), [
    ((600, 100), 600, {"total": True, "wire": True, "downtime": True}),
    ((601, 100), 600, {"total": False, "wire": True, "downtime": True}),
    ((600, 101), 601, {"total": True, "wire": False, "downtime": False}),
])
def test_link_verdicts_compare_total_wire_and_downtime_with_qemu_plain(ferry, wire, met):
    mib = 1 << 20
    rows = [row("qemu", "plain", 1000, 100, wire=1000 * mib, link=LINK),
            row("ferry", "default", *ferry, wire=wire * mib, link=LINK),
            row("qemu", "plain-private", 1, 1, wire=1, link=LINK)]
    found = {v.name: v for v in bm.verdicts(rows, [CASE], LINK)}
    assert {name: v.met for name, v in found.items()} == met
    assert all(v.baseline == "plain" for v in found.values())
    assert bm.targets_met(rows, [CASE], LINK) is all(met.values())
    assert "wire     ferry <= 0.6x qemu plain (1024 MiB, 19.5 MiB/s): " in found["wire"].text()
    assert f"{wire:.1f} MiB vs 1000.0 MiB" in found["wire"].text()
    # Link rows are not loopback rows: no loopback verdicts from them.
    assert bm.verdicts(rows, [CASE]) == []


def test_repeated_runs_compare_medians():
    rows = [row("qemu", "plain-private", 800, 10), row("ferry", "default", 5000, 50),
            row("qemu", "plain-private", 900, 60), row("ferry", "default", 1000, 9),
            row("qemu", "plain-private", 5000, 8), row("ferry", "default", 1100, 13)]
    found = {v.name: v for v in bm.verdicts(rows, [CASE])}
    assert (found["total"].ferry, found["total"].qemu) == (1100, 900)
    assert (found["downtime"].ferry, found["downtime"].qemu) == (13, 10)
    assert found["total"].met and not found["downtime"].met
    assert found["total"].runs == 3 and "medians 1100 ms vs 900 ms" in found["total"].text()
    rows[3] = bm.failed_row("ferry", "default", CASE, "lost")
    assert not bm.targets_met(rows, [CASE])


def test_a_failed_row_fails_the_targets_and_says_why():
    rows = [row("qemu", "plain-private", 800, 60, ok=False), row("ferry", "default", 100, 1)]
    assert not bm.targets_met(rows, [CASE])
    assert all("QEMU baseline failed" in v.text() for v in bm.verdicts(rows, [CASE]))
    rows = [row("qemu", "plain-private", 800, 60),
            bm.failed_row("ferry", "default", CASE, "no")]
    assert not bm.targets_met(rows, [CASE])
    assert "ferry run failed (no)" in bm.verdicts(rows, [CASE])[0].text()
    rows = [row("qemu", "plain", 800, 60, wire=None, link=LINK),
            row("ferry", "default", 100, 1, link=LINK)]
    wire = next(v for v in bm.verdicts(rows, [CASE], LINK) if v.name == "wire")
    assert not wire.met and "a figure is missing" in wire.text()


def test_targets_need_every_judged_case_measured():
    assert not bm.targets_met([], [CASE])
    assert not bm.targets_met([row("ferry", "default", 1, 1)], [CASE])
    ok = [row("qemu", "plain-private", 800, 60), row("ferry", "default", 100, 1)]
    assert not bm.targets_met(ok, [CASE, BIG])      # the 4 GiB guest is missing
    # A link run is judged on all three of its targets.
    rows = [row("qemu", "plain", 800, 60, wire=100, link=LINK),
            row("ferry", "default", 100, 1, wire=60, link=LINK)]
    assert bm.targets_met(rows, [CASE], LINK)
    rows[1]["wire_bytes"] = None
    assert not bm.targets_met(rows, [CASE], LINK)
    other = bm.FULL_CASES[2]
    rows = [*ok, row("qemu", "plain-private", 100, 1, case=other),
            row("ferry", "default", 900, 90, case=other)]
    # A case that is not judged misses its targets, which is reported but does not decide.
    assert bm.targets_met(rows, [CASE, other])
    text = bm.table(rows, [CASE, other])
    assert "targets: met" in text
    assert "(info)  total    ferry <= 1.25x qemu plain-private (256 MiB" in text


def test_table_lists_rows_info_baselines_cpu_and_the_verdict():
    cpu = {"src_agent_cpu_s": 0.81, "dst_agent_cpu_s": 0.92, "src_qemu_cpu_s": 2.5,
           "dst_qemu_cpu_s": 1.25}
    rows = [row("qemu", "plain", 2000, 8, qemu_total_ms=1900, qemu_downtime_ms=7),
            row("ferry", "default", 1200, 60, rounds=2, source_ram="private", cpu=cpu),
            row("qemu", "plain-private", 1300, 12),
            bm.failed_row("qemu", "multifd-zstd", CASE, "QEMU migration failed: x")]
    text = bm.table(rows, [CASE])
    assert text.startswith("link: loopback")
    assert "QEMU's own: total 1900 ms" in text and "2 rounds, source RAM private" in text
    assert " 0.81  0.92  2.50  1.25 yes" in text
    assert "error: QEMU migration failed: x" in text
    assert ("target  downtime ferry <= 1.25x qemu plain-private (1024 MiB, 19.5 MiB/s): "
            "NOT met") in text
    assert "target  total    ferry <= 1.25x qemu plain-private (1024 MiB, 19.5 MiB/s): met" in text
    assert "(info)  total    ferry <= 1.25x qemu plain (1024 MiB" in text
    assert text.endswith("targets: NOT met")
    link_text = bm.table([row("qemu", "plain", 2000, 8, link=LINK),
                          row("ferry", "default", 1000, 8, link=LINK)], [CASE], LINK)
    assert "target  wire     ferry <= 0.6x qemu plain" in link_text
    assert link_text.endswith("targets: NOT met")     # the wire bytes are equal


# ---------------------------------------------------------------------------- arguments

def test_arguments_pick_guests_link_and_ferry_ram():
    args = bm.parse_args(["--quick"])
    assert args.cases == (CASE, BIG) and args.link is None and args.ferry_ram == "private"
    assert bm.parse_args(["--quick", "--case", "4096"]).cases == (BIG,)
    assert bm.parse_args(["--case", "1024"]).cases == (CASE, bm.FULL_CASES[3])
    assert bm.parse_args([]).cases == bm.FULL_CASES
    args = bm.parse_args(["--quick", "--link", "1gbit", "--only", "ferry-default",
                          "--ferry-ram", "file", "--json"])
    assert args.link == "1gbit" and args.only == ["ferry-default"] and args.json
    assert args.ferry_ram == "file" and bm.link_label(args.link) == "1gbit"
    assert bm.link_label(None) == "loopback"
    args = bm.parse_args(["--quick", "--ferry-arg=--compress", "--ferry-arg=zstd:1"])
    assert args.ferry_arg == ["--compress", "zstd:1"]


def test_a_ferry_row_with_other_options_is_shown_but_never_judged():
    rows = [row("ferry", bm.CUSTOM_MODE, 1000.0, 10.0, rounds=4, source_ram="private",
                ferry_args="--compress zstd:1"),
            row("qemu", "plain-private", 2000.0, 20.0)]
    assert bm.verdicts(rows, [CASE]) == []
    assert not bm.targets_met(rows, [CASE])
    assert "--compress zstd:1" in bm.table(rows, [CASE])


@pytest.mark.parametrize("argv", [["--case", "333"], ["--link", "fast"], ["--repeat", "0"],
                                  ["--only", "ferry-turbo"], ["--ferry-ram", "hugepages"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bm.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


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


# ---------------------------------------------------------------------------- CPU seconds

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass\n"


def test_proc_cpu_seconds_reads_a_running_process():
    assert proc_cpu_seconds(os.getpid()) > 0
    assert proc_cpu_seconds(2**22 + 12345) is None      # above pid_max's default


def test_an_orphan_is_adopted_and_its_cpu_read_when_it_exits():
    """What happens to ferry's source QEMU: its parent (`ferry vm start`) exits first."""
    with bm.subreaper() as adopted:
        assert adopted
        spawn = (f"import subprocess, sys\n"
                 f"p = subprocess.Popen([sys.executable, '-c', {BURN!r}])\nprint(p.pid)")
        parent = subprocess.run([sys.executable, "-c", spawn], capture_output=True, text=True,
                                check=True)
        orphan = int(parent.stdout)
        used = bm.wait_exit_cpu(orphan, timeout=10)
    assert used is not None and 0.15 <= used < 2
    assert bm.wait_exit_cpu(orphan, timeout=0) is None           # reaped, no longer ours
    bm.reap([orphan])                                              # harmless when gone


# ---------------------------------------------------------------------------- the link

def test_link_commands_stay_inside_the_namespaces():
    link = NetnsLink(rate="1gbit", name_prefix="ferry-bench-t-", tag="abc123")
    ns_a, ns_b = link.namespaces
    dev_a, dev_b = link.devices
    assert (ns_a, ns_b) == ("ferry-bench-t-abc123-a", "ferry-bench-t-abc123-b")
    assert all(len(dev) <= 15 for dev in link.devices)
    commands = link.setup_commands()
    assert commands[:2] == [["ip", "netns", "add", ns_a], ["ip", "netns", "add", ns_b]]
    # The pair is made in a's namespace with b's end moved straight into b's.
    assert commands[2] == ["ip", "-n", ns_a, "link", "add", dev_a, "type", "veth", "peer",
                           "name", dev_b, "netns", ns_b]
    for argv in commands[2:]:
        assert argv[1] == "-n" and argv[2] in (ns_a, ns_b), argv   # never the host's
    assert ["ip", "-n", ns_a, "addr", "add", "10.77.0.1/24", "dev", dev_a] in commands
    assert ["ip", "-n", ns_b, "addr", "add", "10.77.0.2/24", "dev", dev_b] in commands
    shaped = [argv for argv in commands if argv[0] == "tc"]
    assert [(argv[2], argv[6]) for argv in shaped] == [(ns_a, dev_a), (ns_b, dev_b)]
    assert shaped[0][8:] == tbf_args("1gbit") == [
        "tbf", "rate", "1gbit", "burst", "250000", "latency", "20ms"]
    assert not any(argv[0] == "tc" for argv in NetnsLink(tag="x").setup_commands())
    assert link.teardown_commands() == []          # nothing made yet, nothing to delete
    link.created += [ns_a, ns_b]
    assert link.teardown_commands() == [["ip", "netns", "del", ns_a], ["ip", "netns", "del", ns_b]]
    assert link.prefix_argv(1) == ["ip", "netns", "exec", ns_b]
    assert LINK_ADDRESSES == link.addresses == ("10.77.0.1", "10.77.0.2")


def test_link_rates():
    assert rate_bits("1gbit") == 10**9 and rate_bits("500Mbit") == 5 * 10**8
    assert rate_bits("2.5gbit") == 25 * 10**8
    assert tbf_args("10mbit")[3:5] == ["burst", str(64 << 10)]     # at least one GSO packet
    for bad in ("1gbps", "fast", "0bit", ""):
        with pytest.raises(ValueError):
            rate_bits(bad)
    with pytest.raises(ValueError):
        NetnsLink(rate="1 gigabit")


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=False).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


needs_netns = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None
                                 or shutil.which("tc") is None,
                                 reason="network namespaces need root, ip and tc")


@needs_netns
def test_link_is_set_up_shaped_counted_and_removed():
    link = NetnsLink(rate="1gbit", name_prefix=f"ferry-bench-{os.getpid()}-")
    with link:
        assert set(link.namespaces) <= namespaces()
        qdisc = subprocess.run(["tc", "-n", link.namespaces[1], "qdisc", "show", "dev",
                                link.devices[1]], capture_output=True, text=True, check=True)
        assert "tbf" in qdisc.stdout and "rate 1Gbit" in qdisc.stdout
        before = link.device_bytes()
        pinged = subprocess.run([*link.prefix_argv(0), "ping", "-c", "1", "-W", "2",
                                 link.addresses[1]], capture_output=True, check=False)
        if pinged.returncode == 0:
            after = link.device_bytes()
            assert after[0] > before[0] and after[1] > before[1]
    assert not set(link.namespaces) & namespaces()
    assert link.created == []


@needs_netns
def test_a_link_that_fails_halfway_leaves_nothing(monkeypatch):
    link = NetnsLink(name_prefix=f"ferry-bench-{os.getpid()}-")
    made = link.setup_commands()
    monkeypatch.setattr(link, "setup_commands",
                        lambda: [*made[:2], ["ip", "-n", made[0][3], "link", "set", "nope0",
                                             "up"]])
    with pytest.raises(LocalError, match="nope0"):
        link.create()
    assert not set(link.namespaces) & namespaces()


@needs_netns
def test_agents_listen_on_their_ends_of_the_link(tmp_path: Path):
    with NetnsLink(name_prefix=f"ferry-bench-{os.getpid()}-") as link:
        pair = AgentPair.create(tmp_path, allow=(), link=link)
        try:
            assert (pair.a.address, pair.b.address) == (f"10.77.0.1:{pair.a.port}",
                                                        f"10.77.0.2:{pair.b.port}")
            assert "10.77.0.2" in (pair.a.home / "peers.toml").read_text()
            pair.start()
            a_cpu, b_cpu = pair.cpu_seconds()
            assert a_cpu is not None and b_cpu is not None and a_cpu > 0
            # b listens inside its namespace, on its veth address only.
            listening = subprocess.run([*link.prefix_argv(1), "ss", "-Htln"],
                                       capture_output=True, text=True, check=False).stdout
            if shutil.which("ss"):
                assert f"10.77.0.2:{pair.b.port}" in listening
        finally:
            pair.cleanup()
    assert pair.a.cpu_seconds() is None


# ---------------------------------------------------------------------------- real runs

SMALL = bm.Case(guest_mib=64, fill_mib=16, rate=2000)


def leftovers() -> list[str]:
    mine = f"ferry-bench-{os.getpid()}-"
    return sorted(name for name in namespaces() if name.startswith(mine))


def zombies() -> list[int]:
    """Children of this process that exited and were never reaped."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize(("name", "rate"), [
    ("qemu-plain", None), ("ferry-default", None), ("qemu-plain-private", None),
    pytest.param("ferry-default", LINK, marks=needs_netns),
    pytest.param("qemu-plain", LINK, marks=needs_netns)])
def test_small_guest_migrates_intact(name: str, rate: str | None):
    notes: list[str] = []
    started = time.monotonic()
    (made,) = bm.run_rows([SMALL], [name], notes.append, rate=rate)
    assert made["ok"], made
    assert made["link"] == bm.link_label(rate)
    assert made["passes_after"] >= bm.VERIFY_PASSES and made["fill_intact"]
    assert made["downtime_ms"] > 0 and made["total_ms"] > made["downtime_ms"]
    assert made["wire_bytes"] > SMALL.fill_mib * (1 << 20) // 2
    assert made["wire_bytes_from"] == ("netns loopback" if rate is None else "veth")
    qemu_cpu = (made["src_qemu_cpu_s"], made["dst_qemu_cpu_s"])
    assert all(0 < s < time.monotonic() - started for s in qemu_cpu), made
    if name.startswith("ferry"):
        assert made["source_ram"] == "private"
        assert made["src_agent_cpu_s"] > 0 and made["dst_agent_cpu_s"] > 0
        # What crossed the link is ferry's own count plus framing (TCP/IP, Ethernet).
        assert made["ferry_wire_bytes"] <= made["wire_bytes"] <= 1.2 * made["ferry_wire_bytes"]
    else:
        assert made["src_agent_cpu_s"] is None and made["dst_agent_cpu_s"] is None
    assert made["dst_qemu_cpu_verified_s"] >= made["dst_qemu_cpu_s"]
    assert leftovers() == []
    assert zombies() == []

"""Live migration end to end: real QEMU guests, two real agents, real sockets.

The guest verifies its own memory on every pass (a page the migration lost or corrupted
shows up in its error count), and tests read its mailbox straight from the RAM files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import identity
from agent.guest import GuestConfig, MailboxState, RunningGuest
from agent.guest.build import build_guest, default_cache_dir
from agent.guest.remote import read_mailbox_over_qmp
from agent.migration import faults
from agent.qemu import qmp
from agent.qemu.vm import TCG_RAM_PADDING
from agent.service.control import ControlClient
from tests.agents import AgentPair, CuttableProxy, pid_alive, read_guest

pytestmark = pytest.mark.qemu

MIB = 1 << 20
# QEMU < 9.0 under TCG loses dirty pages of a RAM block of 64-page multiples (DESIGN §7).
PAD = TCG_RAM_PADDING
PAGE = 4096


@contextlib.contextmanager
def running_pair(dest_ram_dir: Path | None = None) -> Iterator[AgentPair]:
    """Agents a (source) and b (destination) on loopback, trusting each other; b keeps
    RAM files in dest_ram_dir when given."""
    # Short root: unix socket paths under it must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="fy-"))
    pair = AgentPair.create(root, allow=(default_cache_dir(),))
    try:
        if dest_ram_dir is not None:
            pair.b.use_ram_dir(dest_ram_dir)
        pair.start()
        yield pair
    finally:
        pair.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def agents() -> Iterator[AgentPair]:
    with running_pair() as pair:
        yield pair


def boot(start_guest: Callable[..., RunningGuest], **config: int) -> RunningGuest:
    """A running test guest of 256 MiB with 64 MiB of content and a working set."""
    settings = {"ws_pages": 4000, "rate": 5000, "fill_pages": 16384} | config
    guest = start_guest(config=GuestConfig(**settings), ram_size=256 * MIB + PAD, name="mig")
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the first pass")
    return guest


def two_more_passes(ram_path: str) -> tuple[MailboxState, MailboxState]:
    """The destination guest's mailbox now and once it finished two more passes over its
    working set (the one cut by the switchover, and one that checks every page)."""
    first = read_guest(ram_path)
    deadline = time.monotonic() + 10
    while (now := read_guest(ram_path)).passes < first.passes + 2:
        assert time.monotonic() < deadline, f"destination guest stalled: {now}"
        time.sleep(0.05)
    return first, now


def assert_source_intact(guest: RunningGuest) -> None:
    """The source guest runs, counts on, and found no corrupted page; QEMU's own migration
    (started while the destination prepares) is not left running."""
    assert guest.process.returncode is None, "source QEMU is gone"

    async def migration_status() -> str:
        async with qmp.connect(guest.qmp_path) as q:
            return str((await q.execute("query-migrate")).get("status", "none"))
    status = asyncio.run(migration_status())
    assert status in ("none", "cancelled", "failed"), f"source QEMU's migration is {status}"
    before = guest.mailbox()
    after = guest.wait_until(lambda s: s.heartbeat > before.heartbeat + 50, timeout=10,
                             what="the source guest to keep running")
    assert after.errors == 0


@pytest.mark.parametrize("compress", [None, "zstd:1"])
def test_live_migration_moves_a_running_guest(agents: AgentPair, start_guest,
                                              compress: str | None) -> None:
    guest = boot(start_guest)
    extra = ("--compress", compress) if compress else ()
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path), *extra)
    assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
    print(report)
    assert report["status"] == "completed" and report["error"] is None
    if compress:
        # Packed by the zstd worker threads, in stream order: the guest's check below
        # proves every page arrived where and as it should.
        assert report["compressed_batches"] > 0 and report["compression_ratio"] > 1.05
    assert report["downtime_ms"] > 0
    assert report["rounds"] >= 2  # QEMU's first iteration plus the final one at least
    assert report["ram_bytes"] == 256 * MIB + PAD and report["ram_block"] == "ram0"
    assert (report["zero_pages"] + report["dedup_pages"] + report["data_pages"]
            + report["unchanged_pages"] == report["pages_sent"])
    # QEMU's first iteration sends every page; the non-zero ones cross as data: the
    # working set at least, and filled content. Zero pages the destination holds already.
    assert report["pages_sent"] >= (256 * MIB + PAD) // 4096
    assert report["data_pages"] > 4000 and report["unchanged_pages"] > 0
    assert report["wire_bytes"] > 0

    # The source QEMU quit; the destination's runs and the guest counts on without errors.
    deadline = time.monotonic() + 10
    while guest.process.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guest.process.returncode is not None, "source QEMU still runs after commit"
    record = agents.b.vm_record("mig")
    assert record.pid == report["dest_pid"] and pid_alive(record.pid)
    first, now = two_more_passes(record.ram_path)
    assert now.errors == 0, f"guest found {now.errors} bad pages, first {now.first_error_page}"
    assert now.heartbeat > first.heartbeat
    # Pages never written stay holes in the destination's RAM file: it holds what crossed
    # (data and copies; a quarter of the fill is zero) and not the 192 MiB never used.
    held = os.stat(record.ram_path).st_blocks * 512
    crossed = (report["data_pages"] + report["dedup_pages"]) * 4096
    assert held <= crossed + 8 * MIB, f"{held} bytes allocated for {crossed} sent"


def shmem_huge_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("ShmemHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def test_destination_ram_on_a_huge_page_tmpfs(mount_tmpfs, start_guest) -> None:
    """A destination whose ram_dir is a huge-page tmpfs copies pages in through its mapping
    (allocated first, so a full tmpfs is an error, never a SIGBUS); the guest checks them."""
    huge_tmpfs = mount_tmpfs("huge=within_size,size=1g")
    with running_pair(dest_ram_dir=huge_tmpfs) as pair:
        guest = boot(start_guest)
        before = shmem_huge_bytes()
        rc, report, stderr = pair.migrate("--qmp", str(guest.qmp_path))
        assert rc == 0, f"{report}\n{stderr}\n{pair.logs()}"
        record = pair.b.vm_record("mig")
        assert Path(record.ram_path).parent == huge_tmpfs
        first, now = two_more_passes(record.ram_path)
        assert now.errors == 0, f"guest found {now.errors} bad pages, first {now.first_error_page}"
        assert now.heartbeat > first.heartbeat
        assert "RAM file on a huge-page tmpfs" in pair.logs()
        # The 64 MiB of content went in as 2 MiB pages, not as 4 KiB ones.
        assert shmem_huge_bytes() - before >= 32 * MIB


def test_unknown_peer_is_refused_before_anything_starts(agents, start_guest) -> None:
    guest = boot(start_guest)
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path), peer="nosuchhost")
    assert rc != 0
    assert "no trusted peer named 'nosuchhost'" in (report.get("error") or stderr)
    assert_source_intact(guest)
    assert agents.b.leftovers() == []



# ---------------------------------------------------------------------------- rollback

SLOW = ("--bandwidth", "8M")  # pre-copy of the 64 MiB of content takes a few seconds
PRECOPY_BYTES = 4 << 20       # written into the destination's RAM file: pre-copy runs


def wait_for_precopy(agents: AgentPair, name: str = "mig") -> int:
    """Wait until pre-copy is under way: the destination QEMU exists and pages are landing
    in its RAM file; the QEMU's pid."""
    deadline = time.monotonic() + 30
    while (pid := agents.b.incoming_pid(name)) is None:
        assert time.monotonic() < deadline, f"no destination QEMU\n{agents.logs()}"
        time.sleep(0.02)
    while sum(f.stat().st_blocks * 512 for f in agents.b.ram_dir.glob("*.ram")) < PRECOPY_BYTES:
        assert time.monotonic() < deadline, f"no pages arrive\n{agents.logs()}"
        time.sleep(0.02)
    return pid


def lift_caps(agents: AgentPair) -> None:
    """The running outbound jobs of a go on uncapped: SLOW only had to hold them in
    pre-copy until the test's event (a cut, a signal) was under way. Saves the suite the
    seconds of a capped tail that QEMU has to throttle the guest to converge."""
    control = agents.a.home / "control.sock"
    with ControlClient(control) as client:
        jobs = client.call({"op": "jobs"})["jobs"]
    for job in jobs:
        if job["direction"] == "outbound" and job["state"] == "running":
            with ControlClient(control) as client:   # one request per connection
                assert client.call({"op": "limit", "id": job["job"], "bandwidth": None})["ok"]


def finish(proc) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=120)
    lines = out.strip().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if lines else {}), err


def assert_destination_clean(agents: AgentPair, dest_pid: int | None,
                             timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while agents.b.leftovers() or (dest_pid and pid_alive(dest_pid)):
        assert time.monotonic() < deadline, (
            f"destination left {agents.b.leftovers()}, QEMU alive: "
            f"{dest_pid and pid_alive(dest_pid)}\n{agents.logs()}")
        time.sleep(0.05)


def test_destination_qemu_killed_during_precopy_rolls_back(agents, start_guest) -> None:
    guest = boot(start_guest)
    proc = agents.popen_migrate("--qmp", str(guest.qmp_path), *SLOW)
    dest_pid = wait_for_precopy(agents)
    os.kill(dest_pid, signal.SIGKILL)
    rc, report, stderr = finish(proc)
    assert rc == 1 and report.get("status") == "failed", f"{report}\n{stderr}\n{agents.logs()}"
    assert "QEMU exited" in report["error"]
    assert_source_intact(guest)
    assert_destination_clean(agents, dest_pid)


def migrate_through_proxy(agents: AgentPair, start_guest, fault: str) -> tuple[
        RunningGuest, int, tuple[int, dict, str]]:
    """A slow migration through a proxy that, once pre-copy is under way, either cuts
    its connections ("cut") or also stops listening ("gone"); (guest, destination QEMU
    pid, finish(...))."""
    proxy = CuttableProxy(agents.b.port)
    try:
        _retarget(agents, proxy.port)
        guest = boot(start_guest)
        proc = agents.popen_migrate("--qmp", str(guest.qmp_path), *SLOW)
        dest_pid = wait_for_precopy(agents)
        if fault == "cut":
            proxy.cut()
            lift_caps(agents)
        else:
            proxy.close()
        return guest, dest_pid, finish(proc)
    finally:
        proxy.close()


def test_connection_cut_during_precopy_resumes_on_a_new_one(agents, start_guest) -> None:
    _, dest_pid, (rc, report, stderr) = migrate_through_proxy(agents, start_guest, "cut")
    assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
    # The same job went on: the same destination QEMU, and what it held was not resent.
    assert report["reconnects"] == 1 and report["dest_pid"] == dest_pid
    assert report["resume_saved_bytes"] >= PRECOPY_BYTES, report
    assert report["resent_bytes"] < report["wire_bytes"]
    record = agents.b.vm_record("mig")
    _, now = two_more_passes(record.ram_path)
    assert now.errors == 0, f"guest found {now.errors} bad pages"


def test_connection_lost_for_good_during_precopy_rolls_back(agents, start_guest) -> None:
    # Nothing listens at the proxy's port any more: every reconnect fails.
    guest, dest_pid, (rc, report, stderr) = migrate_through_proxy(agents, start_guest, "gone")
    assert rc == 1 and report.get("status") == "failed", f"{report}\n{stderr}\n{agents.logs()}"
    assert "not restored after 5 attempts" in report["error"], report["error"]
    assert_source_intact(guest)
    # The destination waited for the source to come back, then rolled back.
    assert_destination_clean(agents, dest_pid, timeout=agents.b.config.resume_window_s + 10)


def _retarget(agents: AgentPair, port: int) -> None:
    """Point a's entry for hostb at another port (the proxy)."""
    peer = identity.load_peers(agents.a.home).by_name("hostb")
    identity.trust_peer(agents.a.home, "hostb", peer.public_key, f"127.0.0.1:{port}")


def test_destination_agent_killed_rolls_back_and_restart_cleans_up(agents, start_guest):
    guest = boot(start_guest)
    proc = agents.popen_migrate("--qmp", str(guest.qmp_path), *SLOW)
    dest_pid = wait_for_precopy(agents)
    agents.b.stop(signal.SIGKILL)
    rc, report, stderr = finish(proc)
    assert rc == 1 and report.get("status") == "failed", f"{report}\n{stderr}\n{agents.logs()}"
    assert_source_intact(guest)
    # The killed agent could not clean up; restarted, it finishes the job from its journal.
    agents.b.start()
    assert_destination_clean(agents, dest_pid)


def test_cli_cancel_rolls_back(agents, start_guest) -> None:
    guest = boot(start_guest)
    proc = agents.popen_migrate("--qmp", str(guest.qmp_path), *SLOW)
    dest_pid = wait_for_precopy(agents)
    proc.send_signal(signal.SIGINT)
    rc, report, stderr = finish(proc)
    assert rc == 1 and report["status"] == "cancelled", f"{report}\n{stderr}"
    assert_source_intact(guest)
    assert_destination_clean(agents, dest_pid)


def with_faults(agents: AgentPair, monkeypatch, *names: str) -> None:
    """Restart the source agent with faults injected (agent.migration.faults)."""
    monkeypatch.setenv(faults.ENV, ",".join(names))
    agents.a.stop()
    agents.a.start()


def test_failure_in_pre_switchover_rolls_back(agents, start_guest, monkeypatch) -> None:
    with_faults(agents, monkeypatch, faults.Fault.PRE_SWITCHOVER)
    guest = boot(start_guest)
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path))
    assert rc == 1 and report["status"] == "failed", f"{report}\n{stderr}\n{agents.logs()}"
    assert "failure in pre-switchover" in report["error"]
    assert report["switchover_ms"] == {} or "committed" not in report["switchover_ms"]
    assert_source_intact(guest)   # QEMU had stopped the guest: it runs again
    assert_destination_clean(agents, None)


def test_qemu_migration_failing_on_the_source_rolls_back(agents, start_guest,
                                                         monkeypatch) -> None:
    with_faults(agents, monkeypatch, faults.Fault.CUT_STREAM)
    guest = boot(start_guest)
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path))
    assert rc == 1 and report["status"] == "failed", f"{report}\n{stderr}\n{agents.logs()}"
    assert "source QEMU's migration failed" in report["error"], report["error"]
    assert_source_intact(guest)
    assert_destination_clean(agents, None)


def test_negative_control_a_dropped_late_page_is_caught_by_the_guest(
        agents, start_guest, monkeypatch) -> None:
    """Proof that the checks of the other tests can fail: lose one page of the last
    section, and the guest's own verification must count it."""
    with_faults(agents, monkeypatch, faults.Fault.DROP_LATE_PAGE)
    guest = boot(start_guest)
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path))
    assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
    assert "injected fault: page" in agents.a.log()
    record = agents.b.vm_record("mig")
    _, now = two_more_passes(record.ram_path)
    dropped = [line for line in agents.a.log().splitlines() if "injected fault: page" in line]
    assert now.errors > 0, f"the guest did not notice a page that never arrived: {dropped} {now}"


# ---------------------------------------------------------------------------- refusals

def plain_ram_qemu(qmp_path: Path, memory: str, *args: str) -> subprocess.Popen:
    """A QEMU started by other tools: plain -m RAM (private, anonymous), a QMP socket."""
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "pc", "-m", memory, "-accel", "tcg",
         "-display", "none", "-nodefaults", "-no-user-config",
         "-qmp", f"unix:{qmp_path},server=on,wait=off", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not qmp_path.exists():
        assert time.monotonic() < deadline and qemu.poll() is None
        time.sleep(0.02)
    return qemu


def test_tcg_guest_hit_by_qemus_dirty_log_bug_is_refused(agents, vm_dir) -> None:
    qemu = plain_ram_qemu(vm_dir / "plain.qmp", "64M")
    try:
        rc, report, _ = agents.migrate("--qmp", str(vm_dir / "plain.qmp"))
        assert rc == 1 and report["status"] == "failed"
        assert "multiple of 64 pages" in report["error"] and "65544K" in report["error"]
        assert "KVM" in report["error"] and "9.0" in report["error"]
        assert qemu.poll() is None  # untouched
        assert agents.b.leftovers() == []
    finally:
        qemu.kill()
        qemu.wait()


def test_vm_with_plain_ram_started_by_other_tools_migrates(agents, vm_dir) -> None:
    """plain -m RAM, as libvirt starts VMs: no file anywhere on the source."""
    config = GuestConfig(ws_pages=2000, rate=2000, fill_pages=4096)
    qmp_path = vm_dir / "plain.qmp"
    qemu = plain_ram_qemu(qmp_path, "65544K", "-cpu", "max", "-name", "plain",
                          "-kernel", str(build_guest(config)))
    try:
        async def source_passes() -> int:
            async with qmp.connect(qmp_path) as q:
                deadline = time.monotonic() + 30
                while (state := await read_mailbox_over_qmp(q)).passes < 1:
                    assert time.monotonic() < deadline, state
                    await asyncio.sleep(0.05)
                assert state.errors == 0
                return state.passes
        asyncio.run(source_passes())
        rc, report, stderr = agents.migrate("--qmp", str(qmp_path))
        assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
        assert report["ram_block"] == "pc.ram" and report["ram_bytes"] == 65544 * 1024
        assert report["downtime_ms"] > 0 and report["data_pages"] > 4096
        assert qemu.wait(timeout=10) == 0   # the source QEMU quit after the commit
        record = agents.b.vm_record("plain")
        _, now = two_more_passes(record.ram_path)
        assert now.errors == 0, f"guest found {now.errors} bad pages"
    finally:
        qemu.kill()
        qemu.wait()


def test_kernel_outside_destination_allowed_paths_is_refused(agents, start_guest,
                                                            tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "elsewhere"))
    guest = boot(start_guest)
    rc, report, _ = agents.migrate("--qmp", str(guest.qmp_path))
    assert rc == 1 and report["status"] == "failed"
    assert "outside the destination's allowed paths" in report["error"]
    assert_source_intact(guest)
    assert_destination_clean(agents, None)


def test_unaccepted_qemu_option_is_refused(agents, start_guest) -> None:
    guest = start_guest(config=GuestConfig(ws_pages=100), ram_size=64 * MIB + PAD, name="mig",
                        extra_args=("-smbios", "type=1,manufacturer=ferry"))
    rc, report, _ = agents.migrate("--qmp", str(guest.qmp_path))
    assert rc == 1 and report["status"] == "failed"
    assert "QEMU option -smbios is not accepted" in report["error"]
    assert_source_intact(guest)
    assert_destination_clean(agents, None)


# Each names a host resource of the destination (a file outside its allowed paths, a host
# device, a host directory served, a program): refused before anything is created there.
# `{out}` is a directory outside the destination's allowed paths.
HOST_RESOURCE_ATTACKS = {
    "romfile": (("-device", "e1000,romfile={out}/rom.bin"),
                "-device 'e1000,romfile={out}/rom.bin' is refused",
                "romfile '{out}/rom.bin' is outside the destination's allowed paths"),
    "loader": (("-device", "loader,file={out}/rom.bin,addr=0x3000000"),
               "-device 'loader,file={out}/rom.bin,addr=0x3000000' is refused",
               "loader file '{out}/rom.bin' is outside"),
    "global-romfile": (("-global", "e1000.romfile={out}/rom.bin", "-device", "e1000"),
                       "-global 'e1000.romfile={out}/rom.bin' is refused",
                       "rule: a ROM or firmware is one QEMU bundles"),
    "tftp": (("-netdev", "user,id=n0,tftp={out}", "-device", "e1000,netdev=n0"),
             "-netdev 'user,id=n0,tftp={out}' is refused",
             "tftp serves a host directory over TFTP (widen with [accept] netdev_user)"),
    "usb-host": (("-device", "qemu-xhci", "-device", "usb-host,vendorid=0x1234,productid=0x5678"),
                 "-device 'usb-host,vendorid=0x1234,productid=0x5678' is refused",
                 "device type 'usb-host' is not on the destination's allow-list"),
    "guestfwd-cmd": (("-netdev", "user,id=n0,guestfwd=tcp:10.0.2.100:1234-cmd:/bin/true",
                      "-device", "e1000,netdev=n0"),
                     "-netdev 'user,id=n0,guestfwd=tcp:10.0.2.100:1234-cmd:/bin/true' is refused",
                     "guestfwd connects the guest to a host service or program"),
    # Close variants: the same file reached by other spellings.
    "romfile-dotdot": (("-device", "e1000,romfile={up}{out}/rom.bin"),
                       "romfile '{up}{out}/rom.bin' is outside the destination's allowed"),
    "romfile-symlink": (("-device", "e1000,romfile={link}"),
                        "romfile '{link}' is outside the destination's allowed paths"),
    "romfile-escaped-comma": (("-device", "e1000,romfile={out}/a,,b.rom"),
                              "romfile '{out}/a,b.rom' is outside the destination's allowed"),
    "json-device": (("-device", '{{"driver": "e1000", "romfile": "{out}/rom.bin"}}'),
                    "romfile '{out}/rom.bin' is outside the destination's allowed paths"),
}


@pytest.mark.parametrize("attack", sorted(HOST_RESOURCE_ATTACKS))
def test_argv_naming_a_destination_host_resource_is_refused(agents, start_guest, tmp_path,
                                                            attack) -> None:
    rom = tmp_path / "rom.bin"
    rom.write_bytes(b"\x55\xaa" + bytes(510))
    shutil.copy(rom, tmp_path / "a,b.rom")
    # A symlink inside an allowed root (the guest cache) to the file outside them.
    cache = default_cache_dir()
    link = cache / f"hostile-{os.getpid()}-{attack}.rom"
    link.unlink(missing_ok=True)
    link.symlink_to(rom)
    up = str(cache) + "/.." * len(cache.parts)        # from an allowed root up to /
    places = {"{out}": str(tmp_path), "{up}": up, "{link}": str(link)}

    def fill(text: str) -> str:
        for key, value in places.items():
            text = text.replace(key, value)
        return text.replace("{{", "{").replace("}}", "}")
    args, *messages = (tuple(fill(a) for a in part) if isinstance(part, tuple) else fill(part)
                       for part in HOST_RESOURCE_ATTACKS[attack])
    try:
        guest = start_guest(config=GuestConfig(ws_pages=100), ram_size=64 * MIB + PAD,
                            name="mig", extra_args=args)
        rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path))
    finally:
        link.unlink()
    assert rc == 1 and report["status"] == "failed", f"{report}\n{stderr}"
    for message in messages:
        assert message in report["error"], report["error"]
    assert_source_intact(guest)
    assert_destination_clean(agents, None)


def test_shared_qcow2_whose_backing_file_is_outside_the_roots_is_refused(
        agents, start_guest, tmp_path) -> None:
    base = tmp_path / "base.raw"             # outside the destination's allowed paths
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "4M"], check=True)
    shared = agents.b.home / "shared"        # inside them (its home)
    shared.mkdir()
    top = shared / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(top)], check=True)
    guest = start_guest(config=GuestConfig(ws_pages=100), ram_size=64 * MIB + PAD, name="mig",
                        extra_args=("-drive", f"file={top},format=qcow2,if=virtio"))
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path), "--storage", "shared")
    assert rc == 1 and report["status"] == "failed", f"{report}\n{stderr}"
    assert f"-drive 'file={top},format=qcow2,if=virtio' is refused" in report["error"]
    assert f"backing file '{base}' is outside the destination's allowed paths" in report["error"]
    assert_source_intact(guest)
    assert_destination_clean(agents, None)
    assert sorted(p.name for p in shared.iterdir()) == ["top.qcow2"]


# ---------------------------------------------------------------------------- convergence

def test_fast_dirtying_guest_is_throttled_into_converging(agents, start_guest) -> None:
    # 8000 pages/s (~32 MB/s of incompressible pages) against a 12 MB/s link.
    guest = boot(start_guest, ws_pages=4000, rate=8000, fill_pages=0)
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path), "--bandwidth", "12M",
                                        "--downtime-ms", "300", "--timeout", "60")
    assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
    assert report["throttle"] > 0, json.dumps(report)
    state = read_guest(agents.b.vm_record("mig").ram_path)
    assert state.errors == 0


def test_guest_that_cannot_converge_is_aborted_by_the_timeout(agents, start_guest) -> None:
    guest = boot(start_guest, ws_pages=2000, rate=0, fill_pages=0)
    rc, report, _ = agents.migrate("--qmp", str(guest.qmp_path), "--bandwidth", "1M",
                                   "--timeout", "3", "--compress", "off")
    assert rc == 1 and report["status"] == "failed"
    assert "did not converge within 3 s" in report["error"]
    assert report["total_ms"] < 15_000
    assert_source_intact(guest)
    assert_destination_clean(agents, None)


def test_timeout_action_force_switches_over_with_a_longer_downtime(agents,
                                                                   start_guest) -> None:
    # 2000 pages rewritten flat out against 8 MB/s: pre-copy cannot reach 300 ms.
    guest = boot(start_guest, ws_pages=2000, rate=0, fill_pages=0)
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path), "--bandwidth", "8M",
                                        "--timeout", "3", "--timeout-action", "force",
                                        "--compress", "off")
    assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
    assert "switching over with no downtime limit" in agents.a.log()
    assert report["total_ms"] > 3000 and report["downtime_ms"] > 300, report
    state = read_guest(agents.b.vm_record("mig").ram_path)
    assert state.errors == 0


def test_vm_with_several_monitors_and_named_options_migrates(agents, start_guest,
                                                            vm_dir) -> None:
    # The forms of VMs started by other tools: a second QMP monitor through -chardev/-mon,
    # an HMP monitor, and -name with options. The destination drops the monitors and
    # never reuses a socket path of the source.
    extra = ("-chardev", f"socket,id=mon2,path={vm_dir}/mon2.sock,server=on,wait=off",
             "-mon", "chardev=mon2,mode=control",
             "-monitor", f"unix:{vm_dir}/hmp.sock,server=on,wait=off",
             "-rtc", "base=utc")
    guest = start_guest(config=GuestConfig(ws_pages=1000, rate=2000), ram_size=64 * MIB + PAD,
                        name="mig", extra_args=extra)
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the first pass")
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path))
    assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
    dest_argv = Path(f"/proc/{report['dest_pid']}/cmdline").read_bytes().split(b"\0")
    assert not any(str(vm_dir).encode() in arg for arg in dest_argv)
    assert b"-mon" not in dest_argv and b"-monitor" not in dest_argv
    assert read_guest(agents.b.vm_record("mig").ram_path).errors == 0


def test_dead_qmp_socket_and_missing_path_give_clear_errors(agents, vm_dir) -> None:
    import socket as socket_mod

    rc, report, stderr = agents.migrate("--qmp", str(vm_dir / "nothing.sock"))
    assert rc == 1 and "no QMP socket at" in stderr
    stale = vm_dir / "stale.sock"
    with socket_mod.socket(socket_mod.AF_UNIX) as listener:
        listener.bind(str(stale))  # the file stays; nobody listens once it is closed
    rc, report, stderr = agents.migrate("--qmp", str(stale))
    assert rc == 1 and report.get("status") == "failed"
    assert "cannot open QMP socket" in report["error"] or "cannot reach" in report["error"]
    assert agents.b.leftovers() == []

"""`ferry import SOURCE --to PEER` end to end: two real agents (agent.localpair), images
made at test time with qemu-img, the CLI as a subprocess on agent a's host, the disks
read there and written by agent b; the copies compared with `qemu-img compare`, the
report's counters checked (zero runs never read nor sent, a warm pass sends only what
changed), the VM recorded on b and started there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import identity
from agent.service.control import ControlClient
from agent.state import vms
from tests.agents import AgentPair
from tests.test_import_e2e import VMX, make_image, same, wait_for_serial

pytestmark = pytest.mark.qemu
MIB = 1 << 20
BLOCK = 64 << 10


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fyi-"))      # short: sockets live below it
    (path / "src").mkdir()
    (path / "target").mkdir()
    (path / "elsewhere").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agents(root: Path) -> Iterator[AgentPair]:
    """a reads images under root/src; b writes under its home and root/target and has a
    network `lan` (a tap on nothing) for imported NICs."""
    pair = AgentPair.create(root, allow=(root / "target",))
    pair.a.allow = (root / "src",)
    with open(pair.b.home / "agent.toml", "a") as toml:
        toml.write('[networks.lan]\ntype = "none"\n')
    try:
        pair.start()
        yield pair
    finally:
        pair.cleanup()


def ferry_import(agents: AgentPair, *args: str) -> tuple[int, dict[str, Any], str]:
    """`ferry import ARGS --to hostb --json` on a: (exit status, report, stderr)."""
    done = subprocess.run([sys.executable, "-m", "agent", "import", *args, "--to", "hostb",
                           "--json", "--home", str(agents.a.home)],
                          capture_output=True, text=True, timeout=300, check=False)
    lines = done.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines else {}
    return done.returncode, report, done.stderr


def call(home: Path, request: dict[str, Any]) -> dict[str, Any]:
    with ControlClient(home / "control.sock") as client:
        return client.call(request)


@pytest.mark.parametrize("fmt,options", [("vmdk", "subformat=streamOptimized"),
                                         ("vmdk", "subformat=monolithicSparse"),
                                         ("vdi", ""), ("vhdx", "")])
def test_image_arrives_equal_on_the_peer_without_its_zeros(agents: AgentPair, root: Path,
                                                           fmt: str, options: str) -> None:
    source = root / "src" / f"disk.{fmt}"
    # 4 MiB of data in 64 MiB: 1 MiB of zeros written as data inside, 59 MiB of holes.
    make_image(source, fmt, [(0xAB, 1, 3), (0x00, 10, 1), (0xCD, 40, 1)], options=options)
    status, report, err = ferry_import(agents, str(source), "--name", "bare",
                                       "--memory", "64M")
    assert status == 0, (report, err, agents.logs())
    assert "ready to import" in err                  # the inspection's report came first
    assert report["status"] == "completed" and report["created"] and not report["started"]
    (disk,) = report["disks"]
    target = agents.b.home / "vms" / "bare" / "bare-disk0.qcow2"
    assert disk["target"] == f"hostb:{target}"
    assert same(source, target)
    assert disk["verified"] and disk["blocks_compared"] == 64 * MIB // BLOCK
    # Only the data blocks were read and sent; every block of a pattern is the same
    # block, so all but one of each pattern went as a copy of another (dedup).
    data_blocks = 4 * MIB // BLOCK
    if fmt != "vhdx":
        # vhdx allocates 32 MiB payload blocks: its zeros inside them are read (and
        # still not sent); the holes of the others are not even read.
        assert disk["bytes_read"] <= 5 * MIB and disk["zero_bytes_skipped"] >= 59 * MIB
    assert disk["blocks_written"] == data_blocks and disk["dedup_blocks"] >= data_blocks - 2
    assert disk["wire_bytes"] < 1 * MIB
    assert report["wire_bytes"] == disk["wire_bytes"]
    # Recorded on b, stopped; the job in a's history and the incoming one in b's.
    record = vms.load(agents.b.config, "bare")
    assert record.pid == 0 and (target.parent / "import.json").exists()
    mine = call(agents.a.home, {"op": "job", "id": report["job"]})
    assert mine["report"]["status"] == "completed" and mine["job"]["direction"] == "import"
    theirs = call(agents.b.home, {"op": "history"})["jobs"]
    assert [(j["direction"], j["status"]) for j in theirs] == [("import-in", "completed")]
    assert not (agents.a.home / "imports").exists()      # no warm state for one pass


def test_vmx_with_two_disks_boots_on_the_peer(agents: AgentPair, root: Path) -> None:
    from tests import bootdisk
    package = root / "src" / "web01"
    package.mkdir()
    vmx = (VMX.replace('memsize = "256"', 'memsize = "64"')
           .replace('scsi0:0.fileName', 'ide0:0.present = "TRUE"\nide0:0.fileName')
           .replace('scsi0.present = "TRUE"\nscsi0.virtualDev = "pvscsi"\n'
                    'scsi0:0.present = "TRUE"\n', '')
           + 'bios.hddOrder = "ide0:0"\n')        # the IDE disk boots
    (package / "web01.vmx").write_text(vmx)
    raw = bootdisk.make_boot_image(root / "boot.raw")
    subprocess.run(["qemu-img", "convert", "-q", "-O", "vmdk", "-o",
                    "subformat=monolithicSparse", str(raw), str(package / "web01.vmdk")],
                   check=True)
    make_image(package / "web01_1.vmdk", "vmdk", [(0x22, 8, 1)], size_mib=32,
               options="subformat=streamOptimized")
    status, report, err = ferry_import(agents, str(package / "web01.vmx"), "--format", "raw",
                                       "--dir", str(root / "target"),
                                       "--net-map", "VM Network=lan", "--start")
    assert status == 0, (report, err, agents.logs())
    assert report["created"] and report["started"], report
    # Each disk where the report says it went: the definition orders them by bus.
    went = {Path(d["source"]).name: Path(d["target"].removeprefix("hostb:"))
            for d in report["disks"]}
    assert sorted(p.parent for p in went.values()) == [root / "target"] * 2
    first, second = went["web01.vmdk"], went["web01_1.vmdk"]
    assert same(package / "web01.vmdk", first) and same(package / "web01_1.vmdk", second)
    assert [d["verified"] for d in report["disks"]] == [True, True]
    record = vms.load(agents.b.config, "web01")
    assert record.alive()
    said = wait_for_serial(agents.b.home / "vms" / "web01" / "serial.log",
                           (bootdisk.OK, bootdisk.BAD, bootdisk.READ_ERROR))
    assert said == bootdisk.OK
    # The record is in the VM's directory on b (where `ferry vm start` looks), its disks
    # in --dir.
    recorded = json.loads((agents.b.home / "vms" / "web01" / "import.json").read_text())
    assert sorted(d["path"] for d in recorded["disks"]) == sorted([str(first), str(second)])
    assert recorded["nics"][0]["mac"] == "00:50:56:aa:bb:cc"


def qemu_io(image: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True,
                   capture_output=True)


def test_warm_passes_send_what_changed_and_cutover_creates(agents: AgentPair,
                                                           root: Path) -> None:
    source = root / "src" / "live.qcow2"
    make_image(source, "qcow2", [(0x33, 0, 4), (0x34, 8, 4)])
    args = (str(source), "--name", "warm", "--memory", "64M")
    vm_dir = agents.b.home / "vms" / "warm"
    status, first, err = ferry_import(agents, *args, "--warm")
    assert status == 0, (first, err, agents.logs())
    (disk,) = first["disks"]
    assert disk["warm_pass"] == 1 and disk["blocks_changed"] == 8 * MIB // BLOCK
    assert not first["created"] and not (vm_dir / "import.json").exists()
    target = vm_dir / "warm-disk0.qcow2"
    assert same(source, target)
    # One block changed, one block of data zeroed: only those two go.
    qemu_io(source, "write -P 0x44 2M 64k")
    qemu_io(source, "write -z 9M 64k")
    status, second, err = ferry_import(agents, *args, "--warm")
    assert status == 0, (second, err, agents.logs())
    (disk,) = second["disks"]
    assert (disk["warm_pass"], disk["blocks_changed"], disk["blocks_written"],
            disk["blocks_zeroed"]) == (2, 2, 1, 1)
    assert disk["wire_bytes"] < 2 * BLOCK
    assert same(source, target)
    qemu_io(source, "write -P 0x55 6M 64k")
    status, last, err = ferry_import(agents, *args, "--cutover")
    assert status == 0, (last, err, agents.logs())
    (disk,) = last["disks"]
    assert (disk["warm_pass"], disk["blocks_changed"]) == (3, 1)
    assert last["created"] and same(source, target)
    assert (vm_dir / "import.json").exists()
    assert not list(vm_dir.glob("*.ferry-import"))              # the peer's markers gone
    assert not (agents.a.home / "imports" / "hostb" / "warm").exists()   # a's state too
    # Recorded stopped on b, and it starts there.
    started = subprocess.run([sys.executable, "-m", "agent", "vm", "start", "warm", "--home",
                              str(agents.b.home)], capture_output=True, text=True, check=False)
    assert started.returncode == 0, started.stderr
    assert vms.load(agents.b.config, "warm").alive()


def test_refusals_leave_nothing_on_the_peer(agents: AgentPair, root: Path) -> None:
    source = root / "src" / "disk.vdi"
    make_image(source, "vdi", [(0x66, 0, 1)], size_mib=16)
    outside = root / "elsewhere"
    status, report, err = ferry_import(agents, str(source), "--memory", "64M",
                                       "--dir", str(outside))
    assert status == 1 and report["status"] == "failed"
    assert "allowed" in report["error"] and str(outside) in report["error"], report
    assert list(outside.iterdir()) == [] and not any((agents.b.home / "vms").glob("*"))
    # An image outside a's own allowed paths is not read at all.
    stray = root / "stray.vdi"
    make_image(stray, "vdi", [(0x66, 0, 1)], size_mib=16)
    status, report, err = ferry_import(agents, str(stray), "--memory", "64M")
    assert status == 1 and "allowed" in err and "import source" in err and not report
    # A later warm pass whose target the peer no longer has (removed there meanwhile).
    status, report, err = ferry_import(agents, str(source), "--memory", "64M", "--warm")
    assert status == 0, (report, err)
    kept = agents.b.home / "vms" / "disk"
    shutil.rmtree(kept)
    status, report, err = ferry_import(agents, str(source), "--memory", "64M", "--warm")
    assert status == 1 and "no warm import target" in report["error"], report
    assert str(agents.a.home / "imports" / "hostb" / "disk") in report["error"]
    assert not kept.exists()
    # A peer a does not know, and a peer that no longer trusts a.
    done = subprocess.run([sys.executable, "-m", "agent", "import", str(source), "--memory",
                           "64M", "--to", "nosuch", "--home", str(agents.a.home)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "no trusted peer named 'nosuch'" in done.stderr
    assert identity.untrust_peer(agents.b.home, "hosta")
    status, report, err = ferry_import(agents, str(source), "--memory", "64M")
    assert status == 1 and report["status"] == "failed", (report, err)
    assert "trust" in report["error"].lower() or "refused" in report["error"].lower(), report
    assert not any((agents.b.home / "vms").glob("*"))
    assert list((root / "target").iterdir()) == []


def test_a_cancelled_pass_leaves_nothing_on_the_peer(root: Path) -> None:
    """Held after its first disk batch (FERRY_TEST_HOLD), the import is cancelled: the
    peer had created its target, and removes it with its directory."""
    pair = AgentPair.create(root, allow=(root / "target",))
    pair.a.allow = (root / "src",)
    pair.a.env = {"FERRY_TEST_HOLD": "source:send:disk-batch"}
    try:
        pair.start()
        source = root / "src" / "disk.vmdk"
        make_image(source, "vmdk", [(0x5A, 0, 8)], options="subformat=streamOptimized")
        cli = subprocess.Popen([sys.executable, "-m", "agent", "import", str(source),
                                "--memory", "64M", "--to", "hostb", "--json", "--home",
                                str(pair.a.home)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        marker = pair.a.home / "hold-source-send-disk-batch"
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert cli.poll() is None and time.monotonic() < deadline, pair.logs()
            time.sleep(0.02)
        target = pair.b.home / "vms" / "disk" / "disk-disk0.qcow2"
        assert target.exists()                      # made by the peer, mid-pass
        (job,) = call(pair.a.home, {"op": "jobs"})["jobs"]
        assert (job["direction"], job["vm"], job["peer"]) == ("import", "disk", "hostb")
        assert call(pair.a.home, {"op": "cancel", "id": job["job"]})["ok"]
        out, err = cli.communicate(timeout=60)
        report = json.loads(out.strip().splitlines()[-1])
        assert cli.returncode == 1 and report["status"] == "cancelled", (report, err)
        assert not target.exists() and not any((pair.b.home / "vms").glob("*"))
        (theirs,) = call(pair.b.home, {"op": "history"})["jobs"]
        assert (theirs["direction"], theirs["status"]) == ("import-in", "failed")
    finally:
        pair.cleanup()

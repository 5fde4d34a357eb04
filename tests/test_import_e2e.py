"""`ferry import ... --local` end to end, as an operator runs it: real images made with
qemu-img, the CLI as a subprocess, the imported VM started by QEMU and looked at over
QMP (its disks on the buses the source named, its NIC's MAC), the copies compared with
`qemu-img compare`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.qemu import firmware, nics, qmp, vm
from agent.state import vms
from agent.state.config import load_config

pytestmark = pytest.mark.qemu
MIB = 1 << 20


def make_image(path: Path, fmt: str, writes: list[tuple[int, int, int]],
               size_mib: int = 64, options: str = "") -> None:
    """An image of `fmt` whose content is raw `writes` (pattern, offset MiB, length MiB)."""
    raw = path.with_suffix(".seed")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), f"{size_mib}M"],
                   check=True)
    for pattern, offset, length in writes:
        subprocess.run(["qemu-io", "-f", "raw", "-c",
                        f"write -P {pattern} {offset}M {length}M", str(raw)],
                       check=True, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-q", "-O", fmt, *(["-o", options] if options else []),
                    str(raw), str(path)], check=True)
    raw.unlink()


def ferry(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "import", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=300, check=False)


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True, check=False).returncode == 0


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """An agent home with one network (a tap on nothing); every VM started in it is
    killed at the end."""
    home = tmp_path / "home"
    home.mkdir()
    ram = Path(tempfile.mkdtemp(prefix="ferry-test-", dir=vm.SHM_DIR))
    (home / "agent.toml").write_text(f'ram_dir = "{ram}"\n[networks.lan]\ntype = "none"\n')
    yield home
    for record in vms.list_vms(load_config(home)):
        if record.alive():
            os.kill(record.pid, signal.SIGKILL)
    shutil.rmtree(ram, ignore_errors=True)


def block_devices(record: vms.VmRecord) -> dict[str, Any]:
    """QOM path of each disk's device -> (its image file, the device's type)."""
    async def read() -> dict[str, Any]:
        async with qmp.connect(record.qmp_path) as q:
            out = {}
            for block in await q.execute("query-block"):
                inserted = block.get("inserted") or {}
                kind = await q.execute("qom-get", {"path": block["qdev"], "property": "type"})
                out[inserted.get("file")] = kind
            out["macs"] = await nics.guest_macs(q)
            return out
    return asyncio.run(read())


def test_bare_streamoptimized_vmdk_becomes_a_running_vm_with_its_nic(home: Path,
                                                                    tmp_path: Path) -> None:
    source = tmp_path / "disk.vmdk"
    make_image(source, "vmdk", [(0xAB, 1, 3), (0xCD, 40, 1)],
               options="subformat=streamOptimized")
    done = ferry(home, str(source), "--local", "--name", "bare", "--memory", "128M",
                 "--nic", "lan,mac=00:50:56:01:02:03,model=e1000", "--start")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ready to import" in done.stdout and "verified True" in done.stdout
    target = home / "vms" / "bare" / "bare-disk0.qcow2"
    assert same(source, target)
    # Only the 4 MiB of data crossed: the 60 MiB of zeros were never read nor written.
    assert "4.0 MiB written, 60.0 MiB zero skipped" in done.stdout
    record = vms.load(load_config(home), "bare")
    assert record.alive()
    devices = block_devices(record)
    assert devices[str(target)] == "ide-hd"              # SATA: an AHCI port
    assert list(devices["macs"].values()) == ["00:50:56:01:02:03"]
    recorded = json.loads((home / "vms" / "bare" / "import.json").read_text())
    assert recorded["disks"][0]["path"] == str(target)
    again = ferry(home, str(source), "--local", "--name", "bare", "--memory", "128M")
    assert again.returncode == 1 and "already imported" in again.stderr


VMX = """\
.encoding = "UTF-8"
displayName = "web01"
numvcpus = "2"
cpuid.coresPerSocket = "2"
memsize = "256"
guestOS = "debian12-64"
uuid.bios = "56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web01.vmdk"
sata0.present = "TRUE"
sata0:1.present = "TRUE"
sata0:1.fileName = "web01_1.vmdk"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "static"
ethernet0.address = "00:50:56:aa:bb:cc"
"""


def test_vmware_vm_arrives_with_its_buses_mac_and_uuid(home: Path, tmp_path: Path) -> None:
    package = tmp_path / "web01"
    package.mkdir()
    (package / "web01.vmx").write_text(VMX)
    make_image(package / "web01.vmdk", "vmdk", [(0x11, 0, 2)], options="subformat=monolithicSparse")
    make_image(package / "web01_1.vmdk", "vmdk", [(0x22, 8, 1)], size_mib=32,
               options="subformat=monolithicFlat")
    inspect = ferry(home, str(package / "web01.vmx"), "--inspect")
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    unmapped = ferry(home, str(package / "web01.vmx"), "--local", "--start")
    assert unmapped.returncode == 1 and "--net-map" in unmapped.stderr
    assert not (home / "vms" / "web01").exists()          # refused before any copy
    done = ferry(home, str(package / "web01.vmx"), "--local", "--net-map", "VM Network=lan",
                 "--format", "raw", "--start")
    assert done.returncode == 0, done.stdout + done.stderr
    vm_dir = home / "vms" / "web01"
    first, second = vm_dir / "web01-disk0.raw", vm_dir / "web01-disk1.raw"
    assert same(package / "web01.vmdk", first) and same(package / "web01_1.vmdk", second)
    record = vms.load(load_config(home), "web01")
    devices = block_devices(record)
    assert devices[str(first)] == "scsi-hd" and devices[str(second)] == "ide-hd"
    assert list(devices["macs"].values()) == ["00:50:56:aa:bb:cc"]

    async def uuid() -> str:
        async with qmp.connect(record.qmp_path) as q:
            return str((await q.execute("query-uuid"))["UUID"])
    assert asyncio.run(uuid()) == "564d1234-5678-9abc-def0-123456789abc"


def test_warm_passes_send_what_changed_and_cutover_creates(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "live.qcow2"
    make_image(source, "qcow2", [(0x33, 0, 8)])
    args = (str(source), "--local", "--name", "warm", "--memory", "128M")
    first = ferry(home, *args, "--warm")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "pass 1" in first.stdout and "8.0 MiB written" in first.stdout
    assert not (home / "vms" / "warm" / "import.json").exists()    # not created yet
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 2M 64k", str(source)],
                   check=True, capture_output=True)
    second = ferry(home, *args, "--warm")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "pass 2" in second.stdout and "1 blocks changed, 64.0 KiB written" in second.stdout
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 6M 64k", str(source)],
                   check=True, capture_output=True)
    last = ferry(home, *args, "--cutover")
    assert last.returncode == 0, last.stdout + last.stderr
    assert "pass 3" in last.stdout and "1 blocks changed" in last.stdout
    target = home / "vms" / "warm" / "warm-disk0.qcow2"
    assert same(source, target)
    assert (home / "vms" / "warm" / "import.json").exists()
    assert not list((home / "vms" / "warm").glob("*.ferry-warm"))


def test_refusals_copy_nothing(home: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    make_image(base, "qcow2", [(0x66, 0, 1)])
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(overlay)], check=True)
    done = ferry(home, str(overlay), "--local", "--memory", "128M")
    assert done.returncode == 1 and "backing file" in (done.stdout + done.stderr)
    outside = ferry(home, str(base), "--local", "--memory", "128M", "--dir", str(tmp_path / "x"))
    assert outside.returncode == 1 and "allowed" in outside.stderr
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())
    nowhere = ferry(home, str(base), "--memory", "128M")
    assert nowhere.returncode == 1 and "--local" in nowhere.stderr


def test_disks_put_elsewhere_with_dir_still_start_by_name(home: Path, tmp_path: Path) -> None:
    """--dir holds the disks; the VM's record stays where `ferry vm start NAME` looks."""
    pool = tmp_path / "pool"
    pool.mkdir()
    toml = home / "agent.toml"
    toml.write_text(f'allow_paths = ["{pool}"]\n' + toml.read_text())   # before any table
    image = tmp_path / "app.qcow2"
    make_image(image, "qcow2", [(0x44, 0, 1)])
    done = ferry(home, str(image), "--local", "--memory", "64M", "--name", "app",
                 "--dir", str(pool))
    assert done.returncode == 0, done.stderr
    assert [p.name for p in pool.iterdir()] == ["app-disk0.qcow2"]
    started = subprocess.run([sys.executable, "-m", "agent", "vm", "start", "app", "--home",
                              str(home)], capture_output=True, text=True, check=False)
    assert started.returncode == 0, started.stderr
    record = vms.load(load_config(home), "app")
    assert record.alive() and str(pool / "app-disk0.qcow2") in block_devices(record)


def test_ova_disks_are_copied_in_place_from_the_package(home: Path, tmp_path: Path) -> None:
    from tests.test_import_parse import DATA, build_ova, manifest, set_file_sizes
    disks = tmp_path / "disks"
    disks.mkdir()
    make_image(disks / "appliance-disk1.vmdk", "vmdk", [(0x77, 1, 2)], size_mib=16,
               options="subformat=streamOptimized")
    make_image(disks / "appliance-disk2.vmdk", "vmdk", [(0x88, 4, 1)], size_mib=8,
               options="subformat=streamOptimized")
    files = {p.name: p.read_bytes() for p in sorted(disks.iterdir())}
    ovf = set_file_sizes((DATA / "ovf" / "appliance.ovf").read_text(),
                         {n: len(b) for n, b in files.items()})
    files = {"appliance.ovf": ovf.encode(), **files}
    package = tmp_path / "pkg"
    package.mkdir()
    ova = build_ova(package / "appliance.ova", files, manifest(files))
    done = ferry(home, str(ova), "--local", "--net-map", "VM Network=lan",
                 "--net-map", "Storage=lan")
    assert done.returncode == 0, done.stdout + done.stderr
    vm_dir = home / "vms" / "appliance"
    assert same(disks / "appliance-disk1.vmdk", vm_dir / "appliance-disk0.qcow2")
    assert same(disks / "appliance-disk2.vmdk", vm_dir / "appliance-disk1.qcow2")
    assert sorted(p.name for p in package.iterdir()) == ["appliance.ova"]   # not unpacked
    # UEFI: started under OVMF, with a variable store of its own in its directory.
    start = ferry(home, str(ova), "--local", "--name", "again", "--net-map", "VM Network=lan",
                  "--net-map", "Storage=lan", "--start")
    assert start.returncode == 0, start.stdout + start.stderr
    record = vms.load(load_config(home), "again")
    assert record.alive()
    flash = {d: f for d, f in block_devices(record).items() if f == "cfi.pflash01"}
    assert flash == {str(firmware.find_uefi("q35").code): "cfi.pflash01",
                     str(home / "vms" / "again" / firmware.VARS_FILE): "cfi.pflash01"}


def test_imported_vm_starts_later_and_exports_to_an_ova_ferry_reads_back(home: Path,
                                                                        tmp_path: Path) -> None:
    package = tmp_path / "web01"
    package.mkdir()
    (package / "web01.vmx").write_text(VMX)
    make_image(package / "web01.vmdk", "vmdk", [(0x11, 0, 2)], options="subformat=monolithicSparse")
    make_image(package / "web01_1.vmdk", "vmdk", [(0x22, 8, 1)], size_mib=32,
               options="subformat=monolithicFlat")
    done = ferry(home, str(package / "web01.vmx"), "--local", "--net-map", "VM Network=lan")
    assert done.returncode == 0 and "ferry vm start web01" in done.stdout, done.stderr
    config = load_config(home)
    assert not vms.load(config, "web01").alive()                   # known here, stopped
    cli = [sys.executable, "-m", "agent"]
    started = subprocess.run([*cli, "vm", "start", "web01", "--home", str(home)],
                             capture_output=True, text=True, check=False)
    assert started.returncode == 0, started.stderr
    record = vms.load(config, "web01")
    assert record.alive() and list(block_devices(record)["macs"].values()) == \
        ["00:50:56:aa:bb:cc"]
    out = tmp_path / "out"
    out.mkdir()
    export = [*cli, "export", "web01", str(out), "--home", str(home)]
    running = subprocess.run([*export, "--format", "ova"], capture_output=True, text=True,
                             check=False)
    assert running.returncode == 1 and "is running" in running.stderr
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while vms.load(config, "web01").alive():               # not our child: /proc says
        assert time.monotonic() < deadline, "QEMU did not go"
        time.sleep(0.05)
    for fmt, pattern in (("ova", "web01.ova"), ("vhdx", "web01-disk*.vhdx")):
        written = subprocess.run([*export, "--format", fmt], capture_output=True, text=True,
                                 check=False)
        assert written.returncode == 0, written.stderr
        assert list(out.glob(pattern))
    vm_dir = home / "vms" / "web01"
    assert same(vm_dir / "web01-disk0.qcow2", out / "web01-disk0.vhdx")
    # The OVA is one ferry reads back into the same VM: CPUs, memory, buses, the MAC.
    back = subprocess.run([*cli, "import", str(out / "web01.ova"), "--inspect", "--json"],
                          capture_output=True, text=True, check=False)
    assert back.returncode == 0, back.stdout + back.stderr
    again = json.loads(back.stdout)
    assert (again["cpus"], again["cores"], again["memory"]) == (2, 2, 256 * MIB)
    assert [(d["bus"], d["unit"], d["virtual_size"]) for d in again["disks"]] == \
        [("scsi-pvscsi", 0, 64 * MIB), ("sata", 1, 32 * MIB)]
    assert [(n["model"], n["mac"]) for n in again["nics"]] == [("vmxnet3", "00:50:56:aa:bb:cc")]


def wait_for_serial(path: Path, words: tuple[str, ...], timeout: float = 60) -> str:
    """The first of `words` the VM's serial console says (polled until the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        for word in words:
            if word in text:
                return word
        time.sleep(0.1)
    raise AssertionError(f"the VM said none of {words} within {timeout:g} s")


@pytest.mark.parametrize("fmt,options", [("vmdk", "subformat=streamOptimized"),
                                         ("vmdk", "subformat=twoGbMaxExtentSparse"),
                                         ("vhdx", ""), ("vpc", "subformat=dynamic"),
                                         ("vpc", "subformat=fixed"), ("vdi", ""),
                                         ("qcow2", "")])
def test_imported_disk_boots_and_finds_its_data_intact(home: Path, tmp_path: Path, fmt: str,
                                                      options: str) -> None:
    from tests import bootdisk
    raw = bootdisk.make_boot_image(tmp_path / "boot.raw")
    source = tmp_path / f"boot.{fmt}"
    subprocess.run(["qemu-img", "convert", "-q", "-O", fmt,
                    *(["-o", options] if options else []), str(raw), str(source)], check=True)
    done = ferry(home, str(source), "--local", "--name", "boot", "--memory", "64M", "--start")
    assert done.returncode == 0, done.stdout + done.stderr
    said = wait_for_serial(home / "vms" / "boot" / "serial.log",
                           (bootdisk.OK, bootdisk.BAD, bootdisk.READ_ERROR))
    assert said == bootdisk.OK


def test_boot_check_catches_a_changed_byte(tmp_path: Path) -> None:
    """The negative control: the same boot sector over data with one byte changed says BAD."""
    from agent.qemu import vm
    from tests import bootdisk
    raw = bootdisk.make_boot_image(tmp_path / "boot.raw")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 300000 1", str(raw)],
                   check=True, capture_output=True)
    serial = tmp_path / "serial.log"
    accel = vm.choose_accel()
    qemu = subprocess.Popen(["qemu-system-x86_64", *accel.args(), "-nodefaults",
                             "-display", "none", "-m", "64", "-no-reboot",
                             "-drive", f"file={raw},format=raw,if=ide",
                             "-serial", f"file:{serial}"])
    try:
        said = wait_for_serial(serial, (bootdisk.OK, bootdisk.BAD, bootdisk.READ_ERROR))
    finally:
        qemu.kill()
        qemu.wait()
    assert said == bootdisk.BAD

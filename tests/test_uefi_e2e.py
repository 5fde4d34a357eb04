"""An imported UEFI VM under OVMF, end to end: a VMware package with firmware="efi" whose
disk (a FAT file system made at test time by QEMU's vvfat, as a vmdk) carries a UEFI
shell script, startup.nsh. OVMF boots, finds no boot loader, starts its UEFI shell, and
the shell runs the script from the disk: what it prints on the serial console is the
firmware's own output. The script reads and sets a non-volatile UEFI variable, so a
second boot shows whether the variable store was kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.qemu import firmware, vm
from agent.state import vms
from agent.state.config import load_config
from tests.agents import AgentPair
from tests.test_import_e2e import wait_for_serial

pytestmark = pytest.mark.qemu

GUID = "3f0c3fe0-8a63-4b6e-9d8a-5c5e2a1f0e01"
MARK = "FerryMark"
# The UEFI shell's setvar prints the variable when it exists, else "Unable to get".
MARK_KEPT = f"{MARK} - 0008 Bytes"        # L"kept": 4 UTF-16 characters
MARK_ABSENT = "Unable to get"
DONE = "ferry-uefi-done"
BOOT_WAIT_S = 120.0                        # OVMF and its shell under TCG take ~10 s here

FIRST_BOOT = f"""\
echo ferry-uefi-script
setvar {MARK} -guid {GUID}
setvar {MARK} -guid {GUID} -nv -bs =L"kept"
echo {DONE}
reset -s
"""
# Ticks until stopped: a guest that keeps running while it migrates.
TICKING = f"""\
setvar {MARK} -guid {GUID} -nv -bs =L"kept"
echo ferry-uefi-ticking
for %a run (1 100000)
  echo ferry-tick %a
  stall 100000
endfor
"""

VMX = """\
.encoding = "UTF-8"
displayName = "{name}"
numvcpus = "1"
memsize = "128"
firmware = "efi"
uefi.secureBoot.enabled = "FALSE"
guestOS = "windows9-64"
sata0.present = "TRUE"
sata0:0.present = "TRUE"
sata0:0.fileName = "{name}.vmdk"
"""


def uefi_package(where: Path, name: str, script: str) -> Path:
    """A .vmx with firmware="efi" and one SATA disk holding `script` as startup.nsh."""
    files = where / f"{name}-fat"
    files.mkdir(parents=True)
    (files / "startup.nsh").write_bytes(script.replace("\n", "\r\n").encode())
    package = where / name
    package.mkdir()
    subprocess.run(["qemu-img", "convert", "-q", "-f", "vvfat", "-O", "vmdk", "-o",
                    "subformat=monolithicSparse", f"fat:16:{files}",
                    str(package / f"{name}.vmdk")], check=True)
    vmx = package / f"{name}.vmx"
    vmx.write_text(VMX.format(name=name))
    return vmx


def ferry(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=300, check=False)


def wait_gone(home: Path, name: str, timeout: float = BOOT_WAIT_S) -> None:
    """Until the VM's QEMU has exited (the guest powered off)."""
    deadline = time.monotonic() + timeout
    while vms.load(load_config(home), name).alive():
        assert time.monotonic() < deadline, f"{name} did not power off"
        time.sleep(0.1)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "ram").mkdir()
    (home / "agent.toml").write_text(f'ram_dir = "{tmp_path / "ram"}"\n')   # not /dev/shm
    yield home
    for record in vms.list_vms(load_config(home)):
        if record.alive():
            os.kill(record.pid, signal.SIGKILL)


def test_imported_uefi_vm_boots_ovmf_and_keeps_its_variables(home: Path,
                                                              tmp_path: Path) -> None:
    vmx = uefi_package(tmp_path, "efi01", FIRST_BOOT)
    done = ferry(home, "import", str(vmx), "--local")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "UEFI variables" in done.stdout                 # the warning stays
    vm_dir = home / "vms" / "efi01"
    variables = vm_dir / firmware.VARS_FILE
    uefi = firmware.find_uefi("q35")

    first = ferry(home, "vm", "start", "efi01")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"fresh variables in {variables}" in first.stdout
    record = vms.load(load_config(home), "efi01")
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={uefi.code}" in record.argv
    assert f"if=pflash,format=raw,unit=1,file={variables}" in record.argv
    serial = vm_dir / "serial.log"
    assert wait_for_serial(serial, (DONE,), BOOT_WAIT_S) == DONE
    said = serial.read_text(errors="replace")
    assert "UEFI Interactive Shell" in said and MARK_ABSENT in said and MARK_KEPT not in said
    wait_gone(home, "efi01")                                # reset -s: powered off
    assert variables.read_bytes() != uefi.vars_template.read_bytes()   # OVMF wrote it

    second = ferry(home, "vm", "start", "efi01")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"variables kept in {variables}" in second.stdout
    assert wait_for_serial(serial, (DONE,), BOOT_WAIT_S) == DONE
    said = serial.read_text(errors="replace")                # a new file each start
    assert MARK_KEPT in said and MARK_ABSENT not in said
    wait_gone(home, "efi01")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[AgentPair]:
    (tmp_path / "target").mkdir()
    agents = AgentPair.create(tmp_path, allow=(tmp_path / "target",))
    try:
        agents.start()
        yield agents
    finally:
        agents.cleanup()


def ticks(serial: Path) -> int:
    """The last tick the guest's UEFI shell script printed (0 before the first)."""
    text = serial.read_text(errors="replace") if serial.exists() else ""
    found = [int(word) for line in text.splitlines() if "ferry-tick " in line
             for word in line.split("ferry-tick ", 1)[1].split()[:1] if word.isdigit()]
    return max(found, default=0)


def wait_ticks(serial: Path, beyond: int, timeout: float = BOOT_WAIT_S) -> int:
    deadline = time.monotonic() + timeout
    while (now := ticks(serial)) <= beyond:
        assert time.monotonic() < deadline, f"no tick past {beyond} in {serial}"
        time.sleep(0.1)
    return now


def test_running_uefi_vm_live_migrates_with_its_variables(pair: AgentPair,
                                                          tmp_path: Path) -> None:
    vmx = uefi_package(tmp_path, "efi02", TICKING)
    done = ferry(pair.a.home, "import", str(vmx), "--local", "--start")
    assert done.returncode == 0, done.stdout + done.stderr
    source_dir = pair.a.home / "vms" / "efi02"
    before = wait_ticks(source_dir / "serial.log", 2)       # the script runs, var set
    disk = source_dir / "efi02-disk0.qcow2"
    rc, report, err = pair.migrate("efi02", "--disk-map",
                                   f"{disk}={tmp_path / 'target' / 'efi02.qcow2'}")
    assert rc == 0, err + pair.logs()
    print({k: report.get(k) for k in ("downtime_ms", "total_ms", "ram_bytes", "pages_sent",
                                      "wire_bytes", "disk_bytes")})
    assert report["status"] == "completed" and report["error"] is None
    assert [d["path"] for d in report["disks"]] == [str(disk)]   # the flash is no disk
    moved = pair.b.vm_record("efi02")
    assert moved.alive()
    dest_vars = pair.b.home / "vms" / "efi02" / firmware.VARS_FILE
    argv = vm.read_argv(moved.pid)                            # b's QEMU as it runs
    assert f"if=pflash,format=raw,unit=1,file={dest_vars}" in argv
    assert not any(str(source_dir) in arg for arg in argv)
    # The guest goes on where it was: its shell script keeps ticking on b.
    after = wait_ticks(pair.b.home / "vms" / "efi02" / "serial.log", 0)
    assert after > before
    # b's own variable store, made from its template, now holds what the guest set on a
    # (QEMU sent the flash in the stream and wrote it out at resume).
    mark = MARK.encode("utf-16-le")
    assert mark not in firmware.find_uefi("q35").vars_template.read_bytes()
    deadline = time.monotonic() + 10
    while mark not in dest_vars.read_bytes():
        assert time.monotonic() < deadline, "b's variable store lacks the guest's variable"
        time.sleep(0.1)

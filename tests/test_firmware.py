"""UEFI firmware by QEMU's descriptors (agent.qemu.firmware): which one a VM gets, the
error when none is installed, the VM's own variable store, the pflash argv; and what a
destination makes of a UEFI VM's argv (agent.qemu.destargv's pflash rewrite)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.commands.vm_cmds import start_imported
from agent.errors import UserError
from agent.importer.definition import DiskDef, VmDefinition
from agent.qemu import firmware
from agent.qemu.destargv import DestinationPaths, destination_argv
from agent.qemu.vmspec import VmSpec
from agent.state.config import load_config
from agent.storage.disk_source import copyable_disks


def descriptor(directory: Path, name: str, code: Path, template: Path, *,
               features: tuple[str, ...] = (), arch: str = "x86_64",
               machines: tuple[str, ...] = ("pc-i440fx-*", "pc-q35-*")) -> Path:
    """A firmware descriptor as Debian's ovmf installs them (docs/interop/firmware.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps({
        "description": name, "interface-types": ["uefi"],
        "mapping": {"device": "flash",
                    "executable": {"filename": str(code), "format": "raw"},
                    "nvram-template": {"filename": str(template), "format": "raw"}},
        "targets": [{"architecture": arch, "machines": list(machines)}],
        "features": list(features), "tags": []}))
    return path


@pytest.fixture
def ovmf(tmp_path: Path) -> dict[str, Path]:
    """Two builds, as Debian ships them: a Secure Boot one (whose descriptor sorts first)
    and a plain one, each a code image and a variable template of its own size."""
    share = tmp_path / "OVMF"
    share.mkdir()
    files = {}
    for build, size in (("secboot", 4), ("plain", 8)):
        files[f"{build}_code"] = share / f"CODE.{build}.fd"
        files[f"{build}_code"].write_bytes(b"\xc0" * 4096 * size)
        files[f"{build}_vars"] = share / f"VARS.{build}.fd"
        files[f"{build}_vars"].write_bytes(bytes([size]) * 1024 * size)
    pkg = tmp_path / "usr-share-qemu-firmware"
    descriptor(pkg, "50-secure.json", files["secboot_code"], files["secboot_vars"],
               features=("secure-boot", "requires-smm"))
    descriptor(pkg, "55-arm.json", files["plain_code"], files["plain_vars"], arch="aarch64")
    descriptor(pkg, "60-plain.json", files["plain_code"], files["plain_vars"])
    (pkg / "10-broken.json").write_text("{ not json")
    return {**files, "pkg": pkg, "etc": tmp_path / "etc-qemu-firmware"}


def test_the_plain_build_for_the_machine_is_chosen(ovmf):
    for machine in ("q35", "pc", "pc-q35-7.2"):
        uefi = firmware.find_uefi(machine, [ovmf["etc"], ovmf["pkg"]])
        assert (uefi.code, uefi.vars_template) == (ovmf["plain_code"], ovmf["plain_vars"])
        assert uefi.descriptor == ovmf["pkg"] / "60-plain.json"
    with pytest.raises(UserError, match="machine microvm"):
        firmware.find_uefi("microvm", [ovmf["pkg"]])


def test_a_host_descriptor_hides_the_packages_of_the_same_name(ovmf, tmp_path):
    other_code, other_vars = tmp_path / "own.fd", tmp_path / "own-vars.fd"
    other_code.write_bytes(b"c" * 4096)
    other_vars.write_bytes(b"v" * 4096)
    descriptor(ovmf["etc"], "60-plain.json", other_code, other_vars)
    uefi = firmware.find_uefi("q35", [ovmf["etc"], ovmf["pkg"]])
    assert uefi.code == other_code and uefi.descriptor == ovmf["etc"] / "60-plain.json"


def test_no_firmware_names_the_package_to_install(tmp_path, ovmf):
    with pytest.raises(UserError) as empty:
        firmware.find_uefi("q35", [tmp_path / "none", tmp_path / "nothing"])
    assert "install Debian's ovmf package (apt-get install ovmf" in str(empty.value)
    # A descriptor left behind by a removed package: its missing files are named too.
    ovmf["plain_code"].unlink()
    with pytest.raises(UserError) as gone:
        firmware.find_uefi("q35", [ovmf["pkg"]])
    assert str(ovmf["plain_code"]) in str(gone.value) and "missing" in str(gone.value)
    assert "apt-get install ovmf" in str(gone.value)


def test_variable_store_is_copied_once_and_kept(ovmf, tmp_path):
    store = tmp_path / "vm" / firmware.VARS_FILE
    store.parent.mkdir()
    assert firmware.ensure_vars(ovmf["plain_vars"], store) is True
    assert store.read_bytes() == ovmf["plain_vars"].read_bytes()
    assert store.stat().st_mode & 0o777 == 0o600
    store.write_bytes(b"\x01" * store.stat().st_size)             # the guest's variables
    assert firmware.ensure_vars(ovmf["plain_vars"], store) is False
    assert store.read_bytes() == b"\x01" * store.stat().st_size   # kept
    assert firmware.ensure_vars(ovmf["plain_vars"], store, fresh=True) is True
    assert store.read_bytes() == ovmf["plain_vars"].read_bytes()
    with pytest.raises(UserError, match="move it away"):
        firmware.ensure_vars(ovmf["secboot_vars"], store)          # another build's size
    assert not list(store.parent.glob("*.part"))


def test_pflash_arguments(ovmf, tmp_path):
    uefi = firmware.find_uefi("q35", [ovmf["pkg"]])
    assert uefi.pflash_arguments(tmp_path / "v.fd") == [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf['plain_code']}",
        "-drive", f"if=pflash,format=raw,unit=1,file={tmp_path / 'v.fd'}"]
    # A comma in a path is QemuOpts' doubled comma, not a new option.
    assert uefi.pflash_arguments(Path("/vms/a,b/v.fd"))[3].endswith("file=/vms/a,,b/v.fd")


def uefi_definition(tmp_path: Path) -> VmDefinition:
    return VmDefinition(name="efi", memory=64 << 20, firmware="uefi", machine="q35",
                        disks=(DiskDef(path=tmp_path / "d.qcow2", format="qcow2"),))


def test_starting_a_uefi_vm_without_ovmf_is_refused_naming_the_package(tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(firmware, "DESCRIPTOR_DIRS", (tmp_path / "no-firmware",))
    home = tmp_path / "home"
    home.mkdir()
    with pytest.raises(UserError, match="apt-get install ovmf"):
        start_imported(load_config(home), uefi_definition(tmp_path), private=False)
    assert not (home / "vms" / "efi").exists()                  # nothing made


def test_import_start_without_ovmf_is_refused_before_copying(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(firmware, "DESCRIPTOR_DIRS", (tmp_path / "no-firmware",))
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "efi.vmx").write_text('displayName = "efi"\nmemsize = "64"\n'
                                     'firmware = "efi"\n')
    home = tmp_path / "home"
    home.mkdir()
    assert main(["import", str(package / "efi.vmx"), "--local", "--start",
                 "--home", str(home)]) == 1
    assert "install Debian's ovmf package" in capsys.readouterr().err
    assert not (home / "vms" / "efi").exists()


# ------------------------------------------------------------------ the destination

@pytest.fixture
def dest(tmp_path: Path, ovmf) -> dict[str, Any]:
    root = tmp_path / "root"
    (root / "vms" / "w").mkdir(parents=True)
    data = tmp_path / "qemu-data"
    data.mkdir()
    return {"root": root, "data": data, "ovmf": ovmf,
            "paths": DestinationPaths.under(root / "vms" / "w", root, "w"),
            "flash": {ovmf["plain_code"].resolve(): ovmf["plain_vars"]}}


def dest_argv(dest: dict[str, Any], *drives: str,
              copies: list[tuple[Path, Path]] | None = None) -> list[str]:
    args: list[str] = ["-name", "w", "-machine", "q35", "-m", "64M", "-nodefaults"]
    for drive in drives:
        args += ["-drive", drive]
    spec = VmSpec(name="w", argv=tuple(args), ram_size=64 << 20, ram_backend_id="pc.ram")
    return destination_argv(spec, dest["paths"], [dest["root"]], "qemu-system-x86_64",
                            data_dirs=[dest["data"]], flash_code=dest["flash"],
                            vars_copies=copies)


SOURCE_VARS = "/srv/source-host/vms/w/uefi-vars.fd"


def test_destination_keeps_the_code_image_and_makes_its_own_variable_store(dest):
    code = dest["ovmf"]["plain_code"]
    copies: list[tuple[Path, Path]] = []
    out = dest_argv(dest, f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                    f"if=pflash,format=raw,unit=1,file={SOURCE_VARS}", copies=copies)
    own = dest["paths"].vm_dir / firmware.VARS_FILE
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={code}" in out
    assert f"if=pflash,format=raw,unit=1,file={own}" in out
    assert not any(SOURCE_VARS in arg for arg in out)
    assert copies == [(dest["ovmf"]["plain_vars"], own)]


@pytest.mark.parametrize("drives,message", [
    # a code image that is neither bundled, named by a descriptor nor under a root
    (("if=pflash,format=raw,unit=0,readonly=on,file={outside}",), "is outside"),
    # variables without a code image this host pairs with a template
    (("if=pflash,format=raw,unit=1,file=" + SOURCE_VARS,), "needs a read-only code image"),
    (("if=pflash,format=raw,unit=0,readonly=on,file={rooted}",
      "if=pflash,format=raw,unit=1,file=" + SOURCE_VARS), "needs a read-only code image"),
    (("if=pflash,format=raw,unit=0,readonly=on,file={code}",
      "if=pflash,format=raw,unit=1,file=" + SOURCE_VARS,
      "if=pflash,format=raw,unit=2,file=" + SOURCE_VARS), "a second writable pflash"),
    (("if=pflash,format=vvfat,unit=0,readonly=on,file={code}",), "block driver 'vvfat'"),
    (("if=pflash,format=raw,unit=0,readonly=on,file={code},snapshot=on",),
     "option 'snapshot' has no rule"),
    (("if=pflash,format=raw,unit=0,readonly=on",), "without a file"),
])
def test_destination_refuses_flash_it_cannot_vouch_for(dest, tmp_path, drives, message):
    outside = tmp_path / "outside.fd"
    outside.write_bytes(b"x" * 4096)
    rooted = dest["root"] / "own-code.fd"
    rooted.write_bytes(b"x" * 4096)
    filled = [d.format(outside=outside, rooted=rooted, code=dest["ovmf"]["plain_code"])
              for d in drives]
    with pytest.raises(UserError, match=message):
        dest_argv(dest, *filled)


class FakeQmp:
    """query-block as QEMU 7.2 answers it for a UEFI VM (read off a real one)."""

    def __init__(self, blocks: list[dict[str, Any]]) -> None:
        self.blocks = blocks

    async def execute(self, command: str, args: object = None) -> Any:
        return {"query-block": self.blocks, "query-block-jobs": []}[command]


def test_the_variable_store_is_no_disk_to_copy():
    def block(device: str, qdev: str, path: str, ro: bool) -> dict[str, Any]:
        return {"device": device, "qdev": qdev, "inserted": {
            "ro": ro, "drv": "raw", "file": path, "node-name": f"#{device}",
            "image": {"virtual-size": 540672}}}
    blocks = [block("pflash0", "/machine/system.flash0", "/usr/share/OVMF/C.fd", True),
              block("pflash1", "/machine/system.flash1", "/vms/w/uefi-vars.fd", False),
              block("", "/machine/peripheral-anon/device[0]/virtio-backend", "/vms/w/d.raw",
                    False)]
    disks = asyncio.run(copyable_disks(FakeQmp(blocks)))  # type: ignore[arg-type]
    assert [d.path for d in disks] == ["/vms/w/d.raw"]

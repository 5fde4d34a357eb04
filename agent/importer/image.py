"""A bare disk image (vhdx, vhd/vpc, vdi, vmdk, qcow2, raw) as a VmDefinition: format and
virtual size from `qemu-img info`; memory, CPUs and NICs as the caller gives them (a
bare image carries none)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.errors import LocalError, UserError
from agent.importer import vmdk as vmdk_reader
from agent.importer.common import Notes, choose_machine
from agent.importer.definition import DiskDef, NicDef, VmDefinition

FORMATS = ("vhdx", "vpc", "vdi", "vmdk", "qcow2", "raw")
QEMU_IMG_TIMEOUT = 30
VHD_FOOTER = 512
RAW_SUFFIXES = (".img", ".raw", ".bin", ".dd")


def image_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """`qemu-img info --output=json -U` of one image (-U: a VM may hold it open)."""
    forced = ["-f", fmt] if fmt else []
    try:
        done = subprocess.run(["qemu-img", "info", "--output=json", "-U", *forced, str(path)],
                              capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    except FileNotFoundError:
        raise LocalError("qemu-img is not installed (it reads the image's format)") from None
    except subprocess.TimeoutExpired:
        raise LocalError(f"qemu-img info {path} took over {QEMU_IMG_TIMEOUT}s") from None
    if done.returncode:
        raise UserError(f"{path}: qemu-img cannot read it: {done.stderr.strip()}")
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def has_vhd_footer(path: Path) -> bool:
    """A fixed VHD ends in a 512-byte footer starting with the cookie "conectix"."""
    try:
        with path.open("rb") as f:
            if f.seek(0, 2) < VHD_FOOTER:
                return False
            f.seek(-VHD_FOOTER, 2)
            return f.read(8) == b"conectix"
    except OSError:
        return False


def read_image(path: Path, memory: int, cpus: int = 1, nics: Sequence[NicDef] = (),
               firmware: str = "bios") -> VmDefinition:
    notes = Notes()
    info = image_info(path)
    fmt = str(info.get("format"))
    if fmt == "raw" and has_vhd_footer(path):
        notes.decide(f"{path.name}: a fixed VHD (QEMU's probe sees raw: its only header is "
                     f"the footer at the end); read as vpc, without the footer")
        info = image_info(path, "vpc")
        fmt = "vpc"
    if fmt not in FORMATS:
        notes.refuse(f"{path.name}: format {fmt} is not one ferry imports "
                     f"({', '.join(FORMATS)})", "convert it with qemu-img convert first")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        notes.refuse(f"{path.name}: has a backing file {info.get('backing-filename')!r}; a "
                     f"bare image must stand alone",
                     "flatten it first: qemu-img convert -O qcow2 IMAGE FLAT.qcow2")
    data_file = (info.get("format-specific") or {}).get("data", {}).get("data-file")
    if data_file:
        notes.refuse(f"{path.name}: its data is in an external file {data_file!r}",
                     "convert it into one file first (qemu-img convert)")
    if fmt == "vmdk":
        vmdk_reader.read_vmdk(path, path.parent, notes)
    else:
        notes.decide(f"{path.name}: {fmt}, {info.get('virtual-size')} bytes")
    if fmt == "raw" and path.suffix.lower() not in RAW_SUFFIXES:
        notes.warn(f"{path.name}: no format QEMU recognizes, taken as a raw disk",
                   "check that it is a disk image (a raw image is named .img or .raw)")
    if memory <= 0:
        notes.refuse("a bare image carries no memory size", "give --memory, e.g. --memory 2G")
    notes.decide(f"{path.name} on SATA (AHCI), which every guest OS drives",
                 "switch it to virtio once the guest has virtio drivers")
    if firmware == "uefi":
        notes.warn("UEFI: OVMF starts with a fresh variable store",
                   "if the guest does not boot, pick its boot loader in OVMF's boot manager")
    disks = (DiskDef(path=path.absolute(), format=fmt, bus="sata", boot_order=1,
                     virtual_size=int(info.get("virtual-size") or 0) or None),)
    return VmDefinition(name=path.stem, memory=memory, cpus=cpus, sockets=cpus, cores=1,
                        firmware=firmware, machine=choose_machine(disks, firmware, notes),
                        disks=disks, nics=tuple(nics), source="image",
                        notes=tuple(notes.items))

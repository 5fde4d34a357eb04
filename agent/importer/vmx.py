"""A VMware `.vmx` read into a VmDefinition: `key = "value"` lines with case-insensitive
keys, `#` comments and `|XX` hex escapes (VMware's configuration file format)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from agent.errors import UserError
from agent.importer import vmdk as vmdk_reader
from agent.importer.common import (
    MIB,
    Notes,
    choose_machine,
    inside,
    normalize_mac,
    normalize_uuid,
    parse_int,
    read_bounded,
)
from agent.importer.definition import DiskDef, NicDef, VmDefinition

_LINE = re.compile(r'^\s*([^=\s]+)\s*=\s*"?(.*?)"?\s*$')
_DISK_KEY = re.compile(r"^(ide|sata|scsi|nvme)(\d+):(\d+)\.present$")
_NIC_KEY = re.compile(r"^ethernet(\d+)\.present$")

# scsiN.virtualDev -> bus; the LSI SAS and BusLogic chips become QEMU's LSI (warned).
SCSI_BUSES = {"lsilogic": "scsi-lsi", "lsisas1068": "scsi-lsi", "buslogic": "scsi-lsi",
              "pvscsi": "scsi-pvscsi"}
NIC_MODELS = {"vmxnet3": "vmxnet3", "e1000": "e1000", "e1000e": "e1000e", "vlance": "e1000",
              "vmxnet": "vmxnet3", "vmxnet2": "vmxnet3"}
CDROM_TYPES = ("cdrom-image", "atapi-cdrom", "cdrom-raw")
# The order disks are listed in, and without bios.hddOrder the guess of which boots:
# VMware puts system disks on SCSI (servers) or NVMe (new desktops), IDE last (old VMs).
BUS_ORDER = {"scsi": 0, "nvme": 1, "sata": 2, "ide": 3}


def parse_vmx_text(text: str) -> dict[str, str]:
    """Keys lowercased -> values unescaped; later lines win, as in VMware."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise UserError(f".vmx line {raw.strip()!r}: not key = \"value\"")
        value = re.sub(r"\|([0-9a-fA-F]{2})", lambda h: chr(int(h.group(1), 16)), m.group(2))
        values[m.group(1).lower()] = value
    return values


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "yes", "1")


def read_vmx(path: Path) -> VmDefinition:
    """The VM a .vmx describes, its disks checked (vmdk subformat, extents)."""
    values = parse_vmx_text(read_bounded(path).decode("utf-8", "replace"))
    base = path.parent
    notes = Notes()
    get = values.get

    cpus = parse_int(get("numvcpus"), "numvcpus") or 1
    cores = parse_int(get("cpuid.corespersocket"), "cpuid.coresPerSocket") or 1
    if cores < 1 or cpus % cores:
        notes.warn(f"numvcpus {cpus} is not a multiple of cpuid.coresPerSocket {cores}",
                   f"ferry gives the VM {cpus} sockets of 1 core")
        cores = 1
    memsize = parse_int(get("memsize"), "memsize")
    if memsize is None:
        notes.refuse("the .vmx has no memsize", "add memsize = \"MiB\" or give --memory")
        memsize = 0

    firmware = "bios"
    if (get("firmware") or "bios").lower() == "efi":
        firmware = "uefi"
        notes.warn("UEFI: the VM's UEFI variables (boot entries, Secure Boot keys) are not "
                   "carried; OVMF starts with a fresh variable store",
                   "if the guest does not boot, pick its boot loader once in OVMF's boot "
                   "manager, or install it as \\EFI\\BOOT\\BOOTX64.EFI")
        if _true(get("uefi.secureboot.enabled")):
            notes.warn("Secure Boot was on: it is off under OVMF's fresh variable store",
                       "enroll keys again in the guest if it needs Secure Boot")

    if (base / f"{path.name}.lck").exists() or any(base.glob("*.vmem")):
        notes.warn("the VM looks running (a .vmx.lck or .vmem is present): its disks may "
                   "change while they are copied", "shut the VM down in VMware first")
    if any(base.glob("*.vmss")):
        notes.warn("the VM is suspended (a .vmss): its memory state is not imported, the "
                   "guest boots as after a power failure", "power it off cleanly first")

    disks = _disks(values, base, notes)
    nics = _nics(values, notes)
    return VmDefinition(
        name=get("displayname") or path.stem, memory=memsize * MIB, cpus=cpus,
        sockets=cpus // cores, cores=cores, firmware=firmware,
        machine=choose_machine(disks, firmware, notes), uuid=normalize_uuid(get("uuid.bios")),
        os_type=get("guestos"), disks=disks, nics=nics, source="vmx",
        notes=tuple(notes.items))


def _disks(values: dict[str, str], base: Path, notes: Notes) -> tuple[DiskDef, ...]:
    found = []
    for key in values:
        m = _DISK_KEY.match(key)
        if m and _true(values[key]):
            found.append((m.group(1), int(m.group(2)), int(m.group(3))))
    found.sort(key=lambda d: (BUS_ORDER[d[0]], d[1], d[2]))
    hdd_order = [s.strip().lower() for s in (values.get("bios.hddorder") or "").split(",") if s]
    disks: list[DiskDef] = []
    first = None
    for kind, ctrl, unit in found:
        slot = f"{kind}{ctrl}:{unit}"
        device_type = (values.get(f"{slot}.devicetype") or "").lower()
        file_name = values.get(f"{slot}.filename") or ""
        if device_type in CDROM_TYPES or file_name.lower().endswith(".iso"):
            notes.warn(f"{slot}: CD/DVD {file_name or '(host drive)'} left out",
                       "attach the ISO after import if the guest still needs it")
            continue
        if kind == "scsi" and not _true(values.get(f"scsi{ctrl}.present", "true")):
            notes.warn(f"{slot}: its controller scsi{ctrl} is not present; disk left out")
            continue
        bus = _bus(kind, ctrl, values, notes)
        if bus is None:
            continue
        image = inside(base, file_name)
        if image is None:
            notes.refuse(f"{slot}: disk {file_name!r} is outside the VM's directory {base}",
                         "move the disk into the VM's directory and name it relatively")
            continue
        if not image.exists():
            notes.refuse(f"{slot}: disk {file_name} is missing",
                         "copy every file of the VM's directory")
            continue
        vmdk = vmdk_reader.read_vmdk(image, base, notes)
        if vmdk is None:
            continue
        if slot in hdd_order[:1]:
            first = len(disks)
        disks.append(DiskDef(path=image.absolute(), format="vmdk", bus=bus, controller=ctrl,
                             unit=unit, virtual_size=vmdk.virtual_size))
    boot_order = [s.strip().lower() for s in (values.get("bios.bootorder") or "").split(",")]
    if disks and boot_order[0] in ("cdrom", "ethernet", "floppy"):
        notes.warn(f"bios.bootOrder boots {boot_order[0]} first: ferry boots the disk",
                   "attach an ISO or set a network boot after import if the guest needs it")
    if disks:
        name = disks[first or 0].path.name
        if first is not None or len(disks) == 1:
            notes.decide(f"boot from {name}" + (" (bios.hddOrder)" if first is not None else ""))
        else:
            notes.warn(f"no bios.hddOrder: boot from {name}, a guess (SCSI, then NVMe, SATA, "
                       f"IDE)", "if another disk holds the system, set bios.hddOrder in the "
                       ".vmx (e.g. \"sata0:0\") and inspect again")
        disks[first or 0] = replace(disks[first or 0], boot_order=1)
    return tuple(disks)


def _bus(kind: str, ctrl: int, values: dict[str, str], notes: Notes) -> str | None:
    if kind == "ide":
        return "ide"
    if kind == "sata":
        return "sata"
    if kind == "nvme":
        notes.decide(f"nvme{ctrl}: kept on NVMe (QEMU emulates an NVMe controller; the "
                     f"guest's driver keeps working)")
        return "nvme"
    dev = (values.get(f"scsi{ctrl}.virtualdev") or "lsilogic").lower()
    bus = SCSI_BUSES.get(dev)
    if bus is None:
        notes.refuse(f"scsi{ctrl}.virtualDev = {dev!r}: a SCSI controller ferry does not know",
                     "change the controller to lsilogic or pvscsi in VMware first")
    elif dev in ("lsisas1068", "buslogic"):
        notes.warn(f"scsi{ctrl} ({dev}) becomes QEMU's LSI 53C895A: the guest needs a driver "
                   f"for it", "install the LSI Logic parallel driver before moving, or move "
                   "the disk to SATA")
    return bus


def _nics(values: dict[str, str], notes: Notes) -> tuple[NicDef, ...]:
    indices = sorted(int(m.group(1)) for key in values
                     if (m := _NIC_KEY.match(key)) and _true(values[key]))
    nics = []
    for n in indices:
        p = f"ethernet{n}."
        dev = (values.get(p + "virtualdev") or "").lower()
        model = NIC_MODELS.get(dev or "e1000")
        if model is None:
            notes.refuse(f"ethernet{n}.virtualDev = {dev!r}: a NIC model ferry does not know",
                         "change it to vmxnet3 or e1000 in VMware first")
            continue
        if dev in ("vlance", "vmxnet", "vmxnet2") or not dev:
            notes.warn(f"ethernet{n} ({dev or 'no virtualDev'}) becomes {model}",
                       "the guest needs a driver for it")
        address_type = (values.get(p + "addresstype") or "generated").lower()
        raw_mac = values.get(p + ("address" if address_type == "static" else "generatedaddress"))
        try:
            mac = normalize_mac(raw_mac)
        except UserError as exc:
            notes.refuse(f"ethernet{n}: {exc}")
            continue
        if mac is None:
            notes.warn(f"ethernet{n} has no MAC in the .vmx", "ferry assigns a new one")
        network = values.get(p + "networkname") or values.get(p + "vnet") or \
            values.get(p + "connectiontype")
        nics.append(NicDef(model=model, mac=mac, source_network=network))
        notes.decide(f"ethernet{n}: {model}, MAC {mac or 'new'} kept, source network "
                     f"{network!r}")
    return tuple(nics)

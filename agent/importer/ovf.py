"""An OVF descriptor (OVF 1.x and 2.x, DMTF DSP0243) read into a VmDefinition, from a
directory or from an OVA package read in place: the tar's members checked (plain files,
safe names, the .ovf first) and its manifest verified by streamed hashing, the disks left
in the tar with their offsets for the copy."""

from __future__ import annotations

import hashlib
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from agent.errors import UserError
from agent.importer import vmdk as vmdk_reader
from agent.importer.common import (
    MAX_CONFIG_BYTES,
    Notes,
    attr,
    child,
    child_text,
    children,
    choose_machine,
    inside,
    local,
    normalize_mac,
    parse_int,
    parse_xml,
    read_bounded,
)
from agent.importer.definition import DiskDef, NicDef, VmDefinition

HASH_CHUNK = 1 << 20
MAX_MEMBERS = 1000              # an OVA holds a descriptor, a manifest and its disks
_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\(([^()]+)\)\s*=\s*([0-9a-fA-F]+)\s*$")
_UNIT = re.compile(r"^byte(?:\s*\*\s*(\d+)\s*\^\s*(\d+))?$", re.IGNORECASE)
_NAMED_UNITS = {"bytes": 1, "kilobytes": 1 << 10, "megabytes": 1 << 20, "gigabytes": 1 << 30,
                "terabytes": 1 << 40}

# CIM ResourceType numbers (DSP0243 / CIM_ResourceAllocationSettingData).
RT_OTHER, RT_CPU, RT_MEMORY, RT_IDE, RT_SCSI, RT_NIC = 1, 3, 4, 5, 6, 10
RT_FLOPPY, RT_CD, RT_DVD, RT_DISK, RT_STORAGE, RT_USB, RT_GRAPHICS, RT_SOUND = (
    14, 15, 16, 17, 20, 23, 24, 35)
LEFT_OUT = {RT_OTHER: "device", RT_FLOPPY: "floppy drive", RT_USB: "USB controller",
            RT_GRAPHICS: "graphics card", RT_SOUND: "sound card"}
SCSI_SUBTYPES = {"lsilogic": "scsi-lsi", "lsilogicsas": "scsi-lsi", "buslogic": "scsi-lsi",
                 "virtualscsi": "scsi-pvscsi"}
NIC_SUBTYPES = {"e1000": "e1000", "e1000e": "e1000e", "vmxnet3": "vmxnet3",
                "pcnet32": "e1000", "virtio": "virtio-net-pci", "rtl8139": "rtl8139"}
ENVELOPE_KNOWN = {"References", "DiskSection", "NetworkSection", "VirtualSystem", "Info",
                  "Strings", "DeploymentOptionSection"}
SYSTEM_KNOWN = {"Info", "Name", "OperatingSystemSection", "VirtualHardwareSection",
                "ProductSection", "AnnotationSection", "EulaSection", "StartupSection",
                "InstallSection", "ResourceAllocationSection"}
IMAGE_FORMATS = {".vmdk": "vmdk", ".vhd": "vpc", ".vhdx": "vhdx", ".qcow2": "qcow2",
                 ".img": "raw", ".raw": "raw", ".vdi": "vdi"}


@dataclass(frozen=True, slots=True)
class PackageFile:
    """One file of the package: where its bytes are and how to read them."""

    name: str
    size: int
    open: Callable[[], AbstractContextManager[BinaryIO]]
    path: Path                    # the file, or the .ova holding it
    member_offset: int | None = None


def capacity_units(text: str | None, default: int, what: str) -> int:
    """Bytes per unit of an OVF allocation unit such as "byte * 2^20" or "MegaBytes"."""
    if not text:
        return default
    text = text.strip()
    m = _UNIT.match(text)
    if m:
        return int(m.group(1)) ** int(m.group(2)) if m.group(1) else 1
    if text.lower() in _NAMED_UNITS:
        return _NAMED_UNITS[text.lower()]
    raise UserError(f"{what}: allocation unit {text!r} is not one ferry reads "
                    f"(e.g. \"byte * 2^20\")")


# ------------------------------------------------------------------------ packages

def read_ovf(path: Path) -> VmDefinition:
    """An .ovf with its files beside it (and its .mf, if there is one)."""
    base = path.parent
    notes = Notes()
    root = parse_xml(read_bounded(path), path.name)
    files: dict[str, PackageFile] = {}
    for name in _referenced(root):
        file = inside(base, name)
        if file is None:
            raise UserError(f"{path.name}: file {name!r} is outside the package {base}")
        if file.is_file():
            files[name] = _plain(file, name)
    manifest = path.with_suffix(".mf")
    if manifest.is_file():
        listed = read_bounded(manifest)
        present = {name: _plain(f, name) for name in _manifest_names(listed)
                   if (f := inside(base, name)) is not None and f.is_file()}
        _verify(listed, {path.name: _plain(path, path.name), **files, **present},
                manifest.name, notes)
    else:
        notes.warn(f"no manifest {manifest.name}: the package's files are not verified")
    return _definition(root, files, base, "ovf", notes, in_place=False)


def read_ova(path: Path) -> VmDefinition:
    """An OVA: the tar's members checked, the manifest verified, disks read in place."""
    notes = Notes()
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"{path.name}: not an OVA (an uncompressed tar): {exc}") from None
    with tar:
        members = _members(tar, path)
    first = members[0] if members else None
    if first is None or not first.name.lower().endswith(".ovf"):
        raise UserError(f"{path.name}: the first member must be the .ovf descriptor "
                        f"(DSP0243), found {first.name if first else 'none'!r}")
    if first.size > MAX_CONFIG_BYTES:
        raise UserError(f"{path.name}: {first.name} is larger than "
                        f"{MAX_CONFIG_BYTES >> 20} MiB")
    files = {m.name: m for m in members}
    with first.open() as f:
        root = parse_xml(f.read(), first.name)
    manifests = [m for m in members if m.name.lower().endswith(".mf")]
    if manifests:
        if manifests[0].size > MAX_CONFIG_BYTES:
            raise UserError(f"{path.name}: manifest {manifests[0].name} is implausibly large")
        with manifests[0].open() as f:
            _verify(f.read(), files, manifests[0].name, notes)
    else:
        notes.warn(f"{path.name} has no manifest: its files are not verified")
    return _definition(root, files, path.parent, "ova", notes, in_place=True)


def _members(tar: tarfile.TarFile, path: Path) -> list[PackageFile]:
    out: list[PackageFile] = []
    for m in tar:
        if len(out) >= MAX_MEMBERS:
            raise UserError(f"{path.name}: more than {MAX_MEMBERS} members; not an OVA")
        parts = PurePosixPath(m.name).parts           # "./disk.vmdk" is "disk.vmdk"
        if m.name.startswith("/") or ".." in parts or "\\" in m.name or len(parts) != 1:
            raise UserError(f"{path.name}: member {m.name!r} has an unsafe name (an OVA "
                            f"holds plain files at its top level)")
        name = parts[0]
        # a GNU sparse member's bytes are not contiguous in the tar: no reading in place
        if not m.isreg() or m.issparse():
            raise UserError(f"{path.name}: member {name!r} is not a plain file "
                            f"(a link, device or sparse member in an OVA is refused)")
        if any(o.name == name for o in out):
            raise UserError(f"{path.name}: member {name!r} appears twice (which one counts "
                            f"would depend on the reader)")
        out.append(PackageFile(name, m.size, _member_opener(path, m.offset_data, m.size),
                               path, m.offset_data))
    return out


def _member_opener(path: Path, offset: int,
                   size: int) -> Callable[[], AbstractContextManager[BinaryIO]]:
    def opener() -> AbstractContextManager[BinaryIO]:
        return _Window(path, offset, size)
    return opener


class _Window:
    """A read-only view of `size` bytes at `offset` of a file (a tar member in place)."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._file = path.open("rb")
        self._offset, self._size, self._pos = offset, size, 0

    def __enter__(self) -> BinaryIO:
        return self  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._pos
        n = left if n < 0 else min(n, left)
        self._file.seek(self._offset + self._pos)
        data = self._file.read(n)
        self._pos += len(data)
        return data

    def seek(self, pos: int) -> int:
        self._pos = max(0, min(pos, self._size))
        return self._pos


def _plain(file: Path, name: str) -> PackageFile:
    return PackageFile(name, file.stat().st_size, lambda: file.open("rb"), file.absolute())


def _referenced(root: ET.Element) -> list[str]:
    refs = child(root, "References")
    return [attr(f, "href") or "" for f in children(refs, "File")] if refs is not None else []


def _manifest_names(data: bytes) -> list[str]:
    return [m.group(2).strip() for line in data.decode("utf-8", "replace").splitlines()
            if (m := _MANIFEST_LINE.match(line.strip()))]


def _verify(data: bytes, files: dict[str, PackageFile], manifest: str, notes: Notes) -> None:
    """Every file the manifest names present and of the digest it gives."""
    refusals_before = len(notes.refusals())
    named = set()
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        m = _MANIFEST_LINE.match(line.strip())
        if not m:
            notes.refuse(f"{manifest}: line {line.strip()!r} is not ALGO(file)= digest")
            continue
        algo, name, want = m.group(1).lower(), m.group(2).strip(), m.group(3).lower()
        named.add(name)
        file = files.get(name)
        if file is None:
            notes.refuse(f"{manifest} names {name}, which the package lacks",
                         "get the complete package from its source again")
            continue
        digest = hashlib.new(algo)
        with file.open() as f:
            for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
                digest.update(chunk)
        if digest.hexdigest() != want:
            notes.refuse(f"{name}: its {algo.upper()} does not match {manifest} (the file "
                         f"is damaged or was changed)", "get the package from its source again")
    unverified = sorted(n for n in files if n not in named and n != manifest
                        and not n.lower().endswith(".cert"))
    if unverified:
        notes.warn(f"{manifest} does not cover {', '.join(unverified)}: not verified")
    if any(n.lower().endswith(".cert") for n in files):
        notes.warn("the package is signed (.cert): ferry checks the manifest's digests, "
                   "not the signature", "check the signature with ovftool if it matters")
    if named and len(notes.refusals()) == refusals_before:
        notes.decide(f"{manifest}: {len(named)} file(s) verified")


# ------------------------------------------------------------------------ the descriptor

def _required(el: ET.Element) -> bool:
    return (attr(el, "required") or "true").lower() != "false"


def _definition(root: ET.Element, files: dict[str, PackageFile], base: Path, source: str,
                notes: Notes, in_place: bool) -> VmDefinition:
    if local(root.tag) != "Envelope":
        raise UserError(f"not an OVF descriptor: root element {local(root.tag)!r}")
    for section in root:
        name = local(section.tag)
        if name == "VirtualSystemCollection":
            raise UserError("the OVF holds a VirtualSystemCollection (several VMs): ferry "
                            "imports one VM at a time; export each VM on its own")
        if name not in ENVELOPE_KNOWN and _required(section):
            notes.refuse(f"OVF section {name} is required by the package and ferry does "
                         f"not know it")
    systems = children(root, "VirtualSystem")
    if len(systems) != 1:
        raise UserError(f"the OVF holds {len(systems)} VirtualSystem elements; ferry "
                        f"imports exactly one")
    system = systems[0]
    for section in system:
        name = local(section.tag)
        if name not in SYSTEM_KNOWN and _required(section):
            notes.refuse(f"OVF section {name} is required by the package and ferry does "
                         f"not know it")
    hrefs = {attr(f, "id"): f for f in children(child(root, "References") or ET.Element("x"),
                                               "File")}
    disk_section = child(root, "DiskSection")
    ovf_disks = {attr(d, "diskId"): d for d in children(disk_section, "Disk")} \
        if disk_section is not None else {}
    hardware = child(system, "VirtualHardwareSection")
    if hardware is None:
        raise UserError("the OVF's VirtualSystem has no VirtualHardwareSection")

    system_type = child_text(child(hardware, "System") or ET.Element("System"),
                             "VirtualSystemType")
    if system_type:
        notes.decide(f"virtual hardware {system_type} becomes a QEMU machine")
    cpus, cores, memory, firmware = 1, 1, 0, "bios"
    controllers: dict[str, tuple[str, int]] = {}
    per_bus: dict[str, int] = {}
    disk_items: list[ET.Element] = []
    nics: list[NicDef] = []
    for item in hardware:
        tag = local(item.tag)
        if tag == "Config" and (attr(item, "key") or "") == "firmware":
            if (attr(item, "value") or "").lower() == "efi":
                firmware = "uefi"
            continue
        if tag not in ("Item", "StorageItem", "EthernetPortItem"):
            continue
        rtype = parse_int(child_text(item, "ResourceType"), "ResourceType") or 0
        iid = child_text(item, "InstanceID") or ""
        label = child_text(item, "ElementName") or f"item {iid}"
        subtype = (child_text(item, "ResourceSubType") or "").lower()
        if rtype == RT_CPU:
            cpus = parse_int(child_text(item, "VirtualQuantity"), "CPU VirtualQuantity") or 1
            cores = parse_int(child_text(item, "CoresPerSocket"), "CoresPerSocket") or 1
        elif rtype == RT_MEMORY:
            unit = capacity_units(child_text(item, "AllocationUnits"), 1 << 20, "memory")
            memory = (parse_int(child_text(item, "VirtualQuantity"), "memory") or 0) * unit
        elif rtype in (RT_IDE, RT_SCSI, RT_STORAGE):
            bus = _controller_bus(rtype, subtype, label, notes)
            if bus is not None:
                number = parse_int(child_text(item, "Address"), f"{label} Address")
                controllers[iid] = (bus, number if number is not None else per_bus.get(bus, 0))
                per_bus[bus] = per_bus.get(bus, 0) + 1
        elif rtype == RT_DISK:
            disk_items.append(item)
        elif rtype in (RT_CD, RT_DVD):
            what = child_text(item, "HostResource") or "empty"
            notes.warn(f"{label}: CD/DVD ({what}) left out",
                       "attach the ISO after import if the guest still needs it")
        elif rtype == RT_NIC:
            nic = _nic(item, label, subtype, notes)
            if nic is not None:
                nics.append(nic)
        elif rtype in LEFT_OUT or not _required(item):
            notes.decide(f"{label}: {LEFT_OUT.get(rtype, f'resource type {rtype}')} left out "
                         f"(QEMU gives the VM its own)")
        else:
            notes.refuse(f"{label}: resource type {rtype} is required by the package and "
                         f"ferry does not know it")

    if firmware == "uefi":
        notes.warn("UEFI: the VM's UEFI variables are not carried; OVMF starts with a fresh "
                   "variable store", "if the guest does not boot, pick its boot loader in "
                   "OVMF's boot manager once")
    if cores < 1 or cpus % cores:
        notes.warn(f"{cpus} vCPUs is not a multiple of {cores} cores per socket",
                   f"ferry gives the VM {cpus} sockets of 1 core")
        cores = 1
    disks = []
    for item in disk_items:            # in the OVF's order: the first one boots
        disk = _disk(item, controllers, ovf_disks, hrefs, files, base, notes, in_place)
        if disk is not None:
            disks.append(disk)
    if disks:
        disks[0] = replace(disks[0], boot_order=1)
        notes.decide(f"boot from {disks[0].member or disks[0].path.name} (the first disk)")
    if memory == 0:
        notes.refuse("the OVF gives no memory size (ResourceType 4)", "give --memory")
    os_section = child(system, "OperatingSystemSection")
    os_type = None
    if os_section is not None:
        os_type = attr(os_section, "osType") or child_text(os_section, "Description") or \
            f"cim:{attr(os_section, 'id')}"
    disks_t = tuple(disks)
    return VmDefinition(
        name=child_text(system, "Name") or attr(system, "id") or "imported",
        memory=memory, cpus=cpus, sockets=cpus // cores, cores=cores, firmware=firmware,
        machine=choose_machine(disks_t, firmware, notes), os_type=os_type, disks=disks_t,
        nics=tuple(nics), source=source, notes=tuple(notes.items))


def _controller_bus(rtype: int, subtype: str, label: str, notes: Notes) -> str | None:
    if rtype == RT_IDE:
        return "ide"
    if rtype == RT_STORAGE:
        if "nvme" in subtype:
            notes.decide(f"{label}: kept on NVMe (QEMU emulates an NVMe controller)")
            return "nvme"
        return "sata"
    bus = SCSI_SUBTYPES.get(subtype or "lsilogic")
    if bus is None:
        notes.refuse(f"{label}: SCSI controller {subtype!r} is not one ferry knows",
                     "change it to lsilogic or VirtualSCSI before exporting")
    elif subtype in ("lsilogicsas", "buslogic"):
        notes.warn(f"{label} ({subtype}) becomes QEMU's LSI 53C895A: the guest needs a "
                   f"driver for it")
    return bus


def _nic(item: ET.Element, label: str, subtype: str, notes: Notes) -> NicDef | None:
    model = NIC_SUBTYPES.get(subtype or "e1000")
    if model is None:
        notes.refuse(f"{label}: NIC model {subtype!r} is not one ferry knows",
                     "change it to E1000 or VmxNet3 before exporting")
        return None
    if subtype == "pcnet32":
        notes.warn(f"{label} (PCNet32) becomes e1000", "the guest needs an e1000 driver")
    try:
        mac = normalize_mac(child_text(item, "Address"))
    except UserError as exc:
        notes.refuse(f"{label}: {exc}")
        return None
    network = child_text(item, "Connection")
    notes.decide(f"{label}: {model}, MAC {mac or 'new (the OVF has none)'}, source network "
                 f"{network!r}")
    return NicDef(model=model, mac=mac, source_network=network)


def _disk(item: ET.Element, controllers: dict[str, tuple[str, int]],
          ovf_disks: dict[str | None, ET.Element], hrefs: dict[str | None, ET.Element],
          files: dict[str, PackageFile], base: Path, notes: Notes,
          in_place: bool) -> DiskDef | None:
    label = child_text(item, "ElementName") or "disk"
    host = child_text(item, "HostResource") or ""
    disk_id = host.rpartition("/")[2]
    disk = ovf_disks.get(disk_id)
    if disk is None:
        notes.refuse(f"{label}: HostResource {host!r} names no Disk of the DiskSection")
        return None
    parent = child_text(item, "Parent") or ""
    if parent not in controllers:
        notes.refuse(f"{label}: its controller (InstanceID {parent!r}) is not in the OVF")
        return None
    bus, number = controllers[parent]
    unit = parse_int(child_text(item, "AddressOnParent"), f"{label} AddressOnParent") or 0
    capacity = (parse_int(attr(disk, "capacity"), f"{label} capacity") or 0) * capacity_units(
        attr(disk, "capacityAllocationUnits"), 1, f"{label} capacity")
    ref = hrefs.get(attr(disk, "fileRef"))
    if ref is None:
        notes.warn(f"{label}: a blank disk of {capacity} bytes (no file) is left out",
                   "create and attach it after import")
        return None
    href = attr(ref, "href") or ""
    if attr(ref, "compression") or attr(ref, "chunkSize"):
        notes.refuse(f"{href}: compressed or chunked files are not imported",
                     "unpack the package with ovftool first")
        return None
    file = files.get(href)
    if file is None:
        notes.refuse(f"{label}: its file {href} is missing from the package")
        return None
    declared = parse_int(attr(ref, "size"), f"{href} size")
    if declared is not None and declared != file.size:
        notes.refuse(f"{href}: the OVF says {declared} bytes, the file has {file.size}",
                     "the package is incomplete: get it again")
        return None
    fmt = "vmdk" if "vmdk" in (attr(disk, "format") or "").lower() else \
        IMAGE_FORMATS.get(PurePosixPath(href).suffix.lower())
    if fmt is None:
        notes.refuse(f"{href}: disk format {attr(disk, 'format')!r} is not one ferry knows")
        return None
    if fmt == "raw" and capacity > file.size:
        notes.refuse(f"{href}: a raw disk of {capacity} bytes in a file of {file.size}",
                     "the file is truncated: get the package again")
        return None
    if fmt == "vmdk" and not _vmdk_ok(file, base, notes, in_place):
        return None
    return DiskDef(path=file.path, format=fmt, bus=bus, controller=number, unit=unit,
                   virtual_size=capacity or None,
                   member=file.name if in_place else None,
                   member_offset=file.member_offset, member_size=file.size if in_place else None)


def _vmdk_ok(file: PackageFile, base: Path, notes: Notes, in_place: bool) -> bool:
    if not in_place:
        return vmdk_reader.read_vmdk(file.path, base, notes) is not None
    try:
        with file.open() as f:
            text, embedded = vmdk_reader.descriptor_of(f, file.name)
    except UserError as exc:
        notes.refuse(str(exc))
        return False
    vmdk = vmdk_reader.parse_descriptor(text, base, file.name, notes,
                                        itself=file.path if embedded else None)
    if vmdk is None:
        return False
    if vmdk.create_type not in ("streamOptimized", "monolithicSparse"):
        notes.refuse(f"{file.name}: vmdk {vmdk.create_type} in an OVA needs files beside it",
                     "export the OVA with streamOptimized disks (ovftool's default)")
        return False
    notes.decide(f"{file.name}: vmdk {vmdk.create_type}, read in place from the OVA")
    return True


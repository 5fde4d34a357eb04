"""A VirtualBox `.vbox` (its VirtualBox-settings.xsd schema) read into a VmDefinition:
the machine, its adapters, its storage controllers and their attached images resolved
through the machine's media registry."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

from agent.errors import UserError
from agent.importer import vmdk as vmdk_reader
from agent.importer.common import (
    MIB,
    Notes,
    attr,
    child,
    children,
    choose_machine,
    inside,
    local,
    normalize_mac,
    normalize_uuid,
    parse_int,
    parse_xml,
    read_bounded,
)
from agent.importer.definition import DiskDef, NicDef, VmDefinition

CONTROLLER_BUSES = {"piix3": "ide", "piix4": "ide", "ich6": "ide", "ahci": "sata",
                    "intelahci": "sata", "lsilogic": "scsi-lsi", "lsilogicsas": "scsi-lsi",
                    "buslogic": "scsi-lsi", "nvme": "nvme", "virtioscsi": "virtio"}
ADAPTER_MODELS = {"am79c970a": "e1000", "am79c973": "e1000", "am79c960": "e1000",
                  "82540em": "e1000", "82543gc": "e1000", "82545em": "e1000",
                  "virtio": "virtio-net-pci"}
ATTACHMENTS = {"NAT": "nat", "BridgedInterface": "bridged", "InternalNetwork": "intnet",
               "HostOnlyInterface": "hostonly", "NATNetwork": "natnetwork",
               "GenericInterface": "generic"}
IMAGE_FORMATS = {"vdi": "vdi", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx",
                 "parallels": "parallels", "qcow2": "qcow2", "raw": "raw"}


def read_vbox(path: Path) -> VmDefinition:
    root = parse_xml(read_bounded(path), path.name)
    if local(root.tag) != "VirtualBox" or (machine := child(root, "Machine")) is None:
        raise UserError(f"{path.name}: not a VirtualBox machine file (no VirtualBox/Machine)")
    base = path.parent
    notes = Notes()
    hardware = child(machine, "Hardware")
    if hardware is None:
        raise UserError(f"{path.name}: the machine has no Hardware element")
    cpu = child(hardware, "CPU")
    cpus = parse_int(attr(cpu, "count") if cpu is not None else None, "CPU count") or 1
    mem = child(hardware, "Memory")
    ram = parse_int(attr(mem, "RAMSize") if mem is not None else None, "Memory RAMSize")
    if ram is None:
        notes.refuse("the .vbox gives no Memory RAMSize", "give --memory")
    firmware = "bios"
    fw = child(hardware, "Firmware")
    if fw is not None and (attr(fw, "type") or "").upper().startswith("EFI"):
        firmware = "uefi"
        notes.warn("UEFI: the VM's NVRAM (boot entries) is not carried; OVMF starts with a "
                   "fresh variable store", "if the guest does not boot, pick its boot loader "
                   "in OVMF's boot manager once")
    if any(base.glob("*.sav")) or any((base / "Snapshots").glob("*.sav")):
        notes.warn("the VM has a saved state (.sav): it is not imported, the guest boots as "
                   "after a power failure", "discard the saved state or shut the VM down")

    images = _media(machine)
    controllers = child(machine, "StorageControllers") or child(hardware, "StorageControllers")
    disks = _disks(controllers, images, base, notes) if controllers is not None else ()
    order = [attr(o, "device") for o in sorted(
        children(child(hardware, "Boot") or ET.Element("Boot"), "Order"),
        key=lambda o: parse_int(attr(o, "position"), "Boot Order position") or 0)]
    if disks:
        boot_first = "HardDisk" in order and order.index("HardDisk") == min(
            (order.index(d) for d in ("HardDisk", "DVD", "Network") if d in order),
            default=0)
        notes.decide(f"boot from {disks[0].path.name} (the first disk"
                     f"{'' if boot_first else '; the .vbox boots another device first'})")
        disks = (replace(disks[0], boot_order=1), *disks[1:])
    nics = _nics(child(hardware, "Network"), notes)
    return VmDefinition(
        name=attr(machine, "name") or path.stem, memory=(ram or 0) * MIB, cpus=cpus,
        sockets=1, cores=cpus, firmware=firmware,
        machine=choose_machine(disks, firmware, notes),
        uuid=normalize_uuid(attr(machine, "uuid")), os_type=attr(machine, "OSType"),
        disks=disks, nics=nics, source="vbox", notes=tuple(notes.items))


def _media(machine: ET.Element) -> dict[str, tuple[ET.Element, bool]]:
    """Image uuid -> (its element, whether it is a differencing child of another)."""
    out: dict[str, tuple[ET.Element, bool]] = {}
    registry = child(machine, "MediaRegistry")
    if registry is None:
        return out

    def walk(el: ET.Element, nested: bool) -> None:
        for medium in el:
            if local(medium.tag) in ("HardDisk", "Image"):
                out[normalize_uuid(attr(medium, "uuid")) or ""] = (medium, nested)
                walk(medium, True)

    for group in registry:
        walk(group, False)
    return out


def _disks(controllers: ET.Element, images: dict[str, tuple[ET.Element, bool]], base: Path,
           notes: Notes) -> tuple[DiskDef, ...]:
    disks = []
    per_bus: dict[str, int] = {}
    for ctrl in children(controllers, "StorageController"):
        name = attr(ctrl, "name") or "?"
        kind = (attr(ctrl, "type") or "").lower()
        bus = CONTROLLER_BUSES.get(kind)
        attached = children(ctrl, "AttachedDevice")
        if bus is None:
            if attached:
                notes.refuse(f"controller {name!r}: type {attr(ctrl, 'type')!r} is not one "
                             f"ferry knows", "move its disks to a SATA controller first")
            continue
        number = per_bus.get(bus, 0)
        per_bus[bus] = number + 1
        if bus == "nvme":
            notes.decide(f"controller {name!r}: kept on NVMe (QEMU emulates an NVMe "
                         f"controller)")
        elif bus == "virtio":
            notes.warn(f"controller {name!r} (virtio-scsi) becomes virtio-blk disks",
                       "a Windows guest needs the viostor driver besides vioscsi")
        elif kind in ("lsilogicsas", "buslogic"):
            notes.warn(f"controller {name!r} ({attr(ctrl, 'type')}) becomes QEMU's LSI "
                       f"53C895A: the guest needs a driver for it")
        for dev in attached:
            port = parse_int(attr(dev, "port"), "AttachedDevice port") or 0
            device = parse_int(attr(dev, "device"), "AttachedDevice device") or 0
            where = f"{name} port {port} device {device}"
            image = child(dev, "Image")
            uuid = normalize_uuid(attr(image, "uuid")) if image is not None else None
            if attr(dev, "type") != "HardDisk":
                notes.warn(f"{where}: {attr(dev, 'type')} "
                           f"{_location(images, uuid) or '(empty)'} left out",
                           "attach the ISO after import if the guest still needs it")
                continue
            disk = _disk(where, uuid, images, base, notes)
            if disk is not None:
                # IDE: two units per channel; elsewhere the port is the unit.
                unit = port * 2 + device if bus == "ide" else port
                disks.append(replace(disk, bus=bus, controller=number, unit=unit))
    return tuple(disks)


def _location(images: dict[str, tuple[ET.Element, bool]], uuid: str | None) -> str | None:
    found = images.get(uuid or "")
    return attr(found[0], "location") if found else None


def _disk(where: str, uuid: str | None, images: dict[str, tuple[ET.Element, bool]],
          base: Path, notes: Notes) -> DiskDef | None:
    found = images.get(uuid or "")
    if found is None:
        notes.refuse(f"{where}: image {uuid} is not in the machine's media registry",
                     "register the disk with this machine (VirtualBox's Media Manager)")
        return None
    medium, differencing = found
    location = attr(medium, "location") or ""
    if differencing:
        notes.refuse(f"{where}: {location} is a snapshot's differencing image",
                     "delete the VM's snapshots in VirtualBox first (they merge into the base)")
        return None
    file = inside(base, location)
    if file is None:
        notes.refuse(f"{where}: disk {location!r} is outside the VM's directory {base}",
                     "move the disk into the VM's folder (VirtualBox's Media Manager) or "
                     "import it as a bare image")
        return None
    if not file.is_file():
        notes.refuse(f"{where}: disk {location} is missing")
        return None
    fmt = IMAGE_FORMATS.get((attr(medium, "format") or "").lower())
    if fmt is None:
        notes.refuse(f"{where}: disk format {attr(medium, 'format')!r} is not one ferry knows")
        return None
    if fmt == "vmdk" and vmdk_reader.read_vmdk(file, base, notes) is None:
        return None
    return DiskDef(path=file.absolute(), format=fmt)


def _nics(network: ET.Element | None, notes: Notes) -> tuple[NicDef, ...]:
    nics = []
    adapters = children(network, "Adapter") if network is not None else []
    for adapter in sorted(adapters, key=lambda a: parse_int(attr(a, "slot"), "slot") or 0):
        slot = attr(adapter, "slot")
        if (attr(adapter, "enabled") or "false").lower() != "true":
            continue
        kind = attr(adapter, "type") or "Am79C973"
        model = ADAPTER_MODELS.get(kind.lower())
        if model is None:
            notes.refuse(f"adapter {slot}: type {kind!r} is not one ferry knows",
                         "change it to an Intel PRO/1000 or virtio-net in VirtualBox first")
            continue
        if kind.lower().startswith("am79"):
            notes.warn(f"adapter {slot} (PCnet {kind}) becomes e1000",
                       "the guest needs an e1000 driver")
        try:
            mac = normalize_mac(attr(adapter, "MACAddress"))
        except UserError as exc:
            notes.refuse(f"adapter {slot}: {exc}")
            continue
        source = None
        for el in adapter:
            if local(el.tag) in ATTACHMENTS:
                kind_name = ATTACHMENTS[local(el.tag)]
                source = f"{kind_name}:{attr(el, 'name')}" if attr(el, "name") else kind_name
        notes.decide(f"adapter {slot}: {model}, MAC {mac or 'new'} kept, source network "
                     f"{source!r}")
        nics.append(NicDef(model=model, mac=mac, source_network=source))
    return tuple(nics)

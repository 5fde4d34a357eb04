"""`ferry export`: a stopped ferry VM's disks written for another hypervisor (vmdk, vhdx,
vpc), or an OVA: an OVF 1.0 descriptor of its configuration (CPUs, memory, firmware,
disks on their controllers, NICs with their MACs, in the DMTF/VMware vocabulary that
`agent.importer.ovf` reads back), its disks as streamOptimized vmdk, and a SHA256
manifest, in one tar with the descriptor first."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import subprocess
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from agent.errors import LocalError, UserError
from agent.importer.definition import RECORD_FILE, DiskDef, NicDef, VmDefinition
from agent.qemu.vmspec import keyval_get, parse_keyval, parse_size
from agent.state import vms

FORMATS = {"vmdk": ("vmdk", "monolithicSparse", "vmdk"), "vhdx": ("vhdx", None, "vhdx"),
           "vpc": ("vpc", "dynamic", "vhd"), "ova": ("vmdk", "streamOptimized", "vmdk")}
OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
# Controllers as OVF names them (ResourceType, ResourceSubType), by the definition's bus.
CONTROLLERS = {"ide": (5, None), "sata": (20, "vmware.sata.ahci"),
               "scsi-lsi": (6, "lsilogic"), "scsi-pvscsi": (6, "VirtualSCSI"),
               "nvme": (20, "vmware.nvme.controller"), "virtio": (6, "VirtualSCSI")}
NIC_SUBTYPES = {"vmxnet3": "VmxNet3", "e1000": "E1000", "e1000e": "E1000e",
                "virtio-net-pci": "VmxNet3", "rtl8139": "E1000"}
QEMU_IMG_TIMEOUT_S = 3600

for prefix, uri in (("ovf", OVF_NS), ("rasd", RASD_NS), ("vssd", VSSD_NS), ("vmw", VMW_NS)):
    ET.register_namespace(prefix, uri)


def definition_of(record: vms.VmRecord) -> VmDefinition:
    """The VM's configuration: its import record if it came by `ferry import`, else what
    its recorded QEMU command line says (-m, -smp, -drive, and the NICs ferry attached)."""
    imported = Path(record.vm_dir) / RECORD_FILE
    if imported.exists():
        return VmDefinition.from_json(json.loads(imported.read_text()))
    if not record.argv:
        raise UserError(f"VM {record.name}: ferry did not record how it was started (a VM "
                        f"started by other tools or an older ferry); nothing to export")
    memory, cpus = 0, 1
    disks: list[DiskDef] = []
    for option, value in itertools.pairwise(record.argv):
        if option == "-m":
            memory = parse_size(value.split(",")[0], default_suffix="m")
        elif option == "-smp":
            cpus = int(keyval_get(parse_keyval(value, "cpus"), "cpus") or 1)
        elif option == "-drive":
            pairs = parse_keyval(value)
            file, media = keyval_get(pairs, "file"), keyval_get(pairs, "media")
            if file and media != "cdrom":
                bus = {"virtio": "virtio", "ide": "ide"}.get(keyval_get(pairs, "if") or "ide",
                                                             "sata")
                disks.append(DiskDef(path=Path(file), format=keyval_get(pairs, "format"),
                                     bus=bus, unit=len(disks), boot_order=None))
    nics = tuple(NicDef(model="virtio-net-pci", mac=n.get("mac"),
                        source_network=n.get("network")) for n in record.nics)
    return VmDefinition(name=record.name, memory=memory, cpus=cpus, sockets=cpus, cores=1,
                        disks=tuple(disks), nics=nics, source="ferry")


def export_vm(definition: VmDefinition, fmt: str, out_dir: Path) -> list[Path]:
    """Write the VM's disks (or one OVA) into out_dir; the files written."""
    if fmt not in FORMATS:
        raise UserError(f"cannot export as {fmt!r}: use {', '.join(FORMATS)}")
    if not out_dir.is_dir():
        raise UserError(f"export directory {out_dir} does not exist")
    disks = [d for d in definition.disks if d.media == "disk"]
    if not disks:
        raise UserError(f"VM {definition.name} has no disk to export")
    target_fmt, subformat, ext = FORMATS[fmt]
    if fmt != "ova":
        outputs = [out_dir / f"{definition.name}-disk{n}.{ext}" for n in range(len(disks))]
        _refuse_existing(outputs)
        for disk, out in zip(disks, outputs, strict=True):
            _convert(disk, out, target_fmt, subformat)
        return outputs
    ova = out_dir / f"{definition.name}.ova"
    _refuse_existing([ova])
    work = Path(tempfile.mkdtemp(prefix=".ferry-export-", dir=out_dir))
    try:
        names = [f"{definition.name}-disk{n}.vmdk" for n in range(len(disks))]
        for disk, name in zip(disks, names, strict=True):
            _convert(disk, work / name, target_fmt, subformat)
        sizes = {name: (work / name).stat().st_size for name in names}
        ovf_name = f"{definition.name}.ovf"
        (work / ovf_name).write_bytes(ovf_descriptor(definition, disks, names, sizes))
        members = [ovf_name, *names]
        manifest = "".join(f"SHA256({m})= {_sha256(work / m)}\n" for m in members)
        (work / f"{definition.name}.mf").write_text(manifest)
        partial = ova.with_suffix(".ova.part")
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            for member in [*members, f"{definition.name}.mf"]:
                tar.add(work / member, arcname=member, recursive=False)
        partial.replace(ova)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [ova]


def ovf_descriptor(definition: VmDefinition, disks: list[DiskDef], names: list[str],
                   sizes: dict[str, int]) -> bytes:
    """The OVF 1.0 envelope of the VM with these disk files."""
    def o(tag: str) -> str:
        return f"{{{OVF_NS}}}{tag}"

    envelope = ET.Element(o("Envelope"))
    refs = ET.SubElement(envelope, o("References"))
    section = ET.SubElement(envelope, o("DiskSection"))
    ET.SubElement(section, o("Info")).text = "Virtual disk information"
    for n, (disk, name) in enumerate(zip(disks, names, strict=True)):
        ET.SubElement(refs, o("File"), {o("href"): name, o("id"): f"file{n}",
                                         o("size"): str(sizes[name])})
        ET.SubElement(section, o("Disk"), {
            o("capacity"): str(disk.virtual_size or _virtual_size(disk.path)),
            o("capacityAllocationUnits"): "byte", o("diskId"): f"vmdisk{n}",
            o("fileRef"): f"file{n}", o("format"): STREAM_OPTIMIZED})
    networks = sorted({n.network or n.source_network or "VM Network" for n in definition.nics})
    if networks:
        net_section = ET.SubElement(envelope, o("NetworkSection"))
        ET.SubElement(net_section, o("Info")).text = "The list of logical networks"
        for name in networks:
            ET.SubElement(net_section, o("Network"), {o("name"): name})
    system = ET.SubElement(envelope, o("VirtualSystem"), {o("id"): definition.name})
    ET.SubElement(system, o("Info")).text = "A virtual machine exported by ferry"
    ET.SubElement(system, o("Name")).text = definition.name
    hardware = ET.SubElement(system, o("VirtualHardwareSection"))
    ET.SubElement(hardware, o("Info")).text = "Virtual hardware requirements"
    sysinfo = ET.SubElement(hardware, o("System"))
    for tag, text in (("ElementName", "Virtual Hardware Family"), ("InstanceID", "0"),
                      ("VirtualSystemIdentifier", definition.name),
                      ("VirtualSystemType", "vmx-13")):
        ET.SubElement(sysinfo, f"{{{VSSD_NS}}}{tag}").text = text
    ids = iter(range(1, 10_000))

    def item(rtype: int, name: str, **fields: str | None) -> tuple[ET.Element, str]:
        element = ET.SubElement(hardware, o("Item"))
        iid = str(next(ids))
        values = {"ElementName": name, "InstanceID": iid, "ResourceType": str(rtype),
                  **fields}
        for tag in sorted(values):
            if values[tag] is not None:
                ET.SubElement(element, f"{{{RASD_NS}}}{tag}").text = values[tag]
        return element, iid

    cpu, _ = item(3, f"{definition.cpus} virtual CPU(s)", VirtualQuantity=str(definition.cpus))
    ET.SubElement(cpu, f"{{{VMW_NS}}}CoresPerSocket", {o("required"): "false"}).text = \
        str(definition.cores)
    item(4, f"{definition.memory >> 20}MB of memory", AllocationUnits="byte * 2^20",
         VirtualQuantity=str(definition.memory >> 20))
    controllers: dict[tuple[str, int], str] = {}
    for n, disk in enumerate(disks):
        key = (disk.bus, disk.controller)
        if key not in controllers:
            rtype, subtype = CONTROLLERS.get(disk.bus, (6, "lsilogic"))
            _, controllers[key] = item(rtype, f"{disk.bus} controller {disk.controller}",
                                       ResourceSubType=subtype, Address=str(disk.controller))
        item(17, f"Hard disk {n + 1}", HostResource=f"ovf:/disk/vmdisk{n}",
             Parent=controllers[key], AddressOnParent=str(disk.unit))
    for n, nic in enumerate(definition.nics):
        item(10, f"Network adapter {n + 1}", ResourceSubType=NIC_SUBTYPES.get(nic.model, "E1000"),
             Connection=nic.network or nic.source_network or "VM Network", Address=nic.mac,
             AddressOnParent=str(7 + n))
    if definition.firmware == "uefi":
        ET.SubElement(hardware, f"{{{VMW_NS}}}Config",
                      {o("required"): "false", f"{{{VMW_NS}}}key": "firmware",
                       f"{{{VMW_NS}}}value": "efi"})
    return ET.tostring(envelope, encoding="utf-8", xml_declaration=True)


def _refuse_existing(paths: list[Path]) -> None:
    for path in paths:
        if path.exists():
            raise UserError(f"{path} exists already; export into an empty place")


def _convert(disk: DiskDef, out: Path, fmt: str, subformat: str | None) -> None:
    argv = ["qemu-img", "convert", "-q", "-U", *(["-f", disk.format] if disk.format else []),
            "-O", fmt, *(["-o", f"subformat={subformat}"] if subformat else []),
            str(disk.path), str(out)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              timeout=QEMU_IMG_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        out.unlink(missing_ok=True)
        raise LocalError(f"exporting {disk.path}: {exc}") from exc
    if done.returncode != 0:
        out.unlink(missing_ok=True)
        raise LocalError(f"exporting {disk.path} as {fmt}: {done.stderr.strip()}")


def _virtual_size(path: Path) -> int:
    done = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                          capture_output=True, text=True, check=True)
    return int(json.loads(done.stdout)["virtual-size"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

"""The QEMU arguments of an imported VM: its disks on the buses its definition names
(controllers added as needed), the boot order, CPU topology and SMBIOS UUID. NICs go
through `ferry vm start`'s own (the agent's networks); RAM and the machine through its
LaunchSpec."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from agent.errors import UserError
from agent.importer.definition import DiskDef, VmDefinition
from agent.qemu.vmspec import format_keyval

# A controller each SCSI-ish bus needs (QEMU's device for it).
SCSI_CONTROLLERS = {"scsi-lsi": "lsi53c895a", "scsi-pvscsi": "pvscsi"}
IDE_UNITS = 4                     # the PIIX's two buses, master and slave
AHCI_PORTS = 6


def disk_arguments(definition: VmDefinition, targets: Iterable[tuple[DiskDef, Path, str]]
                   ) -> list[str]:
    """-drive/-device pairs for each (disk, imported image, its format), in the order
    given; a controller for each SATA (on pc) and SCSI controller the disks sit on."""
    args: list[str] = []
    controllers: set[tuple[str, int]] = set()
    for n, (disk, image, fmt) in enumerate(targets):
        drive = f"disk{n}"
        args += ["-drive", format_keyval([("file", str(image)), ("format", fmt),
                                          ("if", "none"), ("id", drive)])]
        boot = f",bootindex={disk.boot_order}" if disk.boot_order else ""
        if disk.bus == "virtio":
            args += ["-device", f"virtio-blk-pci,drive={drive}{boot}"]
        elif disk.bus == "nvme":
            args += ["-device", f"nvme,drive={drive},serial=ferry{n}{boot}"]
        elif disk.bus == "ide":
            if disk.unit >= IDE_UNITS and disk.controller == 0:
                raise UserError(f"IDE disk {disk.path}: unit {disk.unit} is past the "
                                f"{IDE_UNITS} the IDE buses hold")
            unit = disk.controller * 2 + disk.unit if disk.unit < 2 else disk.unit
            if definition.machine == "q35":
                # q35 has no PIIX IDE: its ICH9 AHCI ports (ide.0-5, one unit each) take
                # the disks in the same order, and every guest drives AHCI as IDE-like.
                args += ["-device", f"ide-hd,drive={drive},bus=ide.{unit}{boot}"]
            else:
                args += ["-device", f"ide-hd,drive={drive},bus=ide.{unit // 2},"
                                    f"unit={unit % 2}{boot}"]
        elif disk.bus == "sata":
            if disk.unit >= AHCI_PORTS:
                raise UserError(f"SATA disk {disk.path}: port {disk.unit} is past the "
                                f"{AHCI_PORTS} an AHCI controller has")
            if definition.machine == "q35" and disk.controller == 0:
                bus = f"ide.{disk.unit}"          # q35's own ICH9 AHCI
            else:
                key = ("ahci", disk.controller)
                if key not in controllers:
                    controllers.add(key)
                    args += ["-device", f"ahci,id=sata{disk.controller}"]
                bus = f"sata{disk.controller}.{disk.unit}"
            args += ["-device", f"ide-hd,drive={drive},bus={bus}{boot}"]
        elif disk.bus in SCSI_CONTROLLERS:
            key = (disk.bus, disk.controller)
            controller = f"scsi{disk.controller}"
            if key not in controllers:
                controllers.add(key)
                args += ["-device", f"{SCSI_CONTROLLERS[disk.bus]},id={controller}"]
            args += ["-device", f"scsi-hd,drive={drive},bus={controller}.0,"
                                f"scsi-id={disk.unit}{boot}"]
        else:
            raise UserError(f"disk {disk.path}: no QEMU device for bus {disk.bus!r}")
    return args


def vm_arguments(definition: VmDefinition, targets: Iterable[tuple[DiskDef, Path, str]]
                 ) -> list[str]:
    """Everything but RAM, machine and NICs: CPU topology, SMBIOS UUID, disks."""
    args = ["-smp", f"{definition.cpus},sockets={definition.sockets},"
                    f"cores={definition.cores},threads=1"]
    if definition.sockets * definition.cores != definition.cpus:
        args = ["-smp", str(definition.cpus)]
    if definition.uuid:
        args += ["-uuid", definition.uuid]
    return args + disk_arguments(definition, targets)


def nic_options(definition: VmDefinition) -> list[str]:
    """`ferry vm start --nic` texts for the NICs that have a ferry network."""
    out = []
    for nic in definition.nics:
        if nic.network:
            out.append(f"{nic.network},model={nic.model}"
                       + (f",mac={nic.mac}" if nic.mac else ""))
    return out

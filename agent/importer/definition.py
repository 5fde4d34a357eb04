"""A VM as ferry will run it, read from another hypervisor's configuration (or given on
the command line for bare images): CPUs, memory, firmware, disks on their buses, NICs
with their MACs, and every decision and warning made on the way, each with what to do.

The parsers (vmx, ovf/ova, vbox, bare images) produce one; the import creates the VM
from it. Nothing here reads files or runs anything."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RECORD_FILE = "import.json"   # an imported VM's definition, in its directory


class Level(enum.StrEnum):
    DECISION = "decision"    # what ferry chose (a bus mapped, a model kept)
    WARNING = "warning"      # it will work, but something is lost or changed
    REFUSAL = "refusal"      # it cannot work: nothing is copied


@dataclass(frozen=True, slots=True)
class Note:
    level: Level
    text: str
    remedy: str = ""         # what the operator can do about it

    def line(self) -> str:
        return f"{self.level.value}: {self.text}" + (f" ({self.remedy})" if self.remedy else "")


# Buses a disk may sit on in the definition (the QEMU devices they become: the importer).
DISK_BUSES = ("ide", "sata", "scsi-lsi", "scsi-pvscsi", "nvme", "virtio")
# NIC models QEMU emulates that imports map to.
NIC_MODELS = ("vmxnet3", "e1000", "e1000e", "virtio-net-pci", "rtl8139")


@dataclass(frozen=True, slots=True)
class DiskDef:
    """One disk of the source VM."""

    path: Path                     # the source image, absolute
    format: str | None = None      # as the source says or qemu-img detects: vmdk, vdi, ...
    bus: str = "virtio"            # one of DISK_BUSES
    controller: int = 0            # which controller of that bus
    unit: int = 0                  # unit number on it
    boot_order: int | None = None  # 1 = first
    virtual_size: int | None = None
    media: str = "disk"            # "disk"; a "cdrom" is left out (noted)
    # A disk inside an OVA is read in place: `path` is the .ova, the image its tar member
    # `member`, whose bytes are `member_size` bytes from `member_offset` (no extraction).
    member: str | None = None
    member_offset: int | None = None
    member_size: int | None = None


@dataclass(frozen=True, slots=True)
class NicDef:
    """One NIC of the source VM."""

    model: str = "virtio-net-pci"          # one of NIC_MODELS
    mac: str | None = None                 # kept as the source had it
    source_network: str | None = None      # the source hypervisor's name for its network
    network: str | None = None             # the ferry network it goes to (--net-map)


@dataclass(frozen=True, slots=True)
class VmDefinition:
    """Everything ferry needs to create and run the VM."""

    name: str
    memory: int                              # bytes
    cpus: int = 1
    sockets: int = 1
    cores: int = 1                           # per socket
    firmware: str = "bios"                   # "bios" or "uefi" (OVMF, fresh variables)
    machine: str = "pc"                      # "pc" or "q35"
    uuid: str | None = None                  # SMBIOS UUID
    os_type: str | None = None               # the source's guest OS identifier
    disks: tuple[DiskDef, ...] = ()
    nics: tuple[NicDef, ...] = ()
    source: str = ""                         # vmx, ovf, ova, vbox, image
    notes: tuple[Note, ...] = field(default_factory=tuple)

    def refusals(self) -> list[Note]:
        return [n for n in self.notes if n.level is Level.REFUSAL]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["disks"] = [{**d, "path": str(d["path"])} for d in out["disks"]]
        out["notes"] = [{**n, "level": n["level"].value} for n in out["notes"]]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmDefinition:
        disks = tuple(DiskDef(**{**d, "path": Path(d["path"])}) for d in data.get("disks", ()))
        nics = tuple(NicDef(**n) for n in data.get("nics", ()))
        notes = tuple(Note(Level(n["level"]), n["text"], n.get("remedy", ""))
                      for n in data.get("notes", ()))
        rest = {k: v for k, v in data.items() if k not in ("disks", "nics", "notes")}
        return cls(**rest, disks=disks, nics=nics, notes=notes)

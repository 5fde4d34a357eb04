"""A VMware disk's descriptor: its subformat (createType) and extents, read from a small
text descriptor or from the one embedded in a sparse ('KDMV') vmdk, reading only that
region. Which subformats ferry takes, extents kept inside the VM's directory, flat
extents as long as they claim (VMware's Virtual Disk Format 1.1 document)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.errors import UserError
from agent.importer.common import Notes, inside

SECTOR = 512
SPARSE_MAGIC = b"KDMV"
# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize (sectors)
_SPARSE_HEADER = struct.Struct("<4sIIQQQQ")
MAX_DESCRIPTOR = 1 << 20
# Subformats QEMU reads and ferry imports; "vmfs" is ESXi's flat disk (FLAT-like extents).
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized", "vmfs")
FLAT_EXTENTS = ("FLAT", "VMFS")
_EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')


@dataclass(frozen=True, slots=True)
class Extent:
    access: str
    sectors: int
    kind: str                # FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, ...
    file: Path | None        # None for ZERO
    offset: int = 0          # sectors into a flat file


@dataclass(frozen=True, slots=True)
class Vmdk:
    create_type: str
    extents: tuple[Extent, ...]
    parent_cid: str | None

    @property
    def virtual_size(self) -> int:
        return sum(e.sectors for e in self.extents) * SECTOR


def descriptor_text(path: Path) -> tuple[str, bool]:
    """The descriptor of vmdk `path` and whether it is embedded: the file itself when it
    is text, else the region a sparse header points to (bounded; nothing else of the
    image is read)."""
    try:
        with path.open("rb") as f:
            return descriptor_of(f, path.name)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def descriptor_of(f: BinaryIO, what: str) -> tuple[str, bool]:
    """descriptor_text of an open, seekable vmdk (a file, or a member read in place)."""
    head = f.read(_SPARSE_HEADER.size)
    embedded = head[:4] == SPARSE_MAGIC and len(head) == _SPARSE_HEADER.size
    if embedded:
        _, _, _, _, _, offset, size = _SPARSE_HEADER.unpack(head)
        if offset == 0 or size == 0:
            raise UserError(f"{what}: a sparse vmdk without an embedded descriptor "
                            f"(a sparse extent, not a disk: name its descriptor)")
        if size * SECTOR > MAX_DESCRIPTOR:
            raise UserError(f"{what}: embedded descriptor of {size} sectors is "
                            f"implausibly large")
        f.seek(offset * SECTOR)
        data = f.read(size * SECTOR)
    else:
        f.seek(0)
        data = f.read(MAX_DESCRIPTOR + 1)
        if len(data) > MAX_DESCRIPTOR:
            raise UserError(f"{what}: neither a sparse vmdk nor a descriptor (a flat "
                            f"extent? name its descriptor file instead)")
    text = data.split(b"\0", 1)[0].decode("utf-8", "replace")
    if "createType" not in text:
        raise UserError(f"{what}: no vmdk descriptor (createType missing)")
    return text, embedded


def parse_descriptor(text: str, base: Path, what: str, notes: Notes,
                     itself: Path | None = None) -> Vmdk | None:
    """The descriptor's subformat and extents; extents outside `base` and subformats
    ferry does not take are refusals (None returned). An embedded descriptor's SPARSE
    extent is the file `itself`, whatever name it was created under (ovftool renames)."""
    values: dict[str, str] = {}
    extents: list[Extent] = []
    ok = True
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT.match(line)
        if m:
            access, sectors, kind, name, offset = m.groups()
            file = None
            if itself is not None and kind.upper() == "SPARSE":
                file = itself
            elif name is not None:
                file = inside(base, name)
                if file is None:
                    notes.refuse(f"{what}: extent {name!r} is outside the VM's directory "
                                 f"{base}", "copy the extent next to its descriptor and "
                                 "name it relatively")
                    ok = False
                    continue
            extents.append(Extent(access, int(sectors), kind.upper(), file, int(offset or 0)))
        elif "=" in line:
            key, _, value = line.partition("=")
            values[key.strip().lower()] = value.strip().strip('"')
    create_type = values.get("createtype", "")
    if create_type not in SUBFORMATS:
        notes.refuse(f"{what}: vmdk subformat {create_type!r} is not one ferry imports "
                     f"({', '.join(SUBFORMATS)})",
                     "convert it on the source (vmkfstools -i DISK -d thin OUT.vmdk on ESXi, "
                     "or export the VM as OVF/OVA) and import that")
        ok = False
    parent = values.get("parentcid")
    if parent is not None and parent.lower() != "ffffffff":
        notes.refuse(f"{what}: a snapshot delta (parent {values.get('parentfilenamehint')!r})",
                     "delete or consolidate the VM's snapshots in VMware first")
        ok = False
    if not extents and ok:
        notes.refuse(f"{what}: the descriptor has no extents")
        ok = False
    return Vmdk(create_type, tuple(extents), parent) if ok else None


def check_extents(vmdk: Vmdk, what: str, notes: Notes) -> bool:
    """Every extent file present; flat ones at least as long as the descriptor says."""
    ok = True
    for e in vmdk.extents:
        if e.file is None:
            continue
        try:
            size = e.file.stat().st_size
        except OSError:
            notes.refuse(f"{what}: extent {e.file.name} is missing",
                         "copy every file of the VM's directory")
            ok = False
            continue
        if e.kind in FLAT_EXTENTS and size < (e.offset + e.sectors) * SECTOR:
            notes.refuse(f"{what}: flat extent {e.file.name} holds {size} bytes but the "
                         f"descriptor claims {(e.offset + e.sectors) * SECTOR}",
                         "the disk is truncated: copy it again from the source")
            ok = False
        elif e.kind not in FLAT_EXTENTS + ("SPARSE", "ZERO"):
            notes.refuse(f"{what}: extent kind {e.kind} is not one ferry imports")
            ok = False
    return ok


def read_vmdk(path: Path, base: Path, notes: Notes) -> Vmdk | None:
    """vmdk `path` checked for import; None (with refusals in notes) if it cannot be."""
    what = path.name
    try:
        text, embedded = descriptor_text(path)
    except UserError as exc:
        notes.refuse(str(exc), "name the disk's descriptor (.vmdk), not an extent")
        return None
    vmdk = parse_descriptor(text, base, what, notes, itself=path if embedded else None)
    if vmdk is None or not check_extents(vmdk, what, notes):
        return None
    notes.decide(f"{what}: vmdk {vmdk.create_type}, {len(vmdk.extents)} extent(s), read "
                 f"through QEMU's vmdk driver")
    return vmdk

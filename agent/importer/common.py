"""What the configuration readers share: collecting notes, paths kept inside a package,
bounded reads, XML parsed without DTDs or entities, MACs, UUIDs, the machine type, and
the limits past which a definition is refused."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path, PurePosixPath

from agent.errors import UserError
from agent.importer.definition import DiskDef, Level, Note, VmDefinition

MAX_CONFIG_BYTES = 16 << 20        # a .vmx, .ovf, .vbox or vmdk descriptor is kilobytes
MAX_MEMORY = 16 << 40              # 16 TiB: more is a typo or a hostile file
MAX_CPUS = 1024
MAX_DISK = 1 << 50                 # 1 PiB
MIB = 1 << 20


class Notes:
    """The notes of one definition in the order they were made."""

    def __init__(self) -> None:
        self.items: list[Note] = []

    def decide(self, text: str, remedy: str = "") -> None:
        self.items.append(Note(Level.DECISION, text, remedy))

    def warn(self, text: str, remedy: str = "") -> None:
        self.items.append(Note(Level.WARNING, text, remedy))

    def refuse(self, text: str, remedy: str = "") -> None:
        self.items.append(Note(Level.REFUSAL, text, remedy))

    def refusals(self) -> list[Note]:
        return [n for n in self.items if n.level is Level.REFUSAL]


def read_bounded(path: Path, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The whole of a small configuration file; a larger one is refused, not read."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise UserError(f"{path}: larger than {limit >> 20} MiB, not a configuration file")
    return data


def inside(base: Path, name: str) -> Path | None:
    """`name` (relative, as a configuration writes it) resolved under directory `base`, or
    None when it is absolute or climbs out (`..`, or a symlink pointing away)."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return None
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return None
    candidate = base.joinpath(*parts)
    try:
        candidate.resolve().relative_to(base.resolve())
    except ValueError:
        return None
    return candidate


# ---------------------------------------------------------------------------------- XML

_DTD = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def parse_xml(data: bytes, what: str) -> ET.Element:
    """The root of an XML document that has no DTD and declares no entity (so neither an
    entity expansion bomb nor an external entity can be in it)."""
    if _DTD.search(data):
        raise UserError(f"{what}: has a DOCTYPE or ENTITY declaration; refused (an OVF or "
                        f".vbox has none, and entities can expand without bound)")
    try:
        return ET.fromstring(data, parser=ET.XMLParser())
    except ET.ParseError as exc:
        raise UserError(f"{what}: not well-formed XML ({exc})") from None


def local(tag: str) -> str:
    """An element or attribute name without its {namespace}."""
    return tag.rpartition("}")[2]


def attr(el: ET.Element, name: str, default: str | None = None) -> str | None:
    """Attribute `name` in whatever namespace the writer put it."""
    if name in el.attrib:
        return el.attrib[name]
    for key, value in el.attrib.items():
        if local(key) == name:
            return value
    return default


def children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if local(c.tag) == name]


def child(el: ET.Element, name: str) -> ET.Element | None:
    found = children(el, name)
    return found[0] if found else None


def child_text(el: ET.Element, name: str) -> str | None:
    c = child(el, name)
    return c.text.strip() if c is not None and c.text is not None else None


# ------------------------------------------------------------------------ small values

_MAC_HEX = re.compile(r"[0-9a-fA-F]{12}")


def normalize_mac(text: str | None) -> str | None:
    """aa:bb:cc:dd:ee:ff from the forms writers use (colons, dashes, none); None if absent.
    Not a unicast MAC: UserError."""
    if not text:
        return None
    digits = re.sub(r"[:\-.\s]", "", text)
    if not _MAC_HEX.fullmatch(digits) or int(digits[:2], 16) & 1:
        raise UserError(f"{text!r} is not a unicast MAC address")
    digits = digits.lower()
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def normalize_uuid(text: str | None) -> str | None:
    """The 8-4-4-4-12 form of a UUID written any way (VMware's "56 4d ... - ..." bytes,
    VirtualBox's {braces}); None if absent or not 16 bytes of hex."""
    if not text:
        return None
    digits = re.sub(r"[\s\-{}]", "", text).lower()
    if not re.fullmatch(r"[0-9a-f]{32}", digits):
        return None
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def parse_int(text: str | None, what: str) -> int | None:
    if text is None or text.strip() == "":
        return None
    try:
        return int(text.strip(), 0) if text.strip().lower().startswith("0x") else int(text)
    except ValueError:
        raise UserError(f"{what} = {text!r}: not a whole number") from None


# ------------------------------------------------------------------- the whole definition

def choose_machine(disks: tuple[DiskDef, ...], firmware: str, notes: Notes) -> str:
    """q35 when a disk is on SATA or the firmware is UEFI (AHCI and OVMF's secure paths
    are at home there), else pc, the i440FX board other hypervisors' BIOS VMs resemble."""
    if firmware == "uefi" or any(d.bus == "sata" for d in disks):
        notes.decide("machine q35 (for its AHCI controller and UEFI)")
        return "q35"
    notes.decide("machine pc (i440FX, like the source's BIOS board)")
    return "pc"


def check_limits(defn: VmDefinition) -> VmDefinition:
    """The definition with refusals added for sizes no VM can have."""
    notes = Notes()
    if defn.memory <= 0 or defn.memory > MAX_MEMORY:
        notes.refuse(f"memory {defn.memory} bytes is out of range (1 byte to 16 TiB)",
                     "fix the memory size in the source configuration or give --memory")
    elif defn.memory % 4096:
        notes.refuse(f"memory {defn.memory} bytes is not a multiple of 4 KiB")
    if not 1 <= defn.cpus <= MAX_CPUS:
        notes.refuse(f"{defn.cpus} vCPUs is out of range (1 to {MAX_CPUS})",
                     "fix the CPU count in the source configuration or give --cpus")
    for d in defn.disks:
        if d.virtual_size is not None and not 0 < d.virtual_size <= MAX_DISK:
            notes.refuse(f"disk {d.path.name}: virtual size {d.virtual_size} bytes is out "
                         f"of range (1 byte to 1 PiB)")
    if not notes.items:
        return defn
    return replace(defn, notes=defn.notes + tuple(notes.items))


def apply_net_map(defn: VmDefinition, net_map: dict[str, str]) -> VmDefinition:
    """Each NIC's ferry network from --net-map SRC=NET (SRC: the source's network name);
    NICs left without one are warned, entries matching no NIC refused."""
    notes = Notes()
    used: set[str] = set()
    nics = []
    for index, nic in enumerate(defn.nics):
        network = nic.network
        if nic.source_network is not None and nic.source_network in net_map:
            network = net_map[nic.source_network]
            used.add(nic.source_network)
            notes.decide(f"NIC {index} (source network {nic.source_network!r}) goes to "
                         f"network {network}")
        elif network is None:
            notes.warn(f"NIC {index} (source network {nic.source_network!r}) has no ferry "
                       f"network", f"give --net-map {nic.source_network or 'SRC'}=NETWORK")
        nics.append(replace(nic, network=network))
    for src in sorted(set(net_map) - used):
        have = ", ".join(repr(n.source_network) for n in defn.nics) or "none"
        notes.refuse(f"--net-map {src}={net_map[src]}: no NIC is on source network {src!r} "
                     f"(the source networks: {have})")
    return replace(defn, nics=tuple(nics), notes=defn.notes + tuple(notes.items))

"""The VM description two agents exchange, and the table of QEMU options a destination knows.

The destination never runs a remote argv as given (DESIGN §6): every option must be in
OPTIONS below; `agent.qemu.hostrules` decides what of an option's value may name a host
resource, and `agent.qemu.destargv` rewrites the argv, replacing everything that names a
host resource (RAM file, monitors, serial and log files, pidfile) by a path inside the
destination's own VM directory. Guest-visible configuration (machine, CPUs, devices) is
kept exactly, because the device state that follows must match it.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.errors import UserError

PAGE_SIZE = 4096
RAM_BACKEND_TYPE = "memory-backend-file"
"""What the destination always runs: its own shared RAM file, which ferry writes pages into."""
RAM_BACKEND_TYPES = ("memory-backend-ram", "memory-backend-file", "memory-backend-memfd")
PLAIN_RAM_BLOCK = "pc.ram"
"""The main RAM block of an x86 pc/q35 guest with plain -m RAM: the destination names its
file backend so, and the stream needs no renaming."""
DEFAULT_MEMORY = 128 << 20
SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# -m without a suffix means MiB (QEMU's default unit for -m), unlike object sizes (bytes).
M_DEFAULT_SUFFIX = "m"


class Policy(enum.Enum):
    """What the destination does with one QEMU option."""

    FLAG = "flag"            # no value; kept
    KEEP = "keep"            # value kept as given (guest-visible, names nothing of the host)
    DROP_FLAG = "drop-flag"  # no value; dropped (host-side behaviour the agent controls)
    DROP = "drop"            # value dropped (host-side resource the agent replaces)
    PATH = "path"            # value is a file the destination must read; under allowed roots
    MEMORY = "memory"        # -m: checked against the RAM backend
    OBJECT = "object"        # -object: only memory-backend-file, rewritten
    CHARDEV = "chardev"      # -chardev: paths rewritten into the VM directory
    SERIAL = "serial"        # -serial: file: targets rewritten into the VM directory
    MON = "mon"              # -mon: dropped with the chardev it uses
    DRIVE = "drive"          # -drive: file= under allowed roots
    BLOCKDEV = "blockdev"    # -blockdev: filename= under allowed roots
    NETDEV = "netdev"        # -netdev / -nic: only host-independent back ends
    DEVICE = "device"        # -device: allowed types, property rules (hostrules)
    GLOBAL = "global"        # -global: property rules, as -device
    SET = "set"              # -set: merged into the option it sets, then checked with it
    FIRMWARE = "firmware"    # -bios: a bundled file by name, or under allowed roots
    INITRD = "initrd"        # -initrd: every module (multiboot: comma-separated) allowed
    MACHINE = "machine"      # -machine / -M: file properties checked
    BOOT = "boot"            # -boot: splash= file checked
    DISPLAY = "display"      # -display: only none (every other one is a host UI or listener)


OPTIONS: dict[str, Policy] = {
    # guest-visible configuration, kept verbatim
    "-name": Policy.KEEP, "-machine": Policy.MACHINE, "-M": Policy.MACHINE, "-smp": Policy.KEEP,
    "-cpu": Policy.KEEP, "-accel": Policy.KEEP, "-device": Policy.DEVICE,
    "-global": Policy.GLOBAL, "-set": Policy.SET,
    "-rtc": Policy.KEEP, "-boot": Policy.BOOT, "-append": Policy.KEEP, "-vga": Policy.KEEP,
    "-display": Policy.DISPLAY, "-overcommit": Policy.KEEP, "-msg": Policy.KEEP,
    "-uuid": Policy.KEEP, "-k": Policy.KEEP, "-action": Policy.KEEP, "-sandbox": Policy.KEEP,
    "-enable-kvm": Policy.FLAG, "-nodefaults": Policy.FLAG, "-no-user-config": Policy.FLAG,
    "-nographic": Policy.FLAG, "-no-reboot": Policy.FLAG, "-no-shutdown": Policy.FLAG,
    "-no-hpet": Policy.FLAG,
    # files the guest boots from: read on the destination, so they must be allowed there
    "-kernel": Policy.PATH, "-initrd": Policy.INITRD, "-bios": Policy.FIRMWARE,
    "-dtb": Policy.PATH,
    # host resources the destination agent replaces with its own
    "-qmp": Policy.DROP, "-monitor": Policy.DROP, "-pidfile": Policy.DROP, "-D": Policy.DROP,
    "-incoming": Policy.DROP, "-runas": Policy.DROP, "-chroot": Policy.DROP,
    "-daemonize": Policy.DROP_FLAG, "-S": Policy.DROP_FLAG,
    "-m": Policy.MEMORY, "-object": Policy.OBJECT, "-chardev": Policy.CHARDEV,
    "-serial": Policy.SERIAL, "-mon": Policy.MON,
    "-drive": Policy.DRIVE, "-blockdev": Policy.BLOCKDEV,
    "-netdev": Policy.NETDEV, "-nic": Policy.NETDEV,
}
VALUE_LESS = {Policy.FLAG, Policy.DROP_FLAG}
REFUSED_OPTIONS = {
    "-vnc": "it opens a VNC listener on the destination host",
    "-spice": "it opens a SPICE listener on the destination host",
    "-L": "it would change where QEMU finds its ROMs and firmware",
    "-readconfig": "it reads a host file of further options",
    "-plugin": "it loads a host library into QEMU",
    "-loadvm": "the device state comes from the migration",
    "-add-fd": "it passes host file descriptors",
    "-virtfs": "it shares a host directory", "-fsdev": "it shares a host directory",
}
"""Options refused with a reason (every other unknown option is refused as unknown)."""
# Network back ends that need nothing of the host beyond QEMU itself.
PORTABLE_NETDEVS = {"user", "hubport", "none"}
# Back ends on a host network: each such NIC is put on the destination's network of the
# same name (agent.hostnet), its back end rebuilt there.
HOST_NETDEVS = ("tap", "bridge")
NIC_GUEST_KEYS = ("model", "mac")
CHARDEV_PATH_KEYS = ("path", "logfile")


# ---------------------------------------------------------------------------- parsing

def parse_size(text: str, default_suffix: str = "") -> int:
    """Bytes in a QEMU size such as 1G, 1048584K or 4096 (case-insensitive suffix)."""
    match = re.fullmatch(r"\s*(\d+)\s*([bkmgtBKMGT]?)\s*", text)
    if not match:
        raise UserError(f"not a size: {text!r}")
    suffix = (match.group(2) or default_suffix).lower()
    return int(match.group(1)) * SIZE_SUFFIXES[suffix]


def parse_keyval(text: str, implied_key: str | None = None) -> list[tuple[str, str | None]]:
    """QEMU's `a=b,c=d` option syntax, split exactly as QEMU's QemuOpts splits it: a name
    runs to the first `=` or `,` (it never holds a comma), a value to the first single `,`
    (`,,` is a comma in it). A leading bare word gets `implied_key` (e.g. the driver of
    -device); other bare words map to None (QEMU's flags: `x` is x=on, `nox` x=off), the
    empty name of a stray `,,` included."""
    if not text:
        return [(implied_key, "")] if implied_key is not None else []
    pairs: list[tuple[str, str | None]] = []
    i, first = 0, True
    while i < len(text):
        end = i
        while end < len(text) and text[end] not in "=,":
            end += 1
        if end < len(text) and text[end] == "=":
            name = text[i:end]
            value, i = read_opt_value(text, end + 1)
            pairs.append((name, value))
        elif first and implied_key is not None:
            value, i = read_opt_value(text, i)
            pairs.append((implied_key, value))
        else:
            pairs.append((text[i:end], None))
            i = end
        first = False
        i += 1   # the separating comma (past the end: done)
    return pairs


def read_opt_value(text: str, i: int) -> tuple[str, int]:
    """A value from text[i:] up to the first single comma (QEMU's get_opt_value); the
    value and where it ended."""
    out: list[str] = []
    while True:
        comma = text.find(",", i)
        if comma < 0:
            out.append(text[i:])
            return "".join(out), len(text)
        if text[comma + 1:comma + 2] != ",":
            out.append(text[i:comma])
            return "".join(out), comma
        out.append(text[i:comma + 1])
        i = comma + 2


def format_keyval(pairs: Iterable[tuple[str, str | None]]) -> str:
    """Inverse of parse_keyval (values re-escaped); keys are always written explicitly."""
    out = []
    for key, value in pairs:
        out.append(key if value is None else f"{key}={value.replace(',', ',,')}")
    return ",".join(out)


def keyval_get(pairs: Sequence[tuple[str, str | None]], key: str) -> str | None:
    """The value of the last `key` in pairs (QEMU lets later keys win), or None."""
    found = None
    for k, v in pairs:
        if k == key:
            found = v
    return found


def keyval_set(pairs: list[tuple[str, str | None]], key: str, value: str) -> None:
    """Replace every `key` in pairs with one `key=value` at the first one's place (or append)."""
    positions = [i for i, (k, _) in enumerate(pairs) if k == key]
    if not positions:
        pairs.append((key, value))
        return
    pairs[positions[0]] = (key, value)
    for i in reversed(positions[1:]):
        del pairs[i]


@dataclass(frozen=True, slots=True)
class Option:
    """One QEMU command-line option and its value (None for flags)."""

    name: str
    value: str | None = None

    def argv(self) -> list[str]:
        return [self.name] if self.value is None else [self.name, self.value]


def split_options(args: Sequence[str]) -> list[Option]:
    """QEMU options (without the binary) as Option objects; unknown options are refused."""
    options: list[Option] = []
    i = 0
    while i < len(args):
        raw = args[i]
        if not raw.startswith("-"):
            raise UserError(f"unexpected QEMU argument {raw!r} (not an option)")
        name = "-" + raw.lstrip("-")  # QEMU accepts --opt as -opt
        policy = OPTIONS.get(name)
        if name in REFUSED_OPTIONS:
            raise UserError(f"QEMU option {name} is not accepted by the destination: "
                            f"{REFUSED_OPTIONS[name]}")
        if policy is None:
            raise UserError(
                f"QEMU option {name} is not accepted by the destination "
                f"(known options: {', '.join(sorted(OPTIONS))})")
        if policy in VALUE_LESS:
            options.append(Option(name))
            i += 1
            continue
        if i + 1 >= len(args):
            raise UserError(f"QEMU option {name} needs a value")
        options.append(Option(name, args[i + 1]))
        i += 2
    return options


def netdev_keys(options: Sequence[Option]) -> list[tuple[Option, str]]:
    """Every -netdev and -nic with the key both agents name its NIC by: the netdev id,
    else (a -nic without id) nic:N, N counting the -nic options from 0."""
    keyed = []
    nic_ordinal = 0
    for opt in options:
        if opt.name not in ("-netdev", "-nic"):
            continue
        given = keyval_get(parse_keyval(opt.value or "", "type"), "id")
        if opt.name == "-nic":
            key = given or f"nic:{nic_ordinal}"
            nic_ordinal += 1
        else:
            key = given or ""
        keyed.append((opt, key))
    return keyed


# ---------------------------------------------------------------------------- description

DISK_FORMATS = ("qcow2", "raw")
"""Image formats ferry copies (and creates on the destination)."""


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """One writable disk of a VM whose content the migration copies."""

    index: int
    path: str                      # the image file on the source
    format: str                    # qcow2 or raw
    virtual_size: int              # bytes the guest sees
    node: str                      # the format node's name in the source QEMU

    def __post_init__(self) -> None:
        if self.format not in DISK_FORMATS:
            raise UserError(f"disk {self.path}: format {self.format!r} cannot be copied "
                            f"(ferry copies {', '.join(DISK_FORMATS)})")
        if self.virtual_size <= 0 or not os.path.isabs(self.path):
            raise UserError(f"bad disk description {self.path!r} ({self.virtual_size} bytes)")


@dataclass(frozen=True, slots=True)
class NicSpec:
    """One NIC with a host side (tap, bridge): the destination puts it on `network`."""

    key: str                       # netdev id, or nic:N for the N-th -nic without id
    network: str
    mac: str = ""                  # "" if unknown (the argv names none; QEMU's default)
    model: str = ""

    def to_json(self) -> dict:
        return {"key": self.key, "network": self.network, "mac": self.mac,
                "model": self.model}

    @classmethod
    def from_json(cls, data: dict) -> NicSpec:
        return cls(key=str(data["key"]), network=str(data["network"]),
                   mac=str(data.get("mac", "")), model=str(data.get("model", "")))


@dataclass(frozen=True, slots=True)
class VmSpec:
    """What the source tells the destination about a VM: enough to start its twin."""

    name: str
    argv: tuple[str, ...]          # the source QEMU's options, binary excluded
    ram_size: int                  # bytes of the shared RAM backend
    ram_backend_id: str
    disks: tuple[DiskSpec, ...] = ()   # disks to copy (storage mode copy); none if shared
    nics: tuple[NicSpec, ...] = ()     # NICs on host networks

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name):
            raise UserError(f"invalid VM name {self.name!r}: use letters, digits, '_', '.', '-'")
        if self.ram_size <= 0 or self.ram_size % PAGE_SIZE:
            raise UserError(f"RAM size {self.ram_size} is not a positive multiple of {PAGE_SIZE}")

    @property
    def npages(self) -> int:
        return self.ram_size // PAGE_SIZE

    def to_json(self) -> dict:
        return {"name": self.name, "argv": list(self.argv), "ram_size": self.ram_size,
                "ram_backend_id": self.ram_backend_id,
                "disks": [{"index": d.index, "path": d.path, "format": d.format,
                           "virtual_size": d.virtual_size, "node": d.node}
                          for d in self.disks],
                "nics": [n.to_json() for n in self.nics]}

    @classmethod
    def from_json(cls, data: dict) -> VmSpec:
        try:
            argv = data["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise TypeError("argv must be a list of strings")
            disks = tuple(DiskSpec(index=int(d["index"]), path=str(d["path"]),
                                   format=str(d["format"]), virtual_size=int(d["virtual_size"]),
                                   node=str(d["node"]))
                          for d in data.get("disks") or ())
            nics = tuple(NicSpec.from_json(n) for n in data.get("nics") or ())
            return cls(name=str(data["name"]), argv=tuple(argv), ram_size=int(data["ram_size"]),
                       ram_backend_id=str(data["ram_backend_id"]), disks=disks, nics=nics)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            # OverflowError: int() of a JSON Infinity (Python's json reads it as a float).
            raise UserError(f"malformed VM description: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RamBackend:
    """The memory backend object the machine uses as its RAM."""

    id: str
    qom_type: str
    size: int
    mem_path: str
    share: bool


def ram_backend_of(options: Sequence[Option]) -> RamBackend | None:
    """The machine's RAM backend object, or None for plain -m RAM (block pc.ram)."""
    machine_backend = None
    for opt in options:
        if opt.name in ("-machine", "-M") and opt.value:
            found = keyval_get(parse_keyval(opt.value, "type"), "memory-backend")
            if found is not None:
                machine_backend = found
    if machine_backend is None:
        return None
    for opt in options:
        if opt.name != "-object" or opt.value is None:
            continue
        pairs = parse_keyval(opt.value, "qom-type")
        qom_type = keyval_get(pairs, "qom-type") or ""
        if keyval_get(pairs, "id") != machine_backend:
            continue
        if qom_type not in RAM_BACKEND_TYPES:
            raise UserError(f"the VM's RAM backend {machine_backend!r} is a {qom_type}, not "
                            f"one of {', '.join(RAM_BACKEND_TYPES)}")
        size = keyval_get(pairs, "size")
        if size is None:
            raise UserError(f"memory backend {machine_backend!r} has no size")
        share = keyval_get(pairs, "share") in ("on", "yes", "true")
        return RamBackend(machine_backend, qom_type, parse_size(size),
                          keyval_get(pairs, "mem-path") or "", share)
    raise UserError(f"-machine memory-backend={machine_backend} names no -object")


def memory_size(options: Sequence[Option]) -> int:
    """Guest RAM in bytes as -m gives it (QEMU's default 128 MiB without -m)."""
    size = DEFAULT_MEMORY
    for opt in options:
        if opt.name == "-m" and opt.value is not None:
            text = keyval_get(parse_keyval(opt.value, "size"), "size")
            if text is not None:
                size = parse_size(text, M_DEFAULT_SUFFIX)
    return size

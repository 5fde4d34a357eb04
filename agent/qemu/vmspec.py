"""The VM description two agents exchange, and the destination's checked rewrite of its argv.

The destination never runs a remote argv as given (DESIGN §6): every option must be in
OPTIONS below, paths must lie under the destination's allowed roots, and everything that
names a host resource (RAM file, monitors, serial and log files, pidfile) is replaced by a
path inside the destination's own VM directory. Guest-visible configuration (machine,
CPUs, devices) is kept exactly, because the device state that follows must match it.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    KEEP = "keep"            # value kept as given (guest-visible configuration)
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


OPTIONS: dict[str, Policy] = {
    # guest-visible configuration, kept verbatim
    "-name": Policy.KEEP, "-machine": Policy.KEEP, "-M": Policy.KEEP, "-smp": Policy.KEEP,
    "-cpu": Policy.KEEP, "-accel": Policy.KEEP, "-device": Policy.KEEP, "-global": Policy.KEEP,
    "-rtc": Policy.KEEP, "-boot": Policy.KEEP, "-append": Policy.KEEP, "-vga": Policy.KEEP,
    "-display": Policy.KEEP, "-overcommit": Policy.KEEP, "-msg": Policy.KEEP,
    "-uuid": Policy.KEEP, "-k": Policy.KEEP, "-action": Policy.KEEP, "-sandbox": Policy.KEEP,
    "-enable-kvm": Policy.FLAG, "-nodefaults": Policy.FLAG, "-no-user-config": Policy.FLAG,
    "-nographic": Policy.FLAG, "-no-reboot": Policy.FLAG, "-no-shutdown": Policy.FLAG,
    "-no-hpet": Policy.FLAG,
    # files the guest boots from: read on the destination, so they must be allowed there
    "-kernel": Policy.PATH, "-initrd": Policy.PATH, "-bios": Policy.PATH, "-dtb": Policy.PATH,
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
    """QEMU's `a=b,c=d` option syntax (`,,` escapes a comma); a leading bare word gets
    `implied_key` (e.g. the driver of -chardev), other bare words map to None."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    pairs: list[tuple[str, str | None]] = []
    for index, part in enumerate(parts):
        if "=" in part:
            key, value = part.split("=", 1)
            pairs.append((key, value))
        elif index == 0 and implied_key is not None:
            pairs.append((implied_key, part))
        elif part:
            pairs.append((part, None))
    return pairs


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


# ---------------------------------------------------------------------------- destination

@dataclass(frozen=True, slots=True)
class DestinationPaths:
    """Where the destination keeps one incoming VM's host resources."""

    vm_dir: Path
    ram_path: Path
    qmp_path: Path
    serial_log: Path
    pidfile: Path
    qemu_log: Path                 # QEMU's stdout and stderr
    incoming_path: Path            # unix socket QEMU listens on for device state

    @classmethod
    def under(cls, vm_dir: Path, ram_dir: Path, name: str) -> DestinationPaths:
        return cls(vm_dir=vm_dir, ram_path=ram_dir / f"ferry-{name}-{os.getpid()}.ram",
                   qmp_path=vm_dir / "qmp.sock", serial_log=vm_dir / "serial.log",
                   pidfile=vm_dir / "qemu.pid", qemu_log=vm_dir / "qemu.log",
                   incoming_path=vm_dir / "incoming.sock")


@dataclass(frozen=True, slots=True)
class DiskTarget:
    """Where the destination puts one copied disk, and in which format."""

    path: str
    format: str
    converts: bool = False         # format differs from the source's


@dataclass(slots=True)
class _Rewrite:
    """Working state while the destination rewrites an argv."""

    roots: tuple[Path, ...]
    paths: DestinationPaths
    disks: dict[str, DiskTarget] = field(default_factory=dict)   # source path -> target
    out: list[str] = field(default_factory=list)
    dropped_chardevs: set[str] = field(default_factory=set)
    ram_backend: str = ""          # id of the machine's RAM backend object
    host_nics: dict[str, str] = field(default_factory=dict)   # NIC key -> this host's back end
    nic_keys: dict[int, str] = field(default_factory=dict)    # id(option) -> its NIC key
    serial_count: int = 0
    chardev_count: int = 0


def is_under(path: Path, roots: Sequence[Path]) -> bool:
    """Whether path (resolved, symlinks followed) lies inside one of roots."""
    resolved = path.resolve()
    return any(resolved == root.resolve() or resolved.is_relative_to(root.resolve())
               for root in roots)


def require_allowed(path_text: str, roots: Sequence[Path], what: str) -> None:
    """Refuse a path the destination may not use, naming the roots it may use."""
    path = Path(path_text)
    if not path.is_absolute() or not is_under(path, roots):
        raise UserError(
            f"{what} {path_text!r} is outside the destination's allowed paths "
            f"({', '.join(str(r) for r in roots)}); start its agent with --allow-path")


def destination_argv(spec: VmSpec, paths: DestinationPaths, roots: Sequence[Path],
                     qemu_binary: str,
                     disks: dict[str, DiskTarget] | None = None,
                     host_nics: dict[str, str] | None = None) -> list[str]:
    """The argv the destination runs for spec: checked, with host resources its own.

    `disks` maps a copied disk's source path to its target on this host; disks not in it
    are shared storage, used at the same path. `host_nics` maps the key of each NIC on a
    host network (tap, bridge) to the back end this host gives it (e.g. `tap,fd=7`).
    """
    options = split_options(spec.argv)
    backend = ram_backend_of(options)
    block, size = ((backend.id, backend.size) if backend is not None
                   else (PLAIN_RAM_BLOCK, memory_size(options)))
    if size != spec.ram_size or block != spec.ram_backend_id:
        raise UserError(f"VM description (RAM block {spec.ram_backend_id!r} of "
                        f"{spec.ram_size} bytes) disagrees with its argv ({block!r} of "
                        f"{size} bytes)")
    # Chardevs used only by monitors go with them; guest-visible ones are kept.
    mon_chardevs = {keyval_get(parse_keyval(o.value or ""), "chardev")
                    for o in options if o.name == "-mon"}
    state = _Rewrite(roots=tuple(roots), paths=paths, disks=dict(disks or {}),
                     dropped_chardevs={c for c in mon_chardevs if c},
                     ram_backend=backend.id if backend is not None else "",
                     host_nics=dict(host_nics or {}),
                     nic_keys={id(opt): key for opt, key in netdev_keys(options)})
    for opt in options:
        _rewrite_option(opt, state)
    if backend is None:
        # Plain -m RAM on the source: here it is a shared file under the same block name.
        state.out += ["-object", _ram_object(PLAIN_RAM_BLOCK, size, paths.ram_path),
                      "-machine", f"memory-backend={PLAIN_RAM_BLOCK}"]
    state.out += [
        "-qmp", f"unix:{paths.qmp_path},server=on,wait=off",
        "-pidfile", str(paths.pidfile),
        "-S", "-incoming", "defer",
    ]
    return [qemu_binary, *state.out]


def _rewrite_option(opt: Option, st: _Rewrite) -> None:
    policy = OPTIONS[opt.name]
    value = opt.value or ""
    if policy in (Policy.FLAG, Policy.KEEP, Policy.MEMORY):
        st.out += opt.argv()
    elif policy in (Policy.DROP, Policy.DROP_FLAG, Policy.MON):
        return
    elif policy is Policy.PATH:
        require_allowed(value, st.roots, f"{opt.name} file")
        st.out += opt.argv()
    elif policy is Policy.OBJECT:
        pairs = parse_keyval(value, "qom-type")
        qom_type = keyval_get(pairs, "qom-type")
        if qom_type not in RAM_BACKEND_TYPES or keyval_get(pairs, "id") != st.ram_backend:
            raise UserError(f"-object {qom_type} is not accepted by the destination (only "
                            f"the machine's RAM backend, one of {', '.join(RAM_BACKEND_TYPES)})")
        # Rebuilt from id and size alone: every other property (host NUMA nodes, hugetlb,
        # the source's path) is the source host's business.
        st.out += ["-object", _ram_object(st.ram_backend, parse_size(
            keyval_get(pairs, "size") or "0"), st.paths.ram_path)]
    elif policy is Policy.CHARDEV:
        pairs = parse_keyval(value, "backend")
        if keyval_get(pairs, "id") in st.dropped_chardevs:
            return
        backend = keyval_get(pairs, "backend")
        if backend not in ("null", "file", "socket", "ringbuf", "pipe"):
            raise UserError(f"-chardev {backend} is not accepted by the destination")
        for key in CHARDEV_PATH_KEYS:
            if keyval_get(pairs, key) is not None:
                st.chardev_count += 1
                keyval_set(pairs, key, str(st.paths.vm_dir / f"chardev{st.chardev_count}.{key}"))
        if backend == "socket" and keyval_get(pairs, "path") is None:
            raise UserError("-chardev socket over TCP is host-specific and not accepted")
        st.out += ["-chardev", format_keyval(pairs)]
    elif policy is Policy.SERIAL:
        if value.startswith("file:") or value == "stdio":
            st.serial_count += 1
            suffix = "" if st.serial_count == 1 else f".{st.serial_count}"
            st.out += ["-serial", f"file:{st.paths.serial_log}{suffix}"]
        elif value in ("none", "null") or value.startswith("chardev:"):
            st.out += opt.argv()
        else:
            raise UserError(f"-serial {value} is host-specific and not accepted")
    elif policy is Policy.DRIVE:
        pairs = parse_keyval(value)
        file = keyval_get(pairs, "file")
        target = st.disks.get(file or "")
        if target is not None:
            keyval_set(pairs, "file", target.path)
            keyval_set(pairs, "format", target.format)
        if file:
            require_allowed(target.path if target else file, st.roots, "disk")
        st.out += ["-drive", format_keyval(pairs)]
    elif policy is Policy.BLOCKDEV:
        st.out += ["-blockdev", _rewrite_blockdev(value, st)]
    elif policy is Policy.NETDEV:
        pairs = parse_keyval(value, "type")
        backend = pairs[0][1] if pairs else None
        key = st.nic_keys.get(id(opt), "")
        if backend in HOST_NETDEVS:
            st.out += [opt.name, _host_nic_backend(opt.name, key, pairs, st.host_nics)]
            return
        if backend not in PORTABLE_NETDEVS:
            raise UserError(f"{opt.name} {backend} is host-specific and not accepted "
                            f"(accepted: {', '.join(sorted(PORTABLE_NETDEVS))}, and "
                            f"{', '.join(HOST_NETDEVS)} NICs put on the destination's "
                            f"networks)")
        st.out += opt.argv()


def _host_nic_backend(option: str, key: str, pairs: list[tuple[str, str | None]],
                      host_nics: dict[str, str]) -> str:
    """A tap or bridge NIC's netdev rebuilt on this host's network: only the id (and for
    -nic the guest side: model, mac) survives; everything host-side is this host's own."""
    replacement = host_nics.get(key)
    if replacement is None:
        raise UserError(f"{option} {pairs[0][1]} (NIC {key or 'without id'}) has no network "
                        f"on this host: the source did not describe it")
    kept = [("id", key)] if option == "-netdev" or not key.startswith("nic:") else []
    if option == "-nic":
        kept += [(k, v) for k, v in pairs if k in NIC_GUEST_KEYS and v is not None]
    return ",".join([replacement, format_keyval(kept)]) if kept else replacement


def _ram_object(backend_id: str, size: int, ram_path: Path) -> str:
    """The destination's RAM: a shared file the agent writes pages into (x-ignore-shared)."""
    return format_keyval([("qom-type", RAM_BACKEND_TYPE), ("id", backend_id),
                          ("size", str(size)), ("mem-path", str(ram_path)), ("share", "on")])


def _rewrite_blockdev(value: str, st: _Rewrite) -> str:
    """A -blockdev with copied disks' filenames replaced; every filename checked."""
    if value.lstrip().startswith("{"):
        for filename in _blockdev_filenames(value):
            if filename in st.disks:
                raise UserError("a -blockdev in JSON form cannot be redirected to a copied "
                                "disk's new path; use key=value form or shared storage")
            require_allowed(filename, st.roots, "disk")
        return value
    pairs = parse_keyval(value)
    for key, given in list(pairs):
        filename = given or ""
        if filename and (key == "filename" or key.endswith(".filename")):
            target = st.disks.get(filename)
            if target is not None and target.converts:
                raise UserError(f"disk {filename} is a -blockdev: its format cannot be "
                                f"converted on the way (--disk-format works with -drive)")
            if target is not None:
                keyval_set(pairs, key, target.path)
            require_allowed(target.path if target else filename, st.roots, "disk")
    return format_keyval(pairs)


def _blockdev_filenames(value: str) -> list[str]:
    """Every `filename` in a -blockdev, in key=value or JSON form (nested nodes too)."""
    if value.lstrip().startswith("{"):
        try:
            tree = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"malformed -blockdev JSON: {exc}") from exc
        found: list[str] = []

        def walk(node: object) -> None:
            if isinstance(node, dict):
                for key, item in node.items():
                    if key == "filename" and isinstance(item, str):
                        found.append(item)
                    walk(item)
            elif isinstance(node, list):
                for item in node:
                    walk(item)
        walk(tree)
        return found
    return [v for k, v in parse_keyval(value) if v and (k == "filename" or k.endswith(".filename"))]

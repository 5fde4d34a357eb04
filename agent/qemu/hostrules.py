"""What a destination accepts of a source's QEMU argv: one rule for everything that names
a host resource, and a refusal for what has no rule.

A source is trusted to describe its VM, not to use the destination's host: its argv must
not make the destination QEMU read the destination's files, use its devices, open ports
or run programs. The rules here decide; `agent.qemu.destargv` applies them while it
rewrites the argv. Every refusal names the option, the value and the rule. An operator
widens the rules per agent in `agent.toml` `[accept]` (`Accept`); each widening that lets
something through is recorded in `HostRules.widened`, which the destination logs and
reports.

Device types are on an allow-list (common emulated devices; nothing that passes host
hardware, host files or vhost back ends through). A device property whose name says it
may name a host resource (`romfile`, `file`, `path`, `fd`, `host*`, `vhost*`, `x-*`,
`*dev` other than `netdev`/`chardev`) needs a rule; without one it is refused, as is any
other property whose value is an absolute path.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from agent.errors import UserError

# ---------------------------------------------------------------------------- the lists

DEVICES = frozenset({
    # virtio (PCI), without vhost, 9p (host directory) or input-host (host evdev)
    *(f"virtio-{kind}-pci{variant}"
      for kind in ("net", "blk", "scsi", "serial", "balloon", "rng")
      for variant in ("", "-transitional", "-non-transitional")),
    "virtio-keyboard-pci", "virtio-mouse-pci", "virtio-tablet-pci", "virtio-gpu-pci",
    "virtio-vga", "virtio-iommu-pci", "virtserialport", "virtconsole",
    # NICs
    "e1000", "e1000-82544gc", "e1000-82545em", "e1000e", "rtl8139", "vmxnet3", "ne2k_pci",
    "pcnet", "i82559er",
    # disk controllers and disks (no scsi-generic / scsi-block: host SCSI passthrough)
    "ide-hd", "ide-cd", "ahci", "ich9-ahci", "piix3-ide", "piix4-ide", "lsi53c895a",
    "megasas", "megasas-gen2", "mptsas1068", "am53c974", "dc390", "virtio-scsi-device",
    "scsi-hd", "scsi-cd", "nvme", "nvme-ns", "floppy",
    # USB controllers and emulated USB devices (no usb-host, usb-redir)
    "piix3-usb-uhci", "piix4-usb-uhci", "ich9-usb-uhci1", "ich9-usb-uhci2",
    "ich9-usb-uhci3", "ich9-usb-uhci4", "ich9-usb-uhci5", "ich9-usb-uhci6",
    "ich9-usb-ehci1", "ich9-usb-ehci2", "usb-ehci", "pci-ohci", "nec-usb-xhci", "qemu-xhci",
    "usb-tablet", "usb-kbd", "usb-mouse", "usb-storage", "usb-uas", "usb-hub", "usb-serial",
    # serial, debug and watchdog devices (their chardevs have their own rules)
    "isa-serial", "isa-parallel", "isa-debugcon", "isa-debug-exit", "pci-serial",
    "pci-serial-2x", "pci-serial-4x", "pvpanic", "pvpanic-pci", "i6300esb", "ib700",
    # display (qxl only without SPICE, which the destination never opens)
    "VGA", "cirrus-vga", "isa-cirrus-vga", "bochs-display", "secondary-vga", "qxl", "qxl-vga",
    "vmware-svga", "ramfb",
    # buses and bridges
    "pci-bridge", "pcie-root-port", "pcie-pci-bridge", "ioh3420", "x3130-upstream",
    "xio3130-downstream", "i82801b11-bridge", "pxb", "pxb-pcie", "intel-iommu",
    "vmcoreinfo",
    # generic loader: guest memory from a file, which must lie under an allowed root
    "loader",
})
DEVICE_ALIASES = {f"virtio-{kind}": f"virtio-{kind}-pci" for kind in (
    "net", "blk", "scsi", "serial", "balloon", "rng", "keyboard", "mouse", "tablet", "gpu")}
"""QEMU's short names of allowed devices (qdev's alias table); other aliases are refused."""
NIC_MODEL_ALIASES = {"virtio": "virtio-net-pci"}

HOST_PROPERTIES = frozenset({
    "file", "filename", "path", "fd", "fds", "vhostfd", "vhostfds", "sysfsdev", "script",
    "downscript", "helper", "ifname", "socket", "evdev", "dir", "fsdev", "memdev",
    "audiodev", "iommufd", "tls-creds", "tls-authz"})
HOST_PREFIXES = ("host", "vhost", "x-")
HOST_SUFFIXES = ("file", "path", "fd", "fds", "dev", "dir")
REFERENCES = frozenset({"netdev", "chardev", "chardev1", "chardev2", "chardev3", "chardev4",
                        "drive", "bus"})
"""Properties naming another option of the same argv (which is checked itself)."""

BLOCK_DRIVERS = frozenset({"file", "raw", "qcow2", "null-co", "null-aio"})
"""Block drivers that touch nothing but local files (and `null`): no network, no host
devices, no config files (blkdebug), no extent files (vmdk)."""
MAX_BACKING_DEPTH = 64

USER_NETDEV_KEYS = frozenset({
    "type", "id", "hostname", "restrict", "ipv4", "ipv6", "ip", "net", "host", "ipv6-net",
    "ipv6-host", "ipv6-prefix", "ipv6-prefixlen", "ipv6-dns", "dhcpstart", "dns",
    "dnssearch", "domainname", "tftp-server-name",
    # -nic only: the guest's NIC
    "model", "mac"})
"""QEMU 7.2 NetdevUserOptions that stay inside slirp (the guest's addresses and names)."""
USER_NETDEV_HOST_KEYS = {
    "hostfwd": "forwards a port of the destination host into the guest",
    "guestfwd": "connects the guest to a host service or program",
    "tftp": "serves a host directory over TFTP",
    "bootfile": "names a file of the TFTP root for the guest to boot",
    "smb": "runs smbd on the destination host, serving a host directory",
    "smbserver": "belongs to smb",
}
GUESTFWD_CMD = "guestfwd-cmd"
"""The [accept] netdev_user entry that lets a guestfwd run a program (cmd:)."""

CHARDEV_KEYS = {
    "null": frozenset(),
    "file": frozenset({"path", "append"}),
    "socket": frozenset({"path", "server", "wait", "telnet", "tn3270", "nodelay"}),
    "ringbuf": frozenset({"size"}),
    "memory": frozenset({"size"}),
}
CHARDEV_COMMON_KEYS = frozenset({"backend", "id", "logfile", "logappend", "mux"})
CHARDEV_REFUSED = {
    "host": "is a TCP socket (a host port)", "port": "is a TCP socket (a host port)",
    "to": "is a TCP socket (a host port)", "ipv4": "is a TCP socket (a host port)",
    "ipv6": "is a TCP socket (a host port)", "fd": "passes a host file descriptor",
    "websocket": "is a websocket listener", "tls-creds": "needs host TLS credentials",
    "tls-authz": "needs host TLS credentials", "abstract": "is an abstract host socket",
    "reconnect": "connects to a socket of the source host", "input-path": "reads a host file",
}

TRUE_WORDS = ("on", "yes", "true", "y")
DEFAULT_DATA_DIRS = (Path("/usr/share/qemu"), Path("/usr/share/seabios"),
                     Path("/usr/lib/ipxe/qemu"))
"""QEMU's firmware search path on Debian, if `qemu -L help` cannot be asked."""


# ---------------------------------------------------------------------------- config

@dataclass(frozen=True, slots=True)
class Accept:
    """What an operator lets through beyond the rules (agent.toml `[accept]`)."""

    devices: frozenset[str] = frozenset()      # more device types, e.g. "usb-host"
    properties: frozenset[str] = frozenset()   # "DRIVER.PROP" or "*.PROP", e.g. "usb-host.hostbus"
    drivers: frozenset[str] = frozenset()      # more block drivers, e.g. "nbd"
    netdev_user: frozenset[str] = frozenset()  # e.g. "hostfwd", "tftp", "guestfwd-cmd"

    KEYS = ("devices", "properties", "drivers", "netdev_user")

    @classmethod
    def from_table(cls, table: object, where: str) -> Accept:
        """The `[accept]` table of agent.toml, every key a list of strings."""
        if not isinstance(table, dict):
            raise UserError(f"{where}: [accept] must be a table")
        unknown = set(table) - set(cls.KEYS)
        if unknown:
            raise UserError(f"{where}: unknown [accept] settings {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(cls.KEYS)})")
        values: dict[str, frozenset[str]] = {}
        for key, items in table.items():
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise UserError(f"{where}: [accept] {key} must be a list of strings")
            values[key] = frozenset(items)
        extra = values.get("netdev_user", frozenset()) - set(USER_NETDEV_HOST_KEYS) - {
            GUESTFWD_CMD}
        if extra:
            raise UserError(f"{where}: [accept] netdev_user knows "
                            f"{', '.join([*USER_NETDEV_HOST_KEYS, GUESTFWD_CMD])}, "
                            f"not {', '.join(sorted(extra))}")
        return cls(**values)


# ---------------------------------------------------------------------------- files

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


@functools.lru_cache(maxsize=8)
def bundled_dirs(qemu_binary: str) -> tuple[Path, ...]:
    """Where this QEMU finds its own ROMs and firmware (`qemu -L help`)."""
    found = shutil.which(qemu_binary)
    if found is not None:
        try:
            done = subprocess.run([found, "-L", "help"], capture_output=True, text=True,
                                  timeout=10, check=False)
            dirs = tuple(Path(line).resolve() for line in done.stdout.splitlines()
                         if line.startswith("/"))
            if done.returncode == 0 and dirs:
                return dirs
        except (OSError, subprocess.SubprocessError):
            pass
    return DEFAULT_DATA_DIRS


def bool_value(value: str | None) -> bool:
    return (value or "").lower() in TRUE_WORDS


def opts_pairs(pairs: Iterable[tuple[str, str | None]]) -> list[tuple[str, str]]:
    """QemuOpts pairs as QEMU reads them: a bare `key` is key=on, a bare `nokey` key=off."""
    out = []
    for key, value in pairs:
        if value is None:
            out.append((key[2:], "off") if key.startswith("no") else (key, "on"))
        else:
            out.append((key, value))
    return out


def flatten_json(tree: object, prefix: str = "") -> list[tuple[str, str | None]]:
    """A JSON option as dotted key=value pairs, as QEMU flattens it (qdict_flatten);
    null values stay None."""
    if isinstance(tree, dict):
        out: list[tuple[str, str | None]] = []
        for key, item in tree.items():
            out += flatten_json(item, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
        return out
    if isinstance(tree, list):
        out = []
        for index, item in enumerate(tree):
            out += flatten_json(item, f"{prefix}.{index}" if prefix else str(index))
        return out
    if tree is None:
        return [(prefix, None)]
    return [(prefix, tree if isinstance(tree, str) else json.dumps(tree))]


# ---------------------------------------------------------------------------- the checker

@dataclass(slots=True)
class HostRules:
    """The destination's rules for one argv, and the widenings it used."""

    roots: tuple[Path, ...]
    accept: Accept = field(default_factory=Accept)
    data_dirs: tuple[Path, ...] = DEFAULT_DATA_DIRS
    widened: list[str] = field(default_factory=list)
    qemu_img: str = "qemu-img"
    flash_code: dict[Path, Path] = field(default_factory=dict)
    """UEFI code images this host's firmware descriptors name (resolved) -> the template
    of their variable store (agent.qemu.firmware): firmware as bundled as QEMU's own."""

    @staticmethod
    def refuse(option: str, value: str, reason: str) -> NoReturn:
        raise UserError(f"{option} {value!r} is refused by the destination: {reason}")

    def _widen(self, setting: str, what: str) -> None:
        note = f"[accept] {setting} lets through {what}"
        if note not in self.widened:
            self.widened.append(note)

    # -------------------------------------------------------------- files

    def file(self, option: str, value: str, what: str, path: str | None = None,
             rule: str = "a file QEMU opens must lie under an allowed path") -> None:
        """A file QEMU reads (`path`, default the whole value): it must resolve under an
        allowed root."""
        path = value if path is None else path
        if not path:
            self.refuse(option, value, f"{what} is empty")
        try:
            require_allowed(path, self.roots, what)
        except UserError as exc:
            self.refuse(option, value, f"{exc} (rule: {rule})")

    def firmware(self, option: str, value: str, what: str, given: str | None = None) -> str:
        """A ROM or firmware: a bare name of a file QEMU bundles (the destination's own
        copy, by absolute path, so QEMU's cwd never matters), a path under QEMU's data
        directories, a code image a firmware descriptor names, or under an allowed root;
        the value to use. `given`: the file, default the whole value."""
        full, value = value, value if given is None else given
        if "/" not in value and value not in ("", ".", ".."):
            for directory in self.data_dirs:
                candidate = directory / value
                if candidate.is_file() and is_under(candidate, self.data_dirs):
                    return str(candidate)
            self.refuse(option, full, f"{what} {value!r} is not a file this QEMU bundles "
                                      f"(looked in {', '.join(map(str, self.data_dirs))})")
        path = Path(value)
        if path.is_absolute() and is_under(path, self.data_dirs) and path.is_file():
            return value
        if path.is_absolute() and path.resolve() in self.flash_code:
            return value
        self.file(option, full, what, value, rule="a ROM or firmware is one QEMU bundles, "
                                                  "by name, or lies under an allowed path")
        return value

    # -------------------------------------------------------------- devices

    def device_type(self, option: str, value: str, driver: str) -> str:
        """The canonical type of an allowed device (aliases resolved)."""
        canonical = DEVICE_ALIASES.get(driver, driver)
        if canonical in DEVICES:
            return canonical
        if driver in self.accept.devices or canonical in self.accept.devices:
            self._widen("devices", f"device {driver}")
            return canonical
        self.refuse(option, value, f"device type {driver!r} is not on the destination's "
                                   f"allow-list (emulated devices only; no host devices, "
                                   f"vhost or vfio; widen with [accept] devices)")

    def device_property(self, option: str, value: str, driver: str, prop: str,
                        given: str | None) -> str | None:
        """One device (or -global) property; the value to use (a bundled ROM's path)."""
        if given is None:
            return None
        if prop == "romfile":
            # Empty: no ROM at all.
            return self.firmware(option, value, "romfile", given) if given else given
        if prop == "file" and driver == "loader":
            self.file(option, value, "loader file", given)
            return given
        widening = {f"{driver}.{prop}", f"*.{prop}"} & self.accept.properties
        if prop not in REFERENCES and (
                prop in HOST_PROPERTIES or prop.startswith(HOST_PREFIXES)
                or prop.endswith(HOST_SUFFIXES)):
            if widening:
                self._widen("properties", f"{driver}.{prop}={given}")
                return given
            self.refuse(option, value, f"property {driver}.{prop} may name a host resource "
                                       f"and has no rule (widen with [accept] properties)")
        if given.startswith("/") and not widening:
            self.refuse(option, value, f"property {driver}.{prop}={given} looks like a host "
                                       f"path and has no rule")
        return given

    def device(self, option: str, value: str, pairs: list[tuple[str, str | None]]) -> None:
        """-device in key=value form (QemuOpts pairs, rewritten in place)."""
        normal = opts_pairs(pairs)
        drivers = [v for k, v in normal if k == "driver"]
        if not drivers:
            self.refuse(option, value, "a device needs a driver")
        for driver in drivers:
            self.device_type(option, value, driver)
        driver = DEVICE_ALIASES.get(drivers[-1], drivers[-1])
        for index, (key, given) in enumerate(normal):
            if key in ("driver", "id"):
                continue
            if not key:
                self.refuse(option, value, "an empty property name (a stray comma)")
            used = self.device_property(option, value, driver, key, given)
            if used != given:
                pairs[index] = (key, used)

    def device_json(self, option: str, value: str) -> str:
        """-device in JSON form: the same rules; the JSON to use."""
        tree = _load_json(option, value)
        driver = tree.get("driver")
        if not isinstance(driver, str):
            self.refuse(option, value, "a device needs a driver")
        driver = self.device_type(option, value, driver)
        for key, item in list(tree.items()):
            if key in ("driver", "id"):
                continue
            if isinstance(item, (dict, list)):
                self.refuse(option, value, f"property {driver}.{key} has a nested value, "
                                           f"which no rule covers")
            given = item if isinstance(item, str) else json.dumps(item)
            used = self.device_property(option, value, driver, key, given)
            if used != given:
                tree[key] = used
        return json.dumps(tree)

    # -------------------------------------------------------------- block

    def block_driver(self, option: str, value: str, driver: str | None) -> None:
        if driver is None or driver in BLOCK_DRIVERS:
            return
        if driver in self.accept.drivers:
            self._widen("drivers", f"block driver {driver}")
            return
        self.refuse(option, value, f"block driver {driver!r} is not a plain local file format "
                                   f"({', '.join(sorted(BLOCK_DRIVERS))}; widen with "
                                   f"[accept] drivers)")

    def image_chain(self, option: str, value: str, path: str, fmt: str | None) -> None:
        """A disk the destination opens at the same path (shared storage): its whole
        backing chain must lie under allowed roots, in accepted formats. One level at a
        time (qemu-img info opens no backing file), so nothing outside is ever opened."""
        seen: set[str] = set()
        current: str | None = path
        while current is not None:
            self.file(option, value, "disk image" if current == path else "backing file",
                      current)
            if current in seen or len(seen) >= MAX_BACKING_DEPTH:
                self.refuse(option, value, f"the backing chain of {path} loops or is longer "
                                           f"than {MAX_BACKING_DEPTH}")
            seen.add(current)
            info = self._image_info(option, value, current, fmt)
            self.block_driver(option, value, str(info.get("format")))
            data_file = (info.get("format-specific", {}).get("data", {}) or {}).get("data-file")
            if data_file:
                self.refuse(option, value, f"image {current} has an external data file "
                                           f"{data_file!r}, which no rule covers")
            backing = info.get("full-backing-filename") or info.get("backing-filename")
            fmt = info.get("backing-filename-format")
            if backing is not None:
                if not os.path.isabs(backing):
                    self.refuse(option, value, f"image {current} has backing file "
                                               f"{backing!r}, not a local path")
            current = backing

    def _image_info(self, option: str, value: str, path: str,
                    fmt: str | None) -> dict[str, Any]:
        argv = [self.qemu_img, "info", "-U", "--output=json", *(("-f", fmt) if fmt else ()),
                path]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                  check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            self.refuse(option, value, f"cannot inspect disk image {path}: {exc}")
        if done.returncode != 0:
            self.refuse(option, value, f"cannot inspect disk image {path}: "
                                       f"{done.stderr.strip()}")
        try:
            info = json.loads(done.stdout)
        except json.JSONDecodeError:
            self.refuse(option, value, f"cannot inspect disk image {path}")
        if not isinstance(info, dict):
            self.refuse(option, value, f"cannot inspect disk image {path}")
        return info

    # -------------------------------------------------------------- networks

    def check_nic_model(self, option: str, value: str,
                        pairs: list[tuple[str, str | None]]) -> None:
        """-nic tap/bridge: the back end is the destination's own; the model must be a
        device type the destination accepts."""
        model = dict(pairs).get("model")
        if model:
            self.device_type(option, value, NIC_MODEL_ALIASES.get(model, model))

    def check_user_netdev(self, option: str, value: str,
                          pairs: list[tuple[str, str | None]]) -> None:
        """-netdev user / -nic user: slirp stays inside QEMU; whatever reaches the host
        (ports, directories, programs) needs [accept] netdev_user."""
        for key, given in opts_pairs(pairs):
            if key in USER_NETDEV_KEYS:
                if key == "model":
                    model = NIC_MODEL_ALIASES.get(given, given)
                    self.device_type(option, value, model)
                continue
            reason = USER_NETDEV_HOST_KEYS.get(key)
            if reason is None:
                self.refuse(option, value, f"user networking option {key!r} has no rule")
            if key not in self.accept.netdev_user:
                self.refuse(option, value, f"{key} {reason} (widen with [accept] "
                                           f"netdev_user)")
            if key in ("tftp", "smb"):
                self.file(option, value, f"{key} directory", given)
            if key == "guestfwd":
                target = given.split("-", 1)[1] if "-" in given else ""
                if target.startswith("cmd:"):
                    if GUESTFWD_CMD not in self.accept.netdev_user:
                        self.refuse(option, value, f"guestfwd {given!r} runs a program on "
                                                   f"the destination host (widen with "
                                                   f"[accept] netdev_user \"{GUESTFWD_CMD}\")")
                    self._widen("netdev_user", f"{key}={given} (a program)")
                    continue
                if not target.startswith("tcp:"):
                    self.refuse(option, value, f"guestfwd target {target!r} has no rule "
                                               f"(tcp: or, if accepted, cmd:)")
            self._widen("netdev_user", f"{key}={given}")

    # -------------------------------------------------------------- chardevs

    def chardev(self, option: str, value: str, pairs: list[tuple[str, str | None]]) -> None:
        """Which chardev back ends and keys the destination takes (their paths are then
        rewritten into its VM directory)."""
        normal = opts_pairs(pairs)
        backend = next((v for k, v in normal if k == "backend"), None) or ""
        if backend == "pipe":
            self.refuse(option, value, "a pipe chardev needs FIFOs made on the source host "
                                       "(use file or socket)")
        keys = CHARDEV_KEYS.get(backend)
        if keys is None:
            self.refuse(option, value, f"-chardev {backend} is not accepted by the destination "
                                       f"(accepted: {', '.join(sorted(CHARDEV_KEYS))})")
        for key, _given in normal:
            if key in CHARDEV_REFUSED:
                reason = CHARDEV_REFUSED[key]
                if key in ("host", "port", "to", "ipv4", "ipv6"):
                    reason += "; -chardev socket over TCP is host-specific and not accepted"
                self.refuse(option, value, f"{key}= {reason}")
            if key not in keys and key not in CHARDEV_COMMON_KEYS:
                self.refuse(option, value, f"chardev option {key!r} has no rule")
        if backend == "socket":
            if not any(k == "path" for k, _ in normal):
                self.refuse(option, value, "-chardev socket over TCP is host-specific and not "
                                           "accepted")
            server = [v for k, v in normal if k == "server"]
            if not server or not bool_value(server[-1]):
                self.refuse(option, value, "a client socket connects to a socket of the "
                                           "source host (only server sockets, which the "
                                           "destination makes in its VM directory)")


def _load_json(option: str, value: str) -> dict[str, Any]:
    try:
        tree = json.loads(value)
    except json.JSONDecodeError as exc:
        raise UserError(f"malformed {option} JSON: {exc}") from exc
    if not isinstance(tree, dict):
        raise UserError(f"malformed {option} JSON: not an object")
    return tree

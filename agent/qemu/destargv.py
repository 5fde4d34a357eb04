"""The destination's rewrite of a source's argv: checked by the rules of
`agent.qemu.hostrules`, with host resources replaced by the destination's own.

Guest-visible configuration is kept exactly (the device state that follows must match
it); RAM, monitors, serial and log files, the pidfile and chardev paths become the
destination's own, a copied disk's path its new path. What no rule accepts is refused
before anything is created on the destination.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import UserError
from agent.qemu import firmware
from agent.qemu.hostrules import (
    Accept,
    HostRules,
    bool_value,
    bundled_dirs,
    flatten_json,
    opts_pairs,
)
from agent.qemu.vmspec import (
    CHARDEV_PATH_KEYS,
    HOST_NETDEVS,
    NIC_GUEST_KEYS,
    OPTIONS,
    PLAIN_RAM_BLOCK,
    PORTABLE_NETDEVS,
    RAM_BACKEND_TYPE,
    RAM_BACKEND_TYPES,
    Option,
    Policy,
    VmSpec,
    format_keyval,
    keyval_get,
    keyval_set,
    memory_size,
    netdev_keys,
    parse_keyval,
    parse_size,
    ram_backend_of,
    read_opt_value,
    split_options,
)

__all__ = ["DestinationPaths", "DiskTarget", "destination_argv"]

SET_GROUPS = {"device": ("-device", "driver"), "drive": ("-drive", None),
              "netdev": ("-netdev", "type"), "chardev": ("-chardev", "backend")}
"""-set groups the destination applies (each to the option of that id, then checked)."""
NAME = re.compile(r"[A-Za-z0-9_.,+-]{1,63}")
GLOBAL_DOTTED = re.compile(r"([^.=]{1,63})\.([^=]{1,63})=(.*)", re.DOTALL)
"""QEMU's `-global DRIVER.PROP=VALUE` (sscanf "%63[^.=].%63[^=]="); VALUE is verbatim."""


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

    rules: HostRules
    paths: DestinationPaths
    disks: dict[str, DiskTarget] = field(default_factory=dict)   # source path -> target
    out: list[str] = field(default_factory=list)
    dropped_chardevs: set[str] = field(default_factory=set)
    ram_backend: str = ""          # id of the machine's RAM backend object
    serial_count: int = 0
    chardev_count: int = 0
    host_nics: dict[str, str] = field(default_factory=dict)   # NIC key -> this host's back end
    nic_keys: dict[int, str] = field(default_factory=dict)    # id(option) -> its NIC key
    flash_template: Path | None = None   # the variable template of the pflash code image
    vars_copies: list[tuple[Path, Path]] = field(default_factory=list)  # (template, target)


def destination_argv(spec: VmSpec, paths: DestinationPaths, roots: Sequence[Path],
                     qemu_binary: str, disks: dict[str, DiskTarget] | None = None, *,
                     accept: Accept | None = None, widened: list[str] | None = None,
                     data_dirs: Sequence[Path] | None = None,
                     host_nics: dict[str, str] | None = None,
                     flash_code: dict[Path, Path] | None = None,
                     vars_copies: list[tuple[Path, Path]] | None = None) -> list[str]:
    """The argv the destination runs for spec: checked, with host resources its own.

    `disks` maps a copied disk's source path to its target on this host; disks not in it
    are shared storage, used at the same path (and their backing chains checked).
    `host_nics` maps the key of each NIC on a host network (tap, bridge) to the back end
    this host gives it (`tap,fd=N`: agent.hostnet.attach).
    `accept` is the operator's widening of the rules; what it let through is appended to
    `widened`. `data_dirs`: where QEMU finds its bundled files (default: ask qemu_binary).
    `flash_code`: UEFI code images -> their variable templates (default: this host's
    firmware descriptors); the VM's writable pflash (its UEFI variables) becomes a file
    in the VM directory, and (template, that file) is appended to `vars_copies` for the
    caller to copy before QEMU starts (QEMU fills it from the stream at resume).
    """
    options = _apply_sets(split_options(spec.argv))
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
    rules = HostRules(roots=tuple(roots), accept=accept or Accept(),
                      data_dirs=tuple(data_dirs) if data_dirs is not None
                      else bundled_dirs(qemu_binary),
                      flash_code=dict(firmware.flash_images() if flash_code is None
                                      else flash_code))
    state = _Rewrite(rules=rules, paths=paths, disks=dict(disks or {}),
                     dropped_chardevs={c for c in mon_chardevs if c},
                     ram_backend=backend.id if backend is not None else "",
                     host_nics=dict(host_nics or {}),
                     nic_keys={id(opt): key for opt, key in netdev_keys(options)})
    for opt in options:
        _rewrite_option(opt, state)
    if widened is not None:
        widened += rules.widened
    if vars_copies is not None:
        vars_copies += state.vars_copies
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




def _host_nic_backend(option: str, key: str, pairs: list[tuple[str, str | None]],
                      host_nics: dict[str, str]) -> str:
    """A tap or bridge NIC's netdev rebuilt on this host's network: only the id (and for
    -nic the guest side: model, mac) survives; everything host-side is this host's own."""
    replacement = host_nics.get(key)
    if replacement is None:
        raise UserError(f"{option} {keyval_get(pairs, 'type')} (NIC {key or 'without id'}) "
                        f"has no network on this host: the source did not describe it")
    kept = [("id", key)] if option == "-netdev" or not key.startswith("nic:") else []
    if option == "-nic":
        kept += [(k, v) for k, v in pairs if k in NIC_GUEST_KEYS and v is not None]
    return ",".join([replacement, format_keyval(kept)]) if kept else replacement


def _apply_sets(options: list[Option]) -> list[Option]:
    """Options with each `-set GROUP.ID.PROP=VALUE` merged into the option it sets, as
    QEMU does before using them; the merged option is then checked like any other."""
    out = [o for o in options if o.name != "-set"]
    for opt in options:
        if opt.name != "-set":
            continue
        value = opt.value or ""
        head, eq, given = value.partition("=")
        parts = head.split(".", 2)
        if not eq or len(parts) != 3 or not all(NAME.fullmatch(p) for p in parts):
            HostRules.refuse("-set", value, "not GROUP.ID.PROPERTY=VALUE")
        group, ident, prop = parts
        if group not in SET_GROUPS:
            HostRules.refuse("-set", value, f"the destination applies -set to "
                                            f"{', '.join(SET_GROUPS)} only")
        name, implied = SET_GROUPS[group]
        found = [i for i, o in enumerate(out) if o.name == name and o.value is not None
                 and not o.value.startswith("{")
                 and keyval_get(parse_keyval(o.value, implied), "id") == ident]
        if not found:
            HostRules.refuse("-set", value, f"there is no {name} with id {ident!r} in "
                                            f"key=value form")
        target = out[found[-1]]
        merged = parse_keyval(target.value or "", implied) + [(prop, given)]
        out[found[-1]] = Option(name, format_keyval(merged))
    return out


def _rewrite_option(opt: Option, st: _Rewrite) -> None:
    policy = OPTIONS[opt.name]
    value = opt.value or ""
    rules = st.rules
    if policy in (Policy.FLAG, Policy.KEEP, Policy.MEMORY):
        if opt.name == "-k" and "/" in value:   # QEMU would open a path as the keymap
            rules.refuse(opt.name, value, "a keymap is one of QEMU's by name")
        st.out += opt.argv()
    elif policy in (Policy.DROP, Policy.DROP_FLAG, Policy.MON):
        return
    elif policy is Policy.PATH:
        rules.file(opt.name, value, f"{opt.name} file")
        st.out += opt.argv()
    elif policy is Policy.FIRMWARE:
        st.out += [opt.name, rules.firmware(opt.name, value, f"{opt.name} file")]
    elif policy is Policy.INITRD:
        rules.file(opt.name, value, "initrd")
        # Multiboot reads a comma-separated list of "FILE ARGS" modules (`,,` a comma).
        at = 0
        while at < len(value):
            module, at = read_opt_value(value, at)
            rules.file(opt.name, value, "initrd module", module.split(" ", 1)[0])
            at += 1
        st.out += opt.argv()
    elif policy is Policy.DEVICE:
        if value.startswith("{"):
            st.out += [opt.name, rules.device_json(opt.name, value)]
        else:
            props = parse_keyval(value, "driver")
            rules.device(opt.name, value, props)
            st.out += [opt.name, format_keyval(props)]
    elif policy is Policy.GLOBAL:
        st.out += [opt.name, _rewrite_global(value, rules)]
    elif policy is Policy.MACHINE:
        st.out += [opt.name, _rewrite_machine(opt.name, value, rules)]
    elif policy is Policy.BOOT:
        for key, given in opts_pairs(parse_keyval(value, "order")):
            if key == "splash":
                rules.file(opt.name, value, "boot splash", given)
        st.out += opt.argv()
    elif policy is Policy.DISPLAY:
        shown = opts_pairs(parse_keyval(value, "type"))
        if keyval_get(shown, "type") != "none" or len(shown) != 1:
            rules.refuse(opt.name, value, "a display is a host UI or listener (VNC, SPICE, "
                                          "D-Bus, GTK, ...): the destination runs -display none")
        st.out += opt.argv()
    elif policy is Policy.OBJECT:
        props = parse_keyval(value, "qom-type")
        qom_type = keyval_get(props, "qom-type")
        if qom_type not in RAM_BACKEND_TYPES or keyval_get(props, "id") != st.ram_backend:
            raise UserError(f"-object {qom_type} is not accepted by the destination (only "
                            f"the machine's RAM backend, one of {', '.join(RAM_BACKEND_TYPES)})")
        # Rebuilt from id and size alone: every other property (host NUMA nodes, hugetlb,
        # the source's path) is the source host's business.
        st.out += ["-object", _ram_object(st.ram_backend, parse_size(
            keyval_get(props, "size") or "0"), st.paths.ram_path)]
    elif policy is Policy.CHARDEV:
        # As QEMU reads them: a bare `logfile` is logfile=on, a file named "on".
        pairs: list[tuple[str, str | None]] = list(opts_pairs(parse_keyval(value, "backend")))
        if keyval_get(pairs, "id") in st.dropped_chardevs:
            return
        rules.chardev(opt.name, value, pairs)
        for key in CHARDEV_PATH_KEYS:
            if any(k == key for k, _ in pairs):
                st.chardev_count += 1
                keyval_set(pairs, key, str(st.paths.vm_dir / f"chardev{st.chardev_count}.{key}"))
        if keyval_get(pairs, "backend") == "socket":
            keyval_set(pairs, "wait", "off")   # a QEMU waiting for a client never starts
        st.out += ["-chardev", format_keyval(pairs)]
    elif policy is Policy.SERIAL:
        if value.startswith("file:") or value == "stdio":
            st.serial_count += 1
            suffix = "" if st.serial_count == 1 else f".{st.serial_count}"
            st.out += ["-serial", f"file:{st.paths.serial_log}{suffix}"]
        elif value in ("none", "null") or value.startswith("chardev:"):
            st.out += opt.argv()
        else:
            rules.refuse("-serial", value, "host-specific: the destination takes file: and "
                                           "stdio (into its VM directory), none, null and "
                                           "chardev:")
    elif policy is Policy.DRIVE:
        st.out += ["-drive", _rewrite_drive(value, st)]
    elif policy is Policy.BLOCKDEV:
        st.out += ["-blockdev", _rewrite_blockdev(value, st)]
    elif policy is Policy.NETDEV:
        pairs = parse_keyval(value, "type")
        backend = keyval_get(pairs, "type")   # QEMU uses the last type= given
        if len({v for k, v in pairs if k == "type"}) == 1 and backend in HOST_NETDEVS:
            if opt.name == "-nic":
                rules.check_nic_model(opt.name, value, pairs)
            st.out += [opt.name, _host_nic_backend(opt.name, st.nic_keys.get(id(opt), ""),
                                                   pairs, st.host_nics)]
            return
        if backend not in PORTABLE_NETDEVS or len({v for k, v in pairs if k == "type"}) != 1:
            raise UserError(f"{opt.name} {backend} is host-specific and not accepted "
                            f"(accepted: {', '.join(sorted(PORTABLE_NETDEVS))}, and "
                            f"{', '.join(HOST_NETDEVS)} NICs, put on the destination's "
                            f"networks)")
        if backend == "user":
            rules.check_user_netdev(opt.name, value, pairs)
        st.out += opt.argv()
    elif policy is Policy.SET:
        raise AssertionError("-set is merged before the rewrite")


def _rewrite_global(value: str, rules: HostRules) -> str:
    """-global in either form, its property checked as a -device property would be."""
    dotted = GLOBAL_DOTTED.fullmatch(value)
    if dotted is not None:
        driver, prop, given = dotted.groups()
    else:
        pairs = opts_pairs(parse_keyval(value))
        keys = [k for k, _ in pairs]
        if sorted(keys) != ["driver", "property", "value"]:
            rules.refuse("-global", value, "not DRIVER.PROPERTY=VALUE nor "
                                           "driver=,property=,value=")
        driver, prop, given = (keyval_get(pairs, k) or "" for k in ("driver", "property",
                                                                     "value"))
    if not NAME.fullmatch(driver) or not re.fullmatch(r"[A-Za-z0-9_-]{1,63}", prop):
        rules.refuse("-global", value, "a driver or property name QEMU does not have")
    used = rules.device_property("-global", value, driver, prop, given)
    if used == given:
        return value
    return format_keyval([("driver", driver), ("property", prop), ("value", used)])


def _rewrite_machine(name: str, value: str, rules: HostRules) -> str:
    """-machine: its file properties checked (and firmware= resolved like -bios)."""
    pairs = parse_keyval(value, "type")
    changed = False
    for index, (key, given) in enumerate(pairs):
        if given is None:
            continue
        if key in ("kernel", "initrd", "dtb"):
            rules.file(name, value, f"machine {key}", given)
        elif key == "firmware":
            used = rules.firmware(name, value, "machine firmware", given)
            if used != given:
                pairs[index], changed = (key, used), True
        elif key == "dumpdtb":
            rules.refuse(name, value, "dumpdtb writes a file on the destination host")
        elif given.startswith("/"):
            rules.refuse(name, value, f"machine property {key}={given} looks like a host path "
                                      f"and has no rule")
    return format_keyval(pairs) if changed else value


def _ram_object(backend_id: str, size: int, ram_path: Path) -> str:
    """The destination's RAM: a shared file the agent writes pages into (x-ignore-shared)."""
    return format_keyval([("qom-type", RAM_BACKEND_TYPE), ("id", backend_id),
                          ("size", str(size)), ("mem-path", str(ram_path)), ("share", "on")])


def _check_block_node(option: str, value: str, flat: list[tuple[str, str | None]],
                      st: _Rewrite, top_file: bool) -> None:
    """Block drivers and image files of one -drive or -blockdev (flattened, nested nodes
    included). `top_file`: a top-level `file` is a filename (-drive), not a node."""
    for key, given in flat:
        if key.rsplit(".", 1)[-1] == "driver" or (key == "format" and top_file):
            st.rules.block_driver(option, value, given)
    for key, given in flat:   # drivers first: no image is inspected for a refused one
        if given is None:
            continue
        if key.rsplit(".", 1)[-1] == "filename" or (key == "file" and top_file):
            target = st.disks.get(given)
            if target is not None:
                st.rules.file(option, value, "disk", target.path)
            else:
                fmt = keyval_get(flat, "format") if key == "file" else None
                st.rules.image_chain(option, value, given, fmt)


PFLASH_KEYS = frozenset({"if", "file", "format", "unit", "readonly"})


def _rewrite_pflash(value: str, pairs: list[tuple[str, str | None]], st: _Rewrite) -> str:
    """A UEFI flash drive: read-only, the firmware's code (bundled, like a ROM); writable,
    the VM's variable store, which is per-VM state: a file of this VM directory, copied
    from the template this host pairs with the code image (QEMU writes the source's
    content into it when the guest resumes)."""
    for key, _given in pairs:
        if key not in PFLASH_KEYS:
            st.rules.refuse("-drive", value, f"pflash drive option {key!r} has no rule "
                                             f"(known: {', '.join(sorted(PFLASH_KEYS))})")
    st.rules.block_driver("-drive", value, keyval_get(pairs, "format") or "raw")
    file = keyval_get(pairs, "file")
    if not file:
        st.rules.refuse("-drive", value, "a pflash drive without a file")
    if bool_value(keyval_get(pairs, "readonly")):
        used = st.rules.firmware("-drive", value, "UEFI code image", file)
        keyval_set(pairs, "file", used)
        st.flash_template = st.rules.flash_code.get(Path(used).resolve())
        return format_keyval(pairs)
    if st.flash_template is None:
        st.rules.refuse("-drive", value, "a writable pflash drive (UEFI variables) needs a "
                                         "read-only code image before it that this host's "
                                         "firmware descriptors pair with a variable template "
                                         f"(install Debian's {firmware.PACKAGE} package)")
    if st.vars_copies:
        st.rules.refuse("-drive", value, "a second writable pflash drive")
    target = st.paths.vm_dir / firmware.VARS_FILE
    st.vars_copies.append((st.flash_template, target))
    keyval_set(pairs, "file", str(target))
    return format_keyval(pairs)


def _rewrite_drive(value: str, st: _Rewrite) -> str:
    """A -drive checked (drivers, image chains) and pointed at a copied disk's target."""
    pairs: list[tuple[str, str | None]] = list(opts_pairs(parse_keyval(value)))
    if keyval_get(pairs, "if") == "pflash":
        return _rewrite_pflash(value, pairs, st)
    file = keyval_get(pairs, "file")
    target = st.disks.get(file or "")
    if target is not None:
        # The destination made this image itself: only its path is checked.
        st.rules.file("-drive", value, "disk", target.path)
        checked = [(k, v) for k, v in pairs if k != "file"]
        _check_block_node("-drive", value, checked, st, top_file=True)
        keyval_set(pairs, "file", target.path)
        keyval_set(pairs, "format", target.format)
    else:
        _check_block_node("-drive", value, pairs, st, top_file=True)
    return format_keyval(pairs)


def _rewrite_blockdev(value: str, st: _Rewrite) -> str:
    """A -blockdev (key=value or JSON) checked like -drive, copied disks' filenames
    replaced."""
    if value.startswith("{"):
        try:
            tree = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"malformed -blockdev JSON: {exc}") from exc
        if not isinstance(tree, dict):
            raise UserError("malformed -blockdev JSON: not an object")
        flat = flatten_json(tree)
        _check_block_node("-blockdev", value, flat, st, top_file=False)
        _redirect_json(tree, st)
        return json.dumps(tree)
    pairs = parse_keyval(value)
    for key, given in pairs:
        if given is None:
            st.rules.refuse("-blockdev", value, f"{key or 'an empty key'} has no value "
                                                f"(-blockdev has no flags)")
    _check_block_node("-blockdev", value, pairs, st, top_file=False)
    for key, given in list(pairs):
        filename = given or ""
        if filename and (key == "filename" or key.endswith(".filename")):
            target = st.disks.get(filename)
            if target is not None and target.converts:
                raise UserError(f"disk {filename} is a -blockdev: its format cannot be "
                                f"converted on the way (--disk-format works with -drive)")
            if target is not None:
                keyval_set(pairs, key, target.path)
    return format_keyval(pairs)


def _redirect_json(node: object, st: _Rewrite) -> None:
    """Copied disks' filenames in a JSON -blockdev tree replaced by their targets."""
    if isinstance(node, dict):
        for key, item in node.items():
            if key == "filename" and isinstance(item, str) and item in st.disks:
                target = st.disks[item]
                if target.converts:
                    raise UserError(f"disk {item} is a -blockdev: its format cannot be "
                                    f"converted on the way (--disk-format works with -drive)")
                node[key] = target.path
            else:
                _redirect_json(item, st)
    elif isinstance(node, list):
        for item in node:
            _redirect_json(item, st)

"""A VM's NICs as the argv and QMP show them, and the networks they are on.

Only NICs with a host side (`tap`, `bridge` netdevs) are on networks; `user`, `hubport`
and `none` back ends need nothing of the host and travel with the argv. A NIC is named
by its key (the netdev id, or `nic:N` for the N-th `-nic` without an id), which both
agents compute from the same argv.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.errors import QemuError, UserError
from agent.hostnet import devices
from agent.hostnet.attach import NicRequest
from agent.hostnet.networks import Network, network_of_bridge
from agent.qemu import qmp as qmp_mod
from agent.qemu.vmspec import (
    HOST_NETDEVS,
    NicSpec,
    Option,
    keyval_get,
    netdev_keys,
    parse_keyval,
)

DEFAULT_BRIDGE = "br0"     # -netdev bridge without br= (qemu-bridge-helper's default)
MAC = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
PERIPHERALS = ("/machine/peripheral", "/machine/peripheral-anon")


@dataclass(frozen=True, slots=True)
class ArgvNic:
    """One host-backed NIC as the argv gives it."""

    key: str
    option: str                        # -netdev or -nic
    backend: str                       # tap or bridge
    pairs: tuple[tuple[str, str | None], ...]
    model: str = ""
    mac: str = ""

    def bridge(self, pid: int) -> str | None:
        """The source host's bridge this NIC is on, as far as the kernel tells."""
        if self.backend == "bridge":
            return keyval_get(self.pairs, "br") or DEFAULT_BRIDGE
        ifname = keyval_get(self.pairs, "ifname")
        fd = keyval_get(self.pairs, "fd")
        if ifname is None and fd is not None and fd.isdigit():
            ifname = devices.tap_of_fd(pid, int(fd))
        return devices.master_of(ifname) if ifname else None


NIC_OPTIONS = ("-netdev", "-nic", "-device")


def netdev_options(args: Sequence[str]) -> list[Option]:
    """The -netdev, -nic and -device options of a source argv (binary excluded), read
    leniently: the source describes its NICs whatever else its argv holds (the destination
    judges the rest)."""
    found = []
    for i, raw in enumerate(args[:-1]):
        name = "-" + raw.lstrip("-") if raw.startswith("-") else ""
        if name in NIC_OPTIONS:
            found.append(Option(name, args[i + 1]))
    return found


def argv_nics(options: Sequence[Option]) -> list[ArgvNic]:
    """The host-backed NICs of an argv, with the model and MAC the argv names."""
    devices_by_netdev = _nic_devices(options)
    found = []
    for opt, key in netdev_keys(options):
        pairs = parse_keyval(opt.value or "", "type")
        backend = pairs[0][1] if pairs else ""
        if backend not in HOST_NETDEVS:
            continue
        if opt.name == "-nic":
            model, mac = keyval_get(pairs, "model") or "", keyval_get(pairs, "mac") or ""
        else:
            model, mac = devices_by_netdev.get(key, ("", ""))
        found.append(ArgvNic(key, opt.name, str(backend), tuple(pairs), model, mac.lower()))
    return found


def _nic_devices(options: Sequence[Option]) -> dict[str, tuple[str, str]]:
    """netdev id -> (driver, mac) of each -device that names a netdev."""
    out: dict[str, tuple[str, str]] = {}
    for opt in options:
        if opt.name != "-device" or not opt.value:
            continue
        if opt.value.lstrip().startswith("{"):
            try:
                props = json.loads(opt.value)
            except json.JSONDecodeError:
                continue
            if isinstance(props, dict) and isinstance(props.get("netdev"), str):
                out[props["netdev"]] = (str(props.get("driver", "")), str(props.get("mac", "")))
            continue
        pairs = parse_keyval(opt.value, "driver")
        netdev = keyval_get(pairs, "netdev")
        if netdev:
            out[netdev] = (keyval_get(pairs, "driver") or "", keyval_get(pairs, "mac") or "")
    return out


async def guest_macs(q: qmp_mod.Qmp) -> dict[str, str]:
    """netdev id -> the MAC its NIC has now, from QOM (what QEMU assigned when the argv
    named none)."""
    macs: dict[str, str] = {}
    for container in PERIPHERALS:
        try:
            children = await q.execute("qom-list", {"path": container})
        except QemuError:
            continue
        for child in children:
            if not str(child.get("type", "")).startswith("child<"):
                continue
            path = f"{container}/{child['name']}"
            try:
                netdev = await q.execute("qom-get", {"path": path, "property": "netdev"})
                mac = await q.execute("qom-get", {"path": path, "property": "mac"})
            except QemuError:
                continue      # not a NIC
            if netdev:
                macs[str(netdev)] = str(mac).lower()
    return macs


def parse_net_map(entries: Sequence[str]) -> dict[str, str]:
    """--net-map SRC=NETWORK entries (SRC: a NIC's netdev id, its bridge or its network)."""
    out: dict[str, str] = {}
    for entry in entries:
        src, sep, network = entry.partition("=")
        if not sep or not src or not network:
            raise UserError(f"--net-map {entry!r}: use SRC=NETWORK (SRC a NIC's netdev id, "
                            f"the bridge it is on, or its network on this host)")
        out[src] = network
    return out


def describe_nics(options: Sequence[Option], pid: int, macs: Mapping[str, str],
                  recorded: Mapping[str, str], net_map: Mapping[str, str],
                  networks: Mapping[str, Network]) -> tuple[NicSpec, ...]:
    """Each host-backed NIC with the network the destination is to put it on.

    The network is, in this order: what --net-map gives for its netdev id, its bridge or
    its network here; the network ferry recorded for it (VMs ferry started or received);
    the network of this host whose bridge it is on; else its bridge's name."""
    specs = []
    used: set[str] = set()
    for nic in argv_nics(options):
        bridge = nic.bridge(pid)
        here = recorded.get(nic.key) or (
            found.name if bridge and (found := network_of_bridge(networks, bridge)) else None)
        network = None
        for candidate in (nic.key, bridge, here):
            if candidate and candidate in net_map:
                network = net_map[candidate]
                used.add(candidate)
                break
        network = network or here or bridge
        if not network:
            raise UserError(f"NIC {nic.key} ({nic.backend}) is on no bridge ferry can see; "
                            f"name its network with --net-map {nic.key}=NETWORK")
        mac = nic.mac or macs.get(nic.key, "")
        if mac and not MAC.fullmatch(mac):
            raise UserError(f"NIC {nic.key}: {mac!r} is not a MAC address")
        specs.append(NicSpec(key=nic.key, network=network, mac=mac, model=nic.model))
    unused = set(net_map) - used
    if unused:
        have = ", ".join(f"{s.key} (network {s.network})" for s in specs) or "none"
        raise UserError(f"--net-map {', '.join(sorted(unused))}: no such NIC, bridge or "
                        f"network on this VM (its host-backed NICs: {have})")
    return tuple(specs)


# ---------------------------------------------------------------------------- new NICs

NIC_MODELS = ("virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3")
DEFAULT_MODEL = "virtio-net-pci"
QEMU_OUI = "52:54:00"


@dataclass(frozen=True, slots=True)
class NewNic:
    """A NIC `ferry vm start --nic` adds: where it goes and what the guest sees."""

    request: NicRequest
    model: str


def parse_nic_option(text: str, index: int) -> NewNic:
    """`NETWORK[,mac=M][,model=D]` for NIC number index (netdev id netINDEX)."""
    pairs = parse_keyval(text, "network")
    network = keyval_get(pairs, "network") or ""
    unknown = {k for k, _ in pairs} - {"network", "mac", "model"}
    if not network or unknown:
        raise UserError(f"--nic {text!r}: use NETWORK[,mac=MAC][,model=MODEL]")
    model = keyval_get(pairs, "model") or DEFAULT_MODEL
    if model not in NIC_MODELS:
        raise UserError(f"--nic {text!r}: model {model!r} is not one of {', '.join(NIC_MODELS)}")
    mac = (keyval_get(pairs, "mac") or random_mac()).lower()
    if not MAC.fullmatch(mac) or int(mac[:2], 16) & 1:
        raise UserError(f"--nic {text!r}: {mac!r} is not a unicast MAC address")
    return NewNic(NicRequest(key=f"net{index}", network=network, mac=mac), model)


def random_mac() -> str:
    return QEMU_OUI + "".join(f":{b:02x}" for b in secrets.token_bytes(3))


def nic_arguments(nics: Sequence[NewNic], backends: Mapping[str, str]) -> list[str]:
    """-netdev and -device options for new NICs, each on the back end its network gave."""
    args: list[str] = []
    for nic in nics:
        key = nic.request.key
        args += ["-netdev", f"{backends[key]},id={key}",
                 "-device", f"{nic.model},netdev={key},mac={nic.request.mac},id=nic-{key}"]
    return args

"""Tap and macvtap devices for guest NICs, and what the kernel tells about existing ones.

A tap ferry creates is not persistent: QEMU gets its file descriptor and the agent closes
its own copy, so the kernel removes the tap when QEMU exits, however it exits (an agent
that crashed included). A macvtap is a link of its own and outlives its descriptor: it is
deleted explicitly (rollback, the VM's exit, the agent's start).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.errors import LocalError, UserError
from agent.hostnet.networks import Network, NetworkKind

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000      # QEMU then offers virtio's offloads to the guest
IFNAMSIZ = 16
PREFIX = "fy"
"""Every device ferry creates is named fy + 8 hex digits + its NIC's number."""
SYS_NET = Path("/sys/class/net")
IP_TIMEOUT_S = 10.0


@dataclass
class HostNic:
    """One device ferry created for a guest NIC, and the descriptor QEMU is to get."""

    ifname: str
    kind: NetworkKind              # of the network it is on
    fd: int = -1

    def close_fd(self) -> None:
        """Drop our descriptor (QEMU holds its own from here on)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Close the descriptor; a macvtap link is also deleted (a tap goes with its
        last descriptor)."""
        self.close_fd()
        if self.kind is NetworkKind.MACVTAP:
            delete_link(self.ifname)


def ip(*args: str) -> str:
    """Run `ip ARGS`; its stdout, or a LocalError with what ip said."""
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True,
                              timeout=IP_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise LocalError(f"cannot run ip {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise LocalError(f"ip {' '.join(args)} failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def device_name(tag: str, index: int) -> str:
    """fy + tag + index, within IFNAMSIZ."""
    name = f"{PREFIX}{tag}{index}"
    if len(name) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} too long")
    return name


def new_tag() -> str:
    return secrets.token_hex(4)


def check_network(network: Network) -> None:
    """Refuse a network whose host device is missing here, before anything is created."""
    if network.kind is NetworkKind.NONE:
        return
    device = SYS_NET / network.device
    if not device.exists():
        raise UserError(f"network {network.name}: {network.kind.value} device "
                        f"{network.device!r} does not exist on this host")
    if network.kind is NetworkKind.BRIDGE and not (device / "bridge").is_dir():
        raise UserError(f"network {network.name}: {network.device!r} is not a Linux bridge")


def create(network: Network, ifname: str, mac: str) -> HostNic:
    """The host side of one NIC on network. A `none` network's NIC gets a tap on nothing,
    left down: the same kind of back end as a bridged one (virtio-net's offloads, part of
    its migrated state, depend on it), reaching nothing."""
    check_network(network)
    if network.kind is NetworkKind.MACVTAP:
        return _create_macvtap(ifname, network.device, mac)
    return _create_tap(ifname, network.device if network.kind is NetworkKind.BRIDGE else None)


def _create_tap(ifname: str, bridge: str | None) -> HostNic:
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalError(f"cannot open {TUN_DEVICE} for a tap: {exc.strerror}") from exc
    nic = HostNic(ifname, NetworkKind.BRIDGE, fd)
    try:
        request = struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, TUNSETIFF, request)
        except OSError as exc:
            raise LocalError(f"cannot create tap {ifname}: {exc.strerror} (the agent needs "
                             f"CAP_NET_ADMIN)") from exc
        if bridge is not None:
            ip("link", "set", "dev", ifname, "master", bridge)
            ip("link", "set", "dev", ifname, "up")
    except BaseException:
        nic.close_fd()   # the tap goes with it
        raise
    return nic


def _create_macvtap(ifname: str, parent: str, mac: str) -> HostNic:
    ip("link", "add", "link", parent, "name", ifname, "type", "macvtap", "mode", "bridge")
    nic = HostNic(ifname, NetworkKind.MACVTAP)
    try:
        ip("link", "set", "dev", ifname, "address", mac, "up")
        nic.fd = _open_macvtap(ifname)
    except BaseException:
        nic.remove()
        raise
    return nic


def _open_macvtap(ifname: str) -> int:
    """The character device of a macvtap (/dev/tapIFINDEX), made if no udev made it."""
    ifindex = int((SYS_NET / ifname / "ifindex").read_text())
    node = Path(f"/dev/tap{ifindex}")
    made = False
    if not node.exists():
        dev = SYS_NET / ifname / "macvtap" / f"tap{ifindex}" / "dev"
        major, minor = dev.read_text().split(":")
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(int(major), int(minor)))
        made = True
    try:
        return os.open(node, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalError(f"cannot open {node} for macvtap {ifname}: {exc.strerror}") from exc
    finally:
        if made:
            node.unlink(missing_ok=True)   # the descriptor is all QEMU needs


def delete_link(ifname: str) -> None:
    """Delete a link if it still exists."""
    if (SYS_NET / ifname).exists():
        with contextlib.suppress(LocalError):
            ip("link", "del", "dev", ifname)


def exists(ifname: str) -> bool:
    return (SYS_NET / ifname).exists()


def ferry_devices() -> list[str]:
    """Every interface on this host named as ferry names its devices."""
    try:
        names = os.listdir(SYS_NET)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(PREFIX) and len(n) > len(PREFIX) + 8)


# ---------------------------------------------------------------------------- discovery

def master_of(ifname: str) -> str | None:
    """The bridge an interface is enslaved to, if any."""
    link = SYS_NET / ifname / "master"
    with contextlib.suppress(OSError):
        return os.path.basename(os.readlink(link))
    return None


def tap_of_fd(pid: int, fd: int) -> str | None:
    """The tap interface behind descriptor fd of process pid (its fdinfo's `iff:`)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("iff:"):
                return line.split(":", 1)[1].strip() or None
    return None

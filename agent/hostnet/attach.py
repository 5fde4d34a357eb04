"""The host side of one VM's NICs: checked against this host's networks before anything
is made, then created, handed to QEMU, and removed with the VM."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.errors import FerryError
from agent.hostnet import devices
from agent.hostnet.networks import Network, NetworkKind, network_named


@dataclass(frozen=True, slots=True)
class NicRequest:
    """One NIC to put on a network: its key (netdev id), network name and MAC."""

    key: str
    network: str
    mac: str = ""


@dataclass
class NicAttachment:
    """What this host does for one VM's NICs."""

    planned: list[tuple[NicRequest, Network]]
    tag: str = field(default_factory=devices.new_tag)
    created: dict[str, devices.HostNic] = field(default_factory=dict)   # key -> device

    def placeholders(self) -> dict[str, str]:
        """The back ends, with descriptors not yet opened: for checking an argv early."""
        return {request.key: "tap,fd=0" for request, _ in self.planned}

    def create(self) -> dict[str, str]:
        """Create every device; the back end each NIC key gets (descriptors inherited by
        QEMU through pass_fds)."""
        backends = {}
        try:
            for index, (request, network) in enumerate(self.planned):
                nic = devices.create(network, devices.device_name(self.tag, index),
                                     request.mac)
                self.created[request.key] = nic
                backends[request.key] = f"tap,fd={nic.fd}"
        except BaseException:
            self.remove()
            raise
        return backends

    def outliving_names(self) -> list[str]:
        """Names of the devices that will outlive QEMU (macvtaps), known before they
        exist: journaled first, so a crash cannot leave one unnamed."""
        return [devices.device_name(self.tag, i) for i, (_, n) in enumerate(self.planned)
                if n.kind is NetworkKind.MACVTAP]

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return tuple(nic.fd for nic in self.created.values() if nic.fd >= 0)

    def handed_over(self) -> None:
        """QEMU has its descriptors: ours go, so the taps go with QEMU."""
        for nic in self.created.values():
            nic.close_fd()

    def remove(self) -> None:
        """Remove every device made (a tap whose QEMU still runs lives until it exits)."""
        for nic in self.created.values():
            with contextlib.suppress(FerryError, OSError):
                nic.remove()
        self.created.clear()

    def records(self) -> list[dict[str, str]]:
        """What a VM record keeps of each NIC: network, MAC, and the device made for it."""
        out = []
        for request, network in self.planned:
            nic = self.created.get(request.key)
            out.append({"key": request.key, "network": network.name, "mac": request.mac,
                        "kind": network.kind.value, "ifname": nic.ifname if nic else ""})
        return out


def plan(requests: Sequence[NicRequest], networks: Mapping[str, Network]) -> NicAttachment:
    """Refuse a NIC whose network this host lacks (naming the networks it has) or whose
    device is missing; nothing is created yet."""
    planned = []
    for request in requests:
        network = network_named(networks, request.network, f"NIC {request.key}")
        devices.check_network(network)
        planned.append((request, network))
    return NicAttachment(planned)


def remove_recorded(nics: Sequence[Mapping[str, str]]) -> None:
    """Delete the devices a VM record lists that outlive QEMU (macvtaps)."""
    for nic in nics:
        if nic.get("kind") == NetworkKind.MACVTAP.value and nic.get("ifname"):
            devices.delete_link(nic["ifname"])

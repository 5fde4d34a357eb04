"""The networks an agent offers its VMs (`[networks.NAME]` in agent.toml).

A network names the host side a guest NIC is put on: a Linux bridge (a tap on it), a
parent device (a macvtap on it, bridge mode), or `none` (the NIC stays in the guest but
reaches nothing). Two agents agree on a VM's networks by name; each maps the name to its
own host's devices.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import UserError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
# Linux interface names: at most 15 bytes, no '/', no whitespace.
IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}")


class NetworkKind(enum.Enum):
    BRIDGE = "bridge"      # a tap per NIC, enslaved to the bridge
    MACVTAP = "macvtap"    # a macvtap per NIC on a parent device (bridge mode)
    NONE = "none"          # no host side: the NIC is disconnected


@dataclass(frozen=True, slots=True)
class Network:
    """One network of this host."""

    name: str
    kind: NetworkKind
    device: str = ""       # the bridge, or the macvtap's parent; "" for none

    def describe(self) -> str:
        return f"{self.name} ({self.kind.value}{' ' + self.device if self.device else ''})"


def parse_networks(table: Any, where: str) -> dict[str, Network]:
    """`[networks.NAME]` tables: each has exactly one of bridge = "BR", macvtap = "DEV",
    or type = "none"."""
    if not isinstance(table, Mapping):
        raise UserError(f"{where}: [networks] must be a table of [networks.NAME] tables")
    networks: dict[str, Network] = {}
    for name, body in table.items():
        if not NAME.fullmatch(name):
            raise UserError(f"{where}: network name {name!r}: use up to 32 letters, digits, "
                            f"'_', '.', '-'")
        if not isinstance(body, Mapping):
            raise UserError(f"{where}: [networks.{name}] must be a table")
        unknown = set(body) - {"bridge", "macvtap", "type"}
        if unknown:
            raise UserError(f"{where}: [networks.{name}]: unknown keys "
                            f"{', '.join(sorted(unknown))} (use bridge, macvtap or type)")
        given = [k for k in ("bridge", "macvtap") if k in body]
        if len(given) > 1:
            raise UserError(f"{where}: [networks.{name}]: give one of bridge or macvtap, "
                            f"not both")
        kind_text = str(body.get("type", given[0] if len(given) == 1 else ""))
        try:
            kind = NetworkKind(kind_text)
        except ValueError:
            raise UserError(f"{where}: [networks.{name}] needs bridge = \"BRIDGE\", "
                            f"macvtap = \"DEVICE\" or type = \"none\"") from None
        device = str(body.get(kind.value, "")) if kind is not NetworkKind.NONE else ""
        if (kind is NetworkKind.NONE and given) or (
                kind is not NetworkKind.NONE and not IFNAME.fullmatch(device)):
            raise UserError(f"{where}: [networks.{name}]: give one of bridge = \"BRIDGE\", "
                            f"macvtap = \"DEVICE\" (a Linux interface name) or "
                            f"type = \"none\"")
        networks[name] = Network(name, kind, device)
    return networks


def network_named(networks: Mapping[str, Network], name: str, what: str) -> Network:
    """The network called name, or a UserError naming the networks this host has."""
    found = networks.get(name)
    if found is None:
        have = ", ".join(n.describe() for n in networks.values()) or "none configured"
        raise UserError(f"{what} is on network {name!r}, which this host does not have "
                        f"(its networks: {have}; add [networks.{name}] to agent.toml, or "
                        f"map it with --net-map)")
    return found


def network_of_bridge(networks: Mapping[str, Network], bridge: str) -> Network | None:
    """The network whose host side is that bridge, if one is configured."""
    for network in networks.values():
        if network.kind is NetworkKind.BRIDGE and network.device == bridge:
            return network
    return None

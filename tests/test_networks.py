"""Networks without QEMU: config tables, a VM's NICs and the networks they map to, the
destination's rebuilt back ends, `ferry vm start --nic`."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import UserError
from agent.hostnet import attach, devices
from agent.hostnet.networks import Network, NetworkKind, parse_networks
from agent.qemu import nics
from agent.qemu.destargv import DestinationPaths, destination_argv
from agent.qemu.vmspec import NicSpec, VmSpec, split_options
from agent.state.config import load_config

LAN = {"lan": Network("lan", NetworkKind.BRIDGE, "br-a")}


def test_networks_table_parses_each_kind() -> None:
    nets = parse_networks({"lan": {"bridge": "br0"}, "dmz": {"macvtap": "eth1"},
                           "off": {"type": "none"}}, "agent.toml")
    assert nets["lan"] == Network("lan", NetworkKind.BRIDGE, "br0")
    assert nets["dmz"] == Network("dmz", NetworkKind.MACVTAP, "eth1")
    assert nets["off"] == Network("off", NetworkKind.NONE, "")


@pytest.mark.parametrize("table, message", [
    ({"lan": {}}, "needs bridge"),
    ({"lan": {"bridge": "br0", "macvtap": "eth0"}}, "give one of"),
    ({"lan": {"bridge": "no/slash"}}, "Linux interface name"),
    ({"lan": {"bridge": "x" * 16}}, "Linux interface name"),
    ({"lan": {"type": "none", "bridge": "br0"}}, "give one of"),
    ({"lan": {"bridge": "br0", "mtu": 9000}}, "unknown keys mtu"),
    ({"bad name": {"bridge": "br0"}}, "network name"),
    ({"lan": "br0"}, "must be a table"),
])
def test_bad_networks_tables_are_refused(table, message) -> None:
    with pytest.raises(UserError, match=message):
        parse_networks(table, "agent.toml")


def test_agent_toml_networks(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text('[networks.lan]\nbridge = "br-x"\n')
    assert load_config(tmp_path).networks == {"lan": Network("lan", NetworkKind.BRIDGE,
                                                             "br-x")}


def test_a_nic_on_a_network_this_host_lacks_names_the_networks_it_has() -> None:
    with pytest.raises(UserError) as info:
        attach.plan([attach.NicRequest("net0", "dmz", "52:54:00:00:00:01")], LAN)
    assert "network 'dmz', which this host does not have" in str(info.value)
    assert "lan (bridge br-a)" in str(info.value)


def test_a_missing_bridge_is_refused_before_anything_is_made() -> None:
    nets = {"lan": Network("lan", NetworkKind.BRIDGE, "fynosuchbr")}
    with pytest.raises(UserError, match="does not exist on this host"):
        attach.plan([attach.NicRequest("net0", "lan")], nets)


ARGV = ["-netdev", "tap,id=n0,ifname=tapx,script=no,downscript=no",
        "-device", "e1000,netdev=n0,mac=52:54:00:12:34:56",
        "-netdev", "bridge,id=n1,br=br-b",
        "-device", '{"driver": "virtio-net-pci", "netdev": "n1"}',
        "-netdev", "user,id=u0",
        "-nic", "tap,ifname=tapy,model=rtl8139,mac=52:54:00:00:00:09"]


def test_argv_nics_are_the_host_backed_ones_with_model_and_mac() -> None:
    found = nics.argv_nics(nics.netdev_options(ARGV))
    assert [(n.key, n.backend, n.model, n.mac) for n in found] == [
        ("n0", "tap", "e1000", "52:54:00:12:34:56"),
        ("n1", "bridge", "virtio-net-pci", ""),
        ("nic:0", "tap", "rtl8139", "52:54:00:00:00:09")]


def test_networks_come_from_net_map_record_bridge_in_that_order(monkeypatch) -> None:
    bridges = {"tapx": "br-a", "tapy": "br-z"}
    monkeypatch.setattr(devices, "master_of", bridges.get)
    options = nics.netdev_options(ARGV)
    specs = nics.describe_nics(options, 1, {"n1": "52:54:00:aa:aa:aa"}, {},
                               {"br-z": "dmz"}, LAN)
    assert specs == (
        NicSpec("n0", "lan", "52:54:00:12:34:56", "e1000"),         # br-a is lan here
        NicSpec("n1", "br-b", "52:54:00:aa:aa:aa", "virtio-net-pci"),  # bridge's own name
        NicSpec("nic:0", "dmz", "52:54:00:00:00:09", "rtl8139"))    # --net-map by bridge
    recorded = nics.describe_nics(options, 1, {}, {"n0": "prod"}, {"n1": "x"}, LAN)
    assert [s.network for s in recorded] == ["prod", "x", "br-z"]


def test_net_map_naming_no_nic_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(devices, "master_of", lambda _: "br-a")
    with pytest.raises(UserError, match="--net-map nope: no such NIC"):
        nics.describe_nics(nics.netdev_options(ARGV), 1, {}, {}, {"nope": "lan"}, LAN)


def test_a_tap_on_no_bridge_needs_a_net_map(monkeypatch) -> None:
    monkeypatch.setattr(devices, "master_of", lambda _: None)
    options = nics.netdev_options(["-netdev", "tap,id=n0,ifname=t0"])
    with pytest.raises(UserError, match="--net-map n0=NETWORK"):
        nics.describe_nics(options, 1, {}, {}, {}, LAN)


def _spec(argv: list[str]) -> VmSpec:
    return VmSpec(name="vm", argv=tuple(["-m", "64M", *argv]), ram_size=64 << 20,
                  ram_backend_id="pc.ram")


def test_destination_rebuilds_host_nics_on_its_own_taps(tmp_path: Path) -> None:
    paths = DestinationPaths.under(tmp_path, tmp_path, "vm")
    argv = destination_argv(_spec(ARGV), paths, (tmp_path,), "qemu",
                            host_nics={"n0": "tap,fd=7", "n1": "tap,fd=8", "nic:0": "tap,fd=9"})
    options = split_options(argv[1:])
    netdevs = [o.value for o in options if o.name in ("-netdev", "-nic")]
    assert netdevs == ["tap,fd=7,id=n0", "tap,fd=8,id=n1", "user,id=u0",
                       "tap,fd=9,model=rtl8139,mac=52:54:00:00:00:09"]
    assert not any("ifname" in v or "br=" in v or "script" in v for v in netdevs)


def test_destination_refuses_a_host_nic_it_was_given_no_network_for(tmp_path: Path) -> None:
    paths = DestinationPaths.under(tmp_path, tmp_path, "vm")
    with pytest.raises(UserError, match=r"\(NIC n0\) has no network on this host"):
        destination_argv(_spec(ARGV[:4]), paths, (tmp_path,), "qemu", host_nics={})


def test_vmspec_carries_nics() -> None:
    spec = VmSpec(name="vm", argv=("-m", "64M"), ram_size=64 << 20, ram_backend_id="pc.ram",
                  nics=(NicSpec("n0", "lan", "52:54:00:00:00:01", "e1000"),))
    assert VmSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("text, message", [
    ("", "use NETWORK"), ("lan,speed=10", "use NETWORK"), ("lan,model=ne2k_isa", "model"),
    ("lan,mac=01:00:5e:00:00:01", "unicast"), ("lan,mac=zz", "unicast")])
def test_bad_nic_options_are_refused(text, message) -> None:
    with pytest.raises(UserError, match=message):
        nics.parse_nic_option(text, 0)


def test_nic_option_defaults_and_arguments() -> None:
    nic = nics.parse_nic_option("lan", 0)
    assert nic.model == "virtio-net-pci" and nic.request.mac.startswith("52:54:00:")
    assert nics.nic_arguments([nic], {"net0": "tap,fd=5"}) == [
        "-netdev", "tap,fd=5,id=net0",
        "-device", f"virtio-net-pci,netdev=net0,mac={nic.request.mac},id=nic-net0"]

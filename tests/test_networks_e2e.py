"""NICs that follow the VM: real QEMU and agents in two network namespaces, each with a
bridge of its own (br-a on the source "host", br-b on the destination's), both offered to
VMs as network `lan`."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.guest import GuestConfig
from agent.guest.build import build_guest, default_cache_dir
from agent.localpair import AgentPair, NetnsLink, pid_alive, read_guest
from agent.migration import faults
from agent.qemu import nics, qmp
from agent.state import vms

pytestmark = pytest.mark.qemu

BRIDGES = ("br-a", "br-b")
NETCAP = Path(__file__).parent / "netcap.py"
GUEST = GuestConfig(ws_pages=1000, rate=2000, fill_pages=2048)


@dataclass
class NetPair:
    agents: AgentPair
    link: NetnsLink

    def ip_json(self, side: int, *args: str) -> list[dict]:
        out = subprocess.run(["ip", "-n", self.link.namespaces[side], "-j", *args],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out or "[]")

    def ferry_taps(self, side: int) -> list[str]:
        """ferry's devices (fy...) in a namespace, wherever they are enslaved."""
        return [d["ifname"] for d in self.ip_json(side, "link", "show")
                if d["ifname"].startswith("fy") and not d["ifname"].startswith("fv")]

    def on_bridge(self, side: int) -> list[str]:
        return [d["ifname"] for d in self.ip_json(side, "link", "show", "master",
                                                  BRIDGES[side])]

    def in_ns(self, side: int, *argv: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([*self.link.prefix_argv(side), *argv], capture_output=True,
                              text=True, timeout=60, **kwargs)

    def vm_start(self, name: str, *args: str) -> subprocess.CompletedProcess:
        """`ferry vm start` on host a (in its namespace), the test guest as kernel."""
        return self.in_ns(0, sys.executable, "-m", "agent", "vm", "start", name, "--home",
                          str(self.agents.a.home), "--memory", "64M", *args, "--",
                          "-kernel", str(build_guest(GUEST)))


def add_network(home: Path, name: str, body: str) -> None:
    with open(home / "agent.toml", "a") as f:
        f.write(f"\n[networks.{name}]\n{body}\n")


@pytest.fixture
def net(monkeypatch) -> Iterator[NetPair]:
    monkeypatch.setenv(faults.ENV, "")
    root = Path(tempfile.mkdtemp(prefix="fy-"))
    link = NetnsLink().create()
    agents = AgentPair.create(root, allow=(default_cache_dir(),), link=link)
    pair = NetPair(agents, link)
    try:
        for side, bridge in enumerate(BRIDGES):
            ns = link.namespaces[side]
            for argv in (["ip", "-n", ns, "link", "add", bridge, "type", "bridge"],
                         ["ip", "-n", ns, "link", "set", bridge, "up"]):
                subprocess.run(argv, check=True)
        add_network(agents.a.home, "lan", 'bridge = "br-a"')
        add_network(agents.b.home, "lan", 'bridge = "br-b"')
        add_network(agents.b.home, "quiet", 'type = "none"')
        agents.start()
        yield pair
    finally:
        agents.cleanup()
        link.delete()
        shutil.rmtree(root, ignore_errors=True)


def wait_for(check, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def first_pass(ram_path: Path) -> None:
    wait_for(lambda: ram_path.exists() and read_guest(ram_path).passes >= 1,
             "the guest's first pass", timeout=30)


def quit_vm(qmp_path: str) -> None:
    async def run() -> None:
        async with qmp.connect(qmp_path) as q:
            await q.quit()
    asyncio.run(run())


def guest_mac(qmp_path: str) -> str:
    """The MAC of the VM's only NIC, as QEMU has it (QOM)."""
    async def read() -> dict[str, str]:
        async with qmp.connect(qmp_path) as q:
            return await nics.guest_macs(q)
    (mac,) = asyncio.run(read()).values()
    return mac


def migrated(net: NetPair, *args: str) -> tuple[vms.VmRecord, vms.VmRecord, dict]:
    """`ferry vm start mig --nic lan` on a, its first pass, `ferry migrate mig ARGS`:
    (source record, destination record, report)."""
    assert net.vm_start("mig", "--nic", "lan").returncode == 0
    source = net.agents.a.vm_record("mig")
    first_pass(Path(source.ram_path))
    rc, report, stderr = net.agents.migrate("mig", *args)
    assert rc == 0, f"{report}\n{stderr}\n{net.agents.logs()}"
    return source, net.agents.b.vm_record("mig"), report


def assert_guest_runs(record: vms.VmRecord) -> None:
    """The migrated guest makes two more passes over its memory and finds no error."""
    first = read_guest(record.ram_path)
    now = wait_for(lambda: (s := read_guest(record.ram_path)).passes >= first.passes + 2
                   and s, "two passes")
    assert now.errors == 0


def test_nic_follows_the_vm_to_the_destinations_bridge_and_announces_itself(net) -> None:
    started = net.vm_start("mig", "--nic", "lan,model=e1000")
    assert started.returncode == 0, started.stderr
    agents = net.agents
    source = agents.a.vm_record("mig")
    assert source.nics and source.nics[0]["network"] == "lan"
    mac, source_tap = source.nics[0]["mac"], source.nics[0]["ifname"]
    assert net.on_bridge(0) == [source_tap]
    assert guest_mac(source.qmp_path) == mac
    first_pass(Path(source.ram_path))

    capture = subprocess.Popen([*net.link.prefix_argv(1), sys.executable, str(NETCAP),
                                BRIDGES[1], mac, "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"
        rc, report, stderr = agents.migrate("mig")
        assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
        frames = [json.loads(capture.stdout.readline())]
    finally:
        capture.kill()
        capture.communicate()
    assert report["nics"] == [{"key": "net0", "network": "lan", "mac": mac,
                               "model": "e1000"}]
    dest = agents.b.vm_record("mig")
    assert dest.nics[0]["network"] == "lan" and dest.nics[0]["mac"] == mac
    assert net.on_bridge(1) == [dest.nics[0]["ifname"]]
    assert guest_mac(dest.qmp_path) == mac
    # QEMU announces the MAC on the new port right after resume (its first round is 50 ms
    # after announce-self; allow for a busy machine).
    assert frames[0]["type"] == "rarp"
    resumed_at = report["resume_us"] / 1e6
    assert 0 <= frames[0]["time"] - resumed_at < 2.0, (frames, resumed_at)
    assert_guest_runs(dest)

    # The source QEMU quit after the commit: its tap went with it.
    wait_for(lambda: not pid_alive(source.pid), "the source QEMU to quit")
    wait_for(lambda: net.ferry_taps(0) == [], "the source tap to go")
    # So does the destination's when its VM quits.
    quit_vm(dest.qmp_path)
    wait_for(lambda: not pid_alive(dest.pid), "the destination QEMU to quit")
    wait_for(lambda: net.ferry_taps(1) == [], "the destination tap to go")


def test_nic_on_a_network_the_destination_lacks_is_refused_before_anything_starts(net):
    started = net.vm_start("mig", "--nic", "lan")
    assert started.returncode == 0, started.stderr
    source = net.agents.a.vm_record("mig")
    rc, report, _ = net.agents.migrate("mig", "--net-map", "lan=dmz")
    assert rc == 1 and report["status"] == "failed"
    assert "network 'dmz', which this host does not have" in report["error"]
    assert "lan (bridge br-b)" in report["error"] and "quiet (none)" in report["error"]
    assert pid_alive(source.pid) and net.ferry_taps(1) == []
    assert net.agents.b.leftovers() == []


def test_nic_mapped_to_a_none_network_arrives_disconnected(net) -> None:
    source, dest, _ = migrated(net, "--net-map", "lan=quiet")
    assert dest.nics[0]["network"] == "quiet" and net.on_bridge(1) == []
    assert guest_mac(dest.qmp_path) == source.nics[0]["mac"]
    # Its tap is on no bridge and down: the guest reaches nothing.
    (tap,) = net.ip_json(1, "link", "show", "dev", dest.nics[0]["ifname"])
    assert "master" not in tap and "UP" not in tap["flags"]
    assert_guest_runs(dest)


def test_destination_tap_is_removed_on_rollback(net, monkeypatch) -> None:
    monkeypatch.setenv(faults.ENV, faults.Fault.PRE_SWITCHOVER.value)
    net.agents.a.stop()
    net.agents.a.start()          # reads the fault at start of each job from its env
    assert net.vm_start("mig", "--nic", "lan").returncode == 0
    source = net.agents.a.vm_record("mig")
    first_pass(Path(source.ram_path))
    proc = net.agents.popen_migrate("mig", "--bandwidth", "8M")
    # Pre-copy of the guest's 8 MiB of content takes about a second at 8 MB/s: the
    # destination's tap exists by then.
    wait_for(lambda: len(net.on_bridge(1)) == 1 or proc.poll() is not None,
             "the destination's tap")
    assert len(net.on_bridge(1)) == 1
    out, err = proc.communicate(timeout=120)
    report = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 1 and report["status"] == "failed", f"{report}\n{err}"
    assert "failure in pre-switchover" in report["error"]
    assert pid_alive(source.pid) and net.on_bridge(0) == [source.nics[0]["ifname"]]
    wait_for(lambda: net.ferry_taps(1) == [] and net.agents.b.leftovers() == [],
             "the destination's tap and files to go")


def test_vm_started_by_other_tools_is_mapped_by_its_bridge(net, tmp_path) -> None:
    tap = "othertap0"
    ns_a = net.link.namespaces[0]
    for argv in (["ip", "-n", ns_a, "tuntap", "add", "dev", tap, "mode", "tap"],
                 ["ip", "-n", ns_a, "link", "set", tap, "master", "br-a", "up"]):
        subprocess.run(argv, check=True)
    qmp_path = tmp_path / "other.qmp"
    qemu = subprocess.Popen(
        [*net.link.prefix_argv(0), "qemu-system-x86_64", "-machine", "pc", "-m", "65544K",
         "-accel", "tcg", "-cpu", "max", "-display", "none", "-nodefaults",
         "-no-user-config", "-name", "other", "-kernel", str(build_guest(GUEST)),
         "-qmp", f"unix:{qmp_path},server=on,wait=off",
         "-netdev", f"tap,id=uplink,ifname={tap},script=no,downscript=no",
         "-device", "virtio-net-pci,netdev=uplink,mac=52:54:00:aa:bb:01"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(qmp_path.exists, "QEMU's QMP socket")
        rc, report, stderr = net.agents.migrate("--qmp", str(qmp_path))
        assert rc == 0, f"{report}\n{stderr}\n{net.agents.logs()}"
        assert report["nics"] == [{"key": "uplink", "network": "lan",
                                   "mac": "52:54:00:aa:bb:01", "model": "virtio-net-pci"}]
        dest = net.agents.b.vm_record("other")
        assert net.on_bridge(1) == [dest.nics[0]["ifname"]]
        assert guest_mac(dest.qmp_path) == "52:54:00:aa:bb:01"
        assert qemu.wait(timeout=10) == 0
        # Not ferry's tap: it stays on the source host.
        assert net.on_bridge(0) == [tap]
    finally:
        qemu.kill()
        qemu.wait()


def test_nic_on_a_macvtap_network_gets_the_guests_mac_and_goes_with_the_vm(net) -> None:
    parent = net.link.devices[1]           # b's end of the link: a real parent device
    net.agents.b.stop()
    add_network(net.agents.b.home, "direct", f'macvtap = "{parent}"')
    net.agents.b.start()
    source, dest, _ = migrated(net, "--net-map", "lan=direct")
    nic = dest.nics[0]
    assert nic["kind"] == "macvtap" and nic["network"] == "direct"
    (link,) = net.ip_json(1, "-d", "link", "show", "dev", nic["ifname"])
    assert link["address"] == source.nics[0]["mac"] and link["link"] == parent
    assert link["linkinfo"]["info_kind"] == "macvtap"
    assert_guest_runs(dest)
    # A macvtap outlives its descriptor: the agent deletes it when the VM quits.
    quit_vm(dest.qmp_path)
    wait_for(lambda: not pid_alive(dest.pid), "the destination QEMU to quit")
    wait_for(lambda: net.ferry_taps(1) == [], "the macvtap to go")

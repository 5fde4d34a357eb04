"""Two real ferry agents on one machine (own homes, ports and RAM dirs), for the demo, the
migration benchmark and the end-to-end tests.

Each agent is its own `python -m agent agent` process, as systemd would run it. cleanup()
stops them and removes every QEMU and file they may have left, whatever happened.

By default both listen on loopback. Given a NetnsLink (two network namespaces joined by a
veth pair, optionally rate-limited with tbf), agent a runs in the first namespace and b in
the second, each listening on its own veth address: two "hosts" joined by a real link.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from agent import identity, procfs
from agent.errors import LocalError
from agent.guest import MailboxState, read_mailbox
from agent.qemu.vm import is_qemu
from agent.service.control import AgentUnreachableError, ControlClient
from agent.state import vms
from agent.state.config import AgentConfig

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
MIGRATE_TIMEOUT_S = 180.0
LOOPBACK = "127.0.0.1"
# free_port's range: above the well-known and registered ports most services take, below
# the kernel's ephemeral range (Linux's default low end when /proc cannot say).
PORT_FLOOR = 20000
EPHEMERAL_LOW_DEFAULT = 32768
# The link's two ends; only ever assigned inside the namespaces a NetnsLink creates.
LINK_ADDRESSES = ("10.77.0.1", "10.77.0.2")
LINK_PREFIX_LEN = 24
# tbf: the bucket holds 2 ms at the link's rate but at least 64 KiB (one GSO packet, which
# tbf would otherwise split); the queue holds 20 ms, about a switch port's buffer.
TBF_BURST_S = 0.002
TBF_MIN_BURST = 64 << 10
TBF_LATENCY = "20ms"
RATE = re.compile(r"(\d+(?:\.\d+)?)([kmgt]?)bit", re.IGNORECASE)
RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
# Not the shared `random`: tests seed that one, and two processes would then pick alike.
_random = random.SystemRandom()
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range, not handed out before.

    Ports from bind(0) come out of the ephemeral range, where the kernel may give the same
    one to the next bind(0) or to any outgoing connection before the agent that was told
    to listen on it has started: CI once saw an agent fail with "address already in use".
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = _random.randrange(PORT_FLOOR, low)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise LocalError(f"no free loopback port in {PORT_FLOOR}-{low - 1}")


def _ephemeral_low() -> int:
    """The low end of net.ipv4.ip_local_port_range (ports the kernel hands out itself)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = EPHEMERAL_LOW_DEFAULT
    return max(low, PORT_FLOOR + 1000)


def rate_bits(rate: str) -> int:
    """Bits per second of a tc rate such as "1gbit" or "500mbit" (SI units, as tc reads)."""
    match = RATE.fullmatch(rate.strip())
    if match is None:
        raise ValueError(f"not a link rate like 1gbit or 500mbit: {rate!r}")
    bits = int(float(match[1]) * RATE_UNITS[match[2].lower()])
    if bits <= 0:
        raise ValueError(f"link rate must be positive: {rate!r}")
    return bits


def tbf_args(rate: str) -> list[str]:
    """`tc qdisc add dev DEV root` arguments that shape a device to `rate`."""
    burst = max(TBF_MIN_BURST, int(rate_bits(rate) / 8 * TBF_BURST_S))
    return ["tbf", "rate", rate, "burst", str(burst), "latency", TBF_LATENCY]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


@dataclass
class NetnsLink:
    """Two network namespaces joined by a veth pair, each end shaped by tbf when a rate is
    given: "host" a (LINK_ADDRESSES[0]) and "host" b (LINK_ADDRESSES[1]).

    Nothing outside the two namespaces is touched: the veth pair is created inside a's
    namespace with its peer end moved straight into b's, and deleting the namespaces
    removes it. Use as a context manager, or create() and delete() (which never fails).
    """

    rate: str | None = None
    name_prefix: str = "ferry-link-"
    tag: str = field(default_factory=lambda: os.urandom(3).hex())
    addresses: tuple[str, str] = LINK_ADDRESSES
    created: list[str] = field(default_factory=list)   # namespaces made so far

    def __post_init__(self) -> None:
        if self.rate is not None:
            rate_bits(self.rate)        # a bad rate fails here, not halfway through create

    @property
    def namespaces(self) -> tuple[str, str]:
        return (f"{self.name_prefix}{self.tag}-a", f"{self.name_prefix}{self.tag}-b")

    @property
    def devices(self) -> tuple[str, str]:
        """The veth ends in a and in b (interface names hold at most 15 characters)."""
        return (f"fv{self.tag}a", f"fv{self.tag}b")

    def setup_commands(self) -> list[list[str]]:
        (ns_a, ns_b), (dev_a, dev_b) = self.namespaces, self.devices
        commands = [["ip", "netns", "add", ns_a], ["ip", "netns", "add", ns_b],
                    ["ip", "-n", ns_a, "link", "add", dev_a, "type", "veth",
                     "peer", "name", dev_b, "netns", ns_b]]
        for ns, dev, address in zip(self.namespaces, self.devices, self.addresses,
                                    strict=True):
            commands += [["ip", "-n", ns, "addr", "add", f"{address}/{LINK_PREFIX_LEN}",
                          "dev", dev],
                         ["ip", "-n", ns, "link", "set", "lo", "up"],
                         ["ip", "-n", ns, "link", "set", dev, "up"]]
            if self.rate is not None:
                commands.append(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root",
                                 *tbf_args(self.rate)])
        return commands

    def teardown_commands(self) -> list[list[str]]:
        return [["ip", "netns", "del", ns] for ns in self.created]

    def create(self) -> Self:
        """Set the link up; on any failure remove what was made and raise LocalError."""
        try:
            for argv in self.setup_commands():
                if argv[:3] == ["ip", "netns", "add"]:
                    self.created.append(argv[3])    # before: an interrupt may come any time
                done = _run(argv)
                if done.returncode != 0:
                    raise LocalError(f"cannot set up the namespace link: {' '.join(argv)}: "
                                     f"{done.stderr.strip() or f'exit {done.returncode}'}")
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Remove both namespaces (and with them the veth pair); Ctrl-C and SIGTERM wait
        until that is done. Processes still inside keep theirs alive: stop them first."""
        blocked = {signal.SIGINT, signal.SIGTERM}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            for argv in self.teardown_commands():
                _run(argv)
            self.created.clear()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def prefix_argv(self, side: int) -> list[str]:
        """Run a command in side 0 (a) or 1 (b); `ip netns exec` execs, so the pid stays
        the command's."""
        return ["ip", "netns", "exec", self.namespaces[side]]

    def device_bytes(self) -> tuple[int, int]:
        """Bytes received so far by a's end and by b's end of the veth (what b and a sent)."""
        out = []
        for ns, dev in zip(self.namespaces, self.devices, strict=True):
            shown = subprocess.run(["ip", "-n", ns, "-j", "-s", "link", "show", dev],
                                   capture_output=True, text=True, check=True)
            out.append(int(json.loads(shown.stdout)[0]["stats64"]["rx"]["bytes"]))
        return out[0], out[1]


@dataclass
class AgentProcess:
    """One agent subprocess and where it keeps things."""

    name: str
    home: Path
    port: int
    ram_dir: Path
    allow: tuple[Path, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    host: str = LOOPBACK                  # the address it listens on for peers
    prefix: tuple[str, ...] = ()          # runs it elsewhere, e.g. `ip netns exec NS`
    args: tuple[str, ...] = ()            # more `ferry agent` flags, e.g. --config FILE
    env: dict[str, str] = field(default_factory=dict)   # added to the environment

    @property
    def config(self) -> AgentConfig:
        return AgentConfig(home=self.home, ram_dir=self.ram_dir)

    def use_ram_dir(self, ram_dir: Path) -> None:
        """Keep RAM files in ram_dir instead (a huge-page tmpfs, say); before start()."""
        toml = self.home / "agent.toml"
        toml.write_text(toml.read_text().replace(f'ram_dir = "{self.ram_dir}"',
                                                 f'ram_dir = "{ram_dir}"'))
        self.ram_dir = ram_dir

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.log_path = self.home.parent / f"{self.name}.log"
        argv = [*self.prefix, sys.executable, "-m", "agent", "-vv", "agent", "--home",
                str(self.home), "--listen", self.address, "--ram-dir", str(self.ram_dir)]
        for path in self.allow:
            argv += ["--allow-path", str(path)]
        argv += self.args
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env})
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with ControlClient(self.home / "control.sock", timeout=2) as client:
                    client.call({"op": "ping"})
                return
            except AgentUnreachableError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"agent {self.name} did not start:\n{self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def cpu_seconds(self) -> float | None:
        """CPU seconds the agent process used so far (None when it is not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        return procfs.cpu_seconds(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def vm_record(self, name: str) -> vms.VmRecord:
        return vms.load(self.config, name)

    def incoming_pid(self, name: str) -> int | None:
        """Pid of the destination QEMU of an incoming VM (from its pidfile), if any."""
        with contextlib.suppress(OSError, ValueError):
            return int((self.home / "vms" / name / "qemu.pid").read_text())
        return None

    def leftovers(self) -> list[str]:
        """Files and processes this agent holds for VMs (empty after a clean rollback)."""
        found = [str(p) for p in self.ram_dir.iterdir()] if self.ram_dir.exists() else []
        vms_dir = self.home / "vms"
        if vms_dir.exists():
            found += [str(p) for p in vms_dir.iterdir()]
        return found


def read_guest(ram_path: Path | str) -> MailboxState:
    """The test guest's mailbox, read straight from a RAM file."""
    with open(ram_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as ram:
        return read_mailbox(ram)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return False


@dataclass
class AgentPair:
    """A source agent `a` and a destination agent `b` that trust each other."""

    root: Path
    a: AgentProcess
    b: AgentProcess
    extra_pids: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path, allow: tuple[Path, ...], *, link: NetnsLink | None = None,
               prefix: Sequence[str] = ()) -> AgentPair:
        """Homes under root, RAM dirs on /dev/shm, each trusting the other's key.

        With `link` (created), a runs in its first namespace and b in its second, each
        listening on its veth address; else both listen on loopback, run under `prefix`
        (e.g. `ip netns exec NS` to share one private namespace).
        """
        shm = Path(tempfile.mkdtemp(prefix="ferry-test-", dir="/dev/shm"))
        if link is None:
            hosts, prefixes = (LOOPBACK, LOOPBACK), (tuple(prefix), tuple(prefix))
        else:
            hosts = link.addresses
            prefixes = (tuple(link.prefix_argv(0)), tuple(link.prefix_argv(1)))
        a = AgentProcess("a", root / "a", free_port(), shm / "a", host=hosts[0],
                         prefix=prefixes[0])
        b = AgentProcess("b", root / "b", free_port(), shm / "b", allow=allow, host=hosts[1],
                         prefix=prefixes[1])
        for agent in (a, b):
            agent.ram_dir.mkdir(parents=True)
            identity.ensure_home(agent.home)
            # In agent.toml, not only a flag: `ferry vm start` reads it too.
            (agent.home / "agent.toml").write_text(f'ram_dir = "{agent.ram_dir}"\n')
        ident_a, _ = identity.load_identity(a.home)
        ident_b, _ = identity.load_identity(b.home)
        identity.trust_peer(a.home, "hostb", ident_b.public_key, b.address)
        identity.trust_peer(b.home, "hosta", ident_a.public_key, a.address)
        return cls(root=root, a=a, b=b)

    def start(self) -> None:
        self.a.start()
        self.b.start()

    def migrate_argv(self, *args: str, peer: str = "hostb") -> list[str]:
        return [sys.executable, "-m", "agent", "migrate", "--home", str(self.a.home),
                "--to", peer, "--json", *args]

    def migrate(self, *args: str, peer: str = "hostb",
                timeout: float = MIGRATE_TIMEOUT_S) -> tuple[int, dict[str, Any], str]:
        """Run `ferry migrate ... --to PEER --json` on a; (exit code, report, stderr)."""
        done = subprocess.run(self.migrate_argv(*args, peer=peer), capture_output=True,
                              text=True, timeout=timeout, check=False)
        lines = done.stdout.strip().splitlines()
        report = json.loads(lines[-1]) if lines else {}
        return done.returncode, report, done.stderr

    def popen_migrate(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.migrate_argv(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def logs(self) -> str:
        return f"--- agent a ---\n{self.a.log()}\n--- agent b ---\n{self.b.log()}"

    def cpu_seconds(self) -> tuple[float | None, float | None]:
        """CPU seconds used so far by agent a and by agent b."""
        return self.a.cpu_seconds(), self.b.cpu_seconds()

    def cleanup(self) -> None:
        """Stop both agents; kill every QEMU they recorded; remove their RAM files."""
        for agent in (self.a, self.b):
            agent.stop()
        pids = list(self.extra_pids)
        for agent in (self.a, self.b):
            pids += [r.pid for r in vms.list_vms(agent.config)]
            for pidfile in (agent.home / "vms").glob("*/qemu.pid"):
                with contextlib.suppress(OSError, ValueError):
                    pids.append(int(pidfile.read_text()))
        for pid in set(pids):
            if is_qemu(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.a.ram_dir.parent, ignore_errors=True)


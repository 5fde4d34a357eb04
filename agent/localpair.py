"""Two real ferry agents on one machine (loopback, own homes, ports and RAM dirs), for the
demo, the migration benchmark and the end-to-end tests.

Each agent is its own `python -m agent agent` process, as systemd would run it. cleanup()
stops them and removes every QEMU and file they may have left, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import identity
from agent.guest import MailboxState, read_mailbox
from agent.qemu.vm import is_qemu
from agent.service.control import AgentUnreachableError, ControlClient
from agent.state import vms
from agent.state.config import AgentConfig

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
MIGRATE_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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

    @property
    def config(self) -> AgentConfig:
        return AgentConfig(home=self.home, ram_dir=self.ram_dir)

    def start(self) -> None:
        self.log_path = self.home.parent / f"{self.name}.log"
        argv = [sys.executable, "-m", "agent", "-vv", "agent", "--home", str(self.home),
                "--listen", f"127.0.0.1:{self.port}", "--ram-dir", str(self.ram_dir)]
        for path in self.allow:
            argv += ["--allow-path", str(path)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with ControlClient(self.home / "control.sock", timeout=2) as client:
                    client.call({"op": "ping"})
                return
            except AgentUnreachableError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent {self.name} did not start:\n{self.log()}")
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

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
    def create(cls, root: Path, allow: tuple[Path, ...]) -> AgentPair:
        shm = Path(tempfile.mkdtemp(prefix="ferry-test-", dir="/dev/shm"))
        a = AgentProcess("a", root / "a", free_port(), shm / "a")
        b = AgentProcess("b", root / "b", free_port(), shm / "b", allow=allow)
        for agent in (a, b):
            agent.ram_dir.mkdir(parents=True)
            identity.ensure_home(agent.home)
            # In agent.toml, not only a flag: `ferry vm start` reads it too.
            (agent.home / "agent.toml").write_text(f'ram_dir = "{agent.ram_dir}"\n')
        ident_a, _ = identity.load_identity(a.home)
        ident_b, _ = identity.load_identity(b.home)
        identity.trust_peer(a.home, "hostb", ident_b.public_key, f"127.0.0.1:{b.port}")
        identity.trust_peer(b.home, "hosta", ident_a.public_key, f"127.0.0.1:{a.port}")
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
                              text=True, timeout=timeout)
        lines = done.stdout.strip().splitlines()
        report = json.loads(lines[-1]) if lines else {}
        return done.returncode, report, done.stderr

    def popen_migrate(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.migrate_argv(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def logs(self) -> str:
        return f"--- agent a ---\n{self.a.log()}\n--- agent b ---\n{self.b.log()}"

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


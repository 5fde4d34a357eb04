"""Finding out about running QEMU processes, and launching migratable ones as our children."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent import malloc_tuning, procfs
from agent.errors import QemuError, QemuStartError, UserError, VmNotMigratableError
from agent.qemu import qmp as qmp_mod
from agent.qemu.vmspec import PLAIN_RAM_BLOCK, RAM_BACKEND_TYPES

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
# `pc` maps low RAM 1:1 (guest-physical address == offset in the RAM file below the PCI
# hole), which the test guest's mailbox relies on.
MACHINE_TYPE = "pc"
RAM_BACKEND_ID = "ram0"
RAM_BACKEND_TYPE = "memory-backend-file"
SHM_DIR = Path("/dev/shm")
PAGE_SIZE = 4096

KVM_DEVICE = "/dev/kvm"
# PVM is a software hypervisor behind /dev/kvm: a tiny guest runs on it, a stock Linux
# kernel does not (DESIGN §7), so it does not count as real KVM.
PVM_MODULE = "/sys/module/kvm_pvm"
HARDWARE_KVM_MODULES = ("/sys/module/kvm_intel", "/sys/module/kvm_amd")
ACCEL_ENV = "FERRY_ACCEL"

DEFAULT_LAUNCH_TIMEOUT = 10.0
DEFAULT_STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.01
LOG_TAIL_BYTES = 2000
_UCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


# ---------------------------------------------------------------------------- accelerator

class Accel(enum.Enum):
    """How QEMU runs guest code."""

    KVM = "kvm"    # hardware virtualization through /dev/kvm
    TCG = "tcg"    # QEMU's own translator; slower, works everywhere


@dataclass(frozen=True, slots=True)
class AccelChoice:
    """The accelerator to use here and why it was picked."""

    accel: Accel
    reason: str

    def args(self) -> list[str]:
        """QEMU options selecting this accelerator and a CPU model that suits it."""
        if self.accel is Accel.KVM:
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def choose_accel(env: Mapping[str, str] | None = None) -> AccelChoice:
    """KVM when /dev/kvm is usable and backed by hardware, else TCG; FERRY_ACCEL overrides."""
    env = os.environ if env is None else env
    forced = env.get(ACCEL_ENV, "").strip().lower()
    if forced:
        try:
            return AccelChoice(Accel(forced), f"{ACCEL_ENV}={forced}")
        except ValueError:
            raise UserError(f"{ACCEL_ENV}={forced!r}: use 'kvm' or 'tcg'") from None
    try:
        os.close(os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return AccelChoice(Accel.TCG, f"{KVM_DEVICE} not usable ({exc.strerror})")
    if os.path.exists(PVM_MODULE):
        return AccelChoice(Accel.TCG, f"{KVM_DEVICE} is PVM (software), not hardware KVM")
    if not any(os.path.exists(m) for m in HARDWARE_KVM_MODULES):
        return AccelChoice(Accel.TCG, "no kvm_intel or kvm_amd module behind /dev/kvm")
    return AccelChoice(Accel.KVM, "hardware KVM")


# ---------------------------------------------------------------------------- discovery

def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected unix socket."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def peer_pid(sock_path: str | os.PathLike[str]) -> int:
    """Pid of the process listening on a unix socket (QEMU's QMP), via SO_PEERCRED.

    The kernel records the listener's credentials at connect time, so this works even
    while another client holds QEMU's single QMP session; QEMU later sees us hang up.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(os.fspath(sock_path))
        except OSError as exc:
            raise QemuError(f"cannot reach QEMU's socket {sock_path}: {exc.strerror}") from exc
        pid, _uid, _gid = peer_credentials(sock)
    if pid <= 0:
        raise QemuError(f"no peer credentials on {sock_path}")
    return pid


def read_argv(pid: int) -> list[str]:
    """The command line of process `pid` (from /proc/PID/cmdline)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as exc:
        raise QemuError(f"cannot read the command line of pid {pid}: {exc.strerror}") from exc
    if not raw:
        raise QemuError(f"pid {pid} has no command line (exited, or a kernel thread)")
    return [arg.decode("utf-8", "surrogateescape") for arg in raw.rstrip(b"\0").split(b"\0")]


def is_qemu(pid: int) -> bool:
    """Whether pid is a running QEMU (its argv[0] names qemu): a check before signalling a
    pid taken from a record or pidfile, which may since belong to another process."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False
    return b"qemu" in argv0


def qemu_pids_mentioning(marker: str) -> list[int]:
    """Every running QEMU whose command line contains marker (a path unique to one job):
    how recovery finds a QEMU launched an instant before its agent died, pid unrecorded."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and b"qemu" in cmdline.split(b"\0", 1)[0]:
            found.append(int(entry.name))
    return found


@dataclass(frozen=True, slots=True)
class VmInfo:
    """What ferry learns about a running VM from its QMP socket and /proc."""

    name: str
    pid: int
    argv: tuple[str, ...]
    qmp_path: str
    machine: str                 # QOM type, e.g. pc-i440fx-7.2-machine
    ram_block: str               # the main RAM block's name in the migration stream
    ram_size: int                # bytes
    ram_backend_id: str          # "" for plain -m RAM (block pc.ram)
    ram_backend_type: str        # memory-backend-ram|file|memfd, or "" for plain -m
    ram_path: str                # the backend's file ("" unless memory-backend-file)
    accel: Accel
    qemu_version: tuple[int, int, int]


def _size_text(size: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


# QEMU before 9.0 under TCG loses dirty pages of a RAM block whose length is a multiple
# of 64 pages (fixed by 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with
# TCG memory access"; DESIGN §7). Two pages more keep the guest out of it.
TCG_DIRTY_BUG_PAGES = 64
TCG_DIRTY_BUG_FIXED = (9, 0)
TCG_RAM_PADDING = 2 * PAGE_SIZE


def tcg_dirty_log_unsafe(size: int, accel: Accel, version: tuple[int, int, int]) -> bool:
    """Whether QEMU's own dirty log would lose pages of a RAM block of `size` bytes."""
    return (accel is Accel.TCG and tuple(version[:2]) < TCG_DIRTY_BUG_FIXED
            and size % (TCG_DIRTY_BUG_PAGES * PAGE_SIZE) == 0)


def dirty_log_safe_size(size: int, accel: Accel, version: tuple[int, int, int]) -> int:
    """`size`, or size + 8 KiB where the TCG dirty-log bug would hit it."""
    return size + TCG_RAM_PADDING if tcg_dirty_log_unsafe(size, accel, version) else size


def qemu_binary_version(binary: str = QEMU_BINARY) -> tuple[int, int, int]:
    """(major, minor, micro) of a QEMU binary, from `--version`."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise QemuStartError(f"cannot run {binary} --version: {exc}") from exc
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise QemuStartError(f"{binary} --version printed no version: {out.strip()[:200]}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


async def describe_vm(qmp_path: str | os.PathLike[str], *, qmp: qmp_mod.Qmp | None = None,
                      timeout: float = qmp_mod.DEFAULT_CONNECT_TIMEOUT) -> VmInfo:
    """Describe the VM behind a QMP socket: plain -m RAM or any memory backend.

    Uses `qmp` if given (QEMU serves one QMP client at a time), else opens its own session.
    """
    path = os.fspath(qmp_path)
    pid = peer_pid(path)
    argv = tuple(read_argv(pid))
    if qmp is None:
        async with qmp_mod.connect(path, timeout) as own:
            return await _describe(own, path, pid, argv)
    return await _describe(qmp, path, pid, argv)


async def _describe(q: qmp_mod.Qmp, path: str, pid: int, argv: tuple[str, ...]) -> VmInfo:
    name = (await q.execute("query-name")).get("name") or f"pid{pid}"
    machine = str(await q.execute("qom-get", {"path": "/machine", "property": "type"}))
    backend = str(await q.execute("qom-get", {"path": "/machine", "property": "memory-backend"}))
    kvm = await q.execute("query-kvm")
    accel = Accel.KVM if kvm.get("enabled") else Accel.TCG
    if not backend:
        summary = await q.execute("query-memory-size-summary")
        return VmInfo(name=name, pid=pid, argv=argv, qmp_path=path, machine=machine,
                      ram_block=PLAIN_RAM_BLOCK, ram_size=int(summary["base-memory"]),
                      ram_backend_id="", ram_backend_type="", ram_path="", accel=accel,
                      qemu_version=q.qemu_version)

    async def prop(prop_name: str) -> object:
        return await q.execute("qom-get", {"path": backend, "property": prop_name})

    backend_type = str(await prop("type"))
    backend_id = backend.rsplit("/", 1)[-1]
    if backend_type not in RAM_BACKEND_TYPES:
        raise VmNotMigratableError(
            f"VM {name} (pid {pid}) keeps its RAM in a {backend_type} ({backend_id!r}); "
            f"ferry migrates plain -m RAM and {', '.join(RAM_BACKEND_TYPES)}")
    ram_path = str(await prop("mem-path")) if backend_type == "memory-backend-file" else ""
    return VmInfo(name=name, pid=pid, argv=argv, qmp_path=path, machine=machine,
                  ram_block=backend_id, ram_size=int(str(await prop("size"))),
                  ram_backend_id=backend_id, ram_backend_type=backend_type,
                  ram_path=ram_path, accel=accel, qemu_version=q.qemu_version)



async def vcpu_threads(q: qmp_mod.Qmp, pid: int) -> list[int]:
    """Thread ids of a QEMU's vCPUs (query-cpus-fast), or those /proc names as vCPU
    threads when QMP does not tell; [] if neither does (its pace is then unknown)."""
    try:
        cpus = await q.execute("query-cpus-fast")
    except QemuError:
        cpus = []
    tids = [int(c["thread-id"]) for c in cpus if isinstance(c, dict)
            and isinstance(c.get("thread-id"), int) and c["thread-id"] > 0]
    return sorted(tids) if tids else procfs.named_vcpu_threads(pid)

# ---------------------------------------------------------------------------- launching

@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything needed to start one migratable QEMU (source, or with -incoming a destination)."""

    name: str
    ram_size: int                      # bytes; a multiple of the page size
    ram_path: Path                     # the shared RAM file (created by QEMU if missing)
    qmp_path: Path
    serial_path: Path
    pidfile: Path
    log_path: Path                     # QEMU's own stdout/stderr
    cpus: int = 1
    kernel: Path | None = None
    append: str | None = None
    extra_args: tuple[str, ...] = ()   # e.g. ("-incoming", "defer")
    accel: AccelChoice | None = None   # None: choose_accel() at launch
    qemu_binary: str = QEMU_BINARY
    private_ram: bool = False          # plain -m (private, anonymous) instead of the file
    machine: str = MACHINE_TYPE        # "pc" or "q35" (an imported VM's)

    def __post_init__(self) -> None:
        if self.ram_size <= 0 or self.ram_size % PAGE_SIZE:
            raise UserError(f"RAM size {self.ram_size} is not a positive multiple of {PAGE_SIZE}")
        if self.cpus < 1:
            raise UserError(f"a VM needs at least one CPU, not {self.cpus}")

    @classmethod
    def in_directory(cls, directory: Path, name: str, ram_size: int, *,
                     ram_dir: Path | None = None, **kwargs: object) -> LaunchSpec:
        """A spec keeping sockets and logs in `directory` and RAM in `ram_dir` (default: it)."""
        ram_dir = directory if ram_dir is None else ram_dir
        return cls(name=name, ram_size=ram_size, ram_path=ram_dir / f"{name}.ram",
                   qmp_path=directory / "qmp.sock", serial_path=directory / "serial.log",
                   pidfile=directory / "qemu.pid", log_path=directory / "qemu.log",
                   **kwargs)  # type: ignore[arg-type]


def qemu_argv(spec: LaunchSpec, accel: AccelChoice) -> list[str]:
    """The full QEMU command line for `spec`: shared-file (or plain -m) RAM, QMP socket,
    serial to a file."""
    size = _size_text(spec.ram_size)
    ram = (["-machine", spec.machine, "-m", size] if spec.private_ram else [
        "-machine", f"{spec.machine},memory-backend={RAM_BACKEND_ID}",
        "-m", size,
        "-object", f"{RAM_BACKEND_TYPE},id={RAM_BACKEND_ID},size={size},"
                   f"mem-path={spec.ram_path},share=on"])
    argv = [
        spec.qemu_binary,
        "-name", spec.name,
        *ram,
        "-smp", str(spec.cpus),
        *accel.args(),
        "-display", "none", "-nodefaults", "-no-user-config",
        "-qmp", f"unix:{spec.qmp_path},server=on,wait=off",
        "-serial", f"file:{spec.serial_path}",
        "-pidfile", str(spec.pidfile),
    ]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
    if spec.append is not None:
        argv += ["-append", spec.append]
    return argv + list(spec.extra_args)


@dataclass
class QemuProcess:
    """A QEMU we started as a child (no -daemonize): its pid, paths, and how to end it."""

    spec: LaunchSpec
    accel: AccelChoice
    argv: list[str]
    _popen: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while QEMU runs, else its exit status (negative: killed by that signal)."""
        return self._popen.poll()

    def log_tail(self) -> str:
        """The end of QEMU's own output, for error messages."""
        try:
            with open(self.spec.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    async def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit; its exit status. Raises QemuError if it does not in time."""
        deadline = time.monotonic() + timeout
        while (code := self._popen.poll()) is None:
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU {self.spec.name} (pid {self.pid}) still runs after "
                                f"{timeout:g} s")
            await asyncio.sleep(POLL_INTERVAL)
        return code

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
        """SIGTERM (QEMU exits cleanly on it), then SIGKILL if it lingers; the exit status."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                return await self.wait(timeout)
            except QemuError:
                log.warning("QEMU %s ignored SIGTERM for %g s; killing it", self.spec.name,
                            timeout)
        self.kill()
        return self._popen.returncode

    def detach(self, on_exit: Callable[[], None] | None = None) -> None:
        """Let QEMU outlive this handle (and the agent): only reap it when it exits, then
        call on_exit (e.g. remove host devices that outlive QEMU)."""
        def reap() -> None:
            self._popen.wait()
            if on_exit is not None:
                on_exit()
        threading.Thread(target=reap, name=f"reap-{self.pid}", daemon=True).start()

    def kill(self) -> None:
        """SIGKILL and reap at once; safe to call any number of times (finalizers)."""
        if self._popen.poll() is None:
            self._popen.kill()
        self._popen.wait()

    def cleanup(self, *, remove_ram: bool = True) -> None:
        """Kill QEMU if needed and remove its socket, pidfile and (by default) RAM file."""
        self.kill()
        paths = [self.spec.qmp_path, self.spec.pidfile]
        if remove_ram:
            paths.append(self.spec.ram_path)
        for path in paths:
            Path(path).unlink(missing_ok=True)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _listening(path: Path) -> bool:
    """Whether a unix socket accepts connections: QEMU binds it before it listens, and a
    connect in between is refused."""
    if not _is_socket(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


async def launch(spec: LaunchSpec, *, argv: Sequence[str] | None = None,
                 timeout: float = DEFAULT_LAUNCH_TIMEOUT,
                 pass_fds: Sequence[int] = ()) -> QemuProcess:
    """Start QEMU for `spec` as a child in its own session and wait for its QMP socket.

    `argv` replaces the command line built from spec (the destination runs the checked
    argv of a migrating VM); spec still names the sockets, logs and files to watch.
    `pass_fds` are inherited by QEMU at the same numbers (tap devices for its NICs).
    """
    accel = spec.accel or choose_accel()
    argv = qemu_argv(spec, accel) if argv is None else list(argv)
    if _is_socket(spec.qmp_path):
        spec.qmp_path.unlink()  # a stale socket would look ready before QEMU is
    log.debug("starting %s", " ".join(argv))
    with open(spec.log_path, "wb") as qemu_log:
        try:
            # Own session: a Ctrl-C meant for the agent must not reach the VM (DESIGN §6).
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     pass_fds=tuple(pass_fds), env=malloc_tuning.environment())
        except OSError as exc:
            raise QemuStartError(f"cannot run {spec.qemu_binary}: {exc.strerror}") from exc
    proc = QemuProcess(spec=spec, accel=accel, argv=argv, _popen=popen)
    try:
        deadline = time.monotonic() + timeout
        while not _listening(spec.qmp_path):
            if proc.returncode is not None:
                raise QemuStartError(f"QEMU {spec.name} exited with status {proc.returncode} "
                                     f"while starting: {proc.log_tail() or '(no output)'}")
            if time.monotonic() > deadline:
                raise QemuStartError(f"QEMU {spec.name} opened no QMP socket at "
                                     f"{spec.qmp_path} within {timeout:g} s")
            await asyncio.sleep(POLL_INTERVAL)
    except BaseException:
        proc.kill()  # never leave a half-started QEMU behind, even when cancelled
        raise
    return proc

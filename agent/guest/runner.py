"""Booting the test guest in a migratable QEMU and watching it through its RAM file."""

from __future__ import annotations

import asyncio
import mmap
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import QemuError
from agent.guest.build import build_guest
from agent.guest.mailbox import GuestConfig, MailboxState, read_mailbox, write_config
from agent.qemu import vm

# 64 MiB + 8 KiB: QEMU < 9.0 under TCG loses dirty pages of a block of 64-page multiples.
DEFAULT_RAM_SIZE = (64 << 20) + vm.TCG_RAM_PADDING
DEFAULT_NAME = "ferry-guest"
# Boot (SeaBIOS, multiboot, 50 ms clock calibration) takes ~0.2 s under TCG here.
BOOT_TIMEOUT = 10.0
# The boot-time fill runs at several hundred MiB/s under TCG; allow for a slow host.
FILL_PAGES_PER_SECOND_FLOOR = 10_000
POLL_INTERVAL = 0.005


def default_ram_dir() -> Path:
    """tmpfs (/dev/shm) when we may write there: RAM files there cost no disk I/O."""
    if vm.SHM_DIR.is_dir() and os.access(vm.SHM_DIR, os.W_OK):
        return vm.SHM_DIR
    return Path(os.environ.get("TMPDIR", "/tmp"))


@dataclass
class RunningGuest:
    """A booted test guest: its QEMU, a read-write mapping of its RAM, and its mailbox."""

    process: vm.QemuProcess
    ram: mmap.mmap
    config: GuestConfig

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def qmp_path(self) -> Path:
        return self.process.spec.qmp_path

    @property
    def ram_path(self) -> Path:
        return self.process.spec.ram_path

    @property
    def ram_size(self) -> int:
        return self.process.spec.ram_size

    def mailbox(self) -> MailboxState:
        return read_mailbox(self.ram)

    def set_config(self, config: GuestConfig) -> None:
        """Change the working set or rate; the guest takes it at its next pass."""
        write_config(self.ram, config)

    def _check_alive(self, what: str) -> None:
        if self.process.returncode is not None:
            raise QemuError(f"QEMU exited with status {self.process.returncode} while "
                            f"waiting for {what}: {self.process.log_tail() or '(no output)'}")

    def wait_until(self, until: Callable[[MailboxState], bool], *, timeout: float,
                   what: str = "the guest") -> MailboxState:
        """Poll the mailbox until `until(state)`; QemuError on timeout or if QEMU exits."""
        deadline = time.monotonic() + timeout
        while not until(state := self.mailbox()):
            self._check_alive(what)
            if time.monotonic() > deadline:
                raise QemuError(f"timed out after {timeout:g} s waiting for {what}; "
                                f"mailbox: {state}")
            time.sleep(POLL_INTERVAL)
        return state

    async def wait_for(self, until: Callable[[MailboxState], bool], *, timeout: float,
                       what: str = "the guest") -> MailboxState:
        """wait_until for asyncio code."""
        deadline = time.monotonic() + timeout
        while not until(state := self.mailbox()):
            self._check_alive(what)
            if time.monotonic() > deadline:
                raise QemuError(f"timed out after {timeout:g} s waiting for {what}; "
                                f"mailbox: {state}")
            await asyncio.sleep(POLL_INTERVAL)
        return state

    def close(self) -> None:
        """Kill QEMU and remove its RAM file, socket and pidfile; safe to call twice."""
        try:
            self.process.cleanup()
        finally:
            if not self.ram.closed:
                self.ram.close()


def _create_ram_file(path: Path, size: int) -> mmap.mmap:
    """A zeroed RAM file of `size` bytes (QEMU uses it as is), mapped shared read-write."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


async def boot_guest(directory: Path, *, config: GuestConfig | None = None,
                     ram_size: int = DEFAULT_RAM_SIZE, ram_dir: Path | None = None,
                     name: str = DEFAULT_NAME, accel: vm.AccelChoice | None = None,
                     cpus: int = 1, extra_args: Sequence[str] = (), wait: bool = True,
                     timeout: float | None = None) -> RunningGuest:
    """Start the test guest with its RAM in a fresh shared file; by default wait until it runs.

    Sockets and logs go to `directory`; the RAM file to `ram_dir` (default /dev/shm).
    The caller must close() the result; on any failure here everything is cleaned up.
    """
    config = config or GuestConfig()
    kernel = build_guest(config)
    ram_dir = ram_dir or default_ram_dir()
    # A unique RAM file name: several guests (and test runs) share /dev/shm.
    ram_path = ram_dir / f"{name}-{os.getpid()}-{secrets.token_hex(4)}.ram"
    spec = vm.LaunchSpec(name=name, ram_size=ram_size, ram_path=ram_path,
                         qmp_path=directory / "qmp.sock", serial_path=directory / "serial.log",
                         pidfile=directory / "qemu.pid", log_path=directory / "qemu.log",
                         cpus=cpus, kernel=kernel, extra_args=tuple(extra_args), accel=accel)
    ram = _create_ram_file(ram_path, ram_size)
    try:
        process = await vm.launch(spec)
    except BaseException:
        ram.close()
        ram_path.unlink(missing_ok=True)
        raise
    guest = RunningGuest(process=process, ram=ram, config=config)
    try:
        if wait:
            if timeout is None:
                timeout = BOOT_TIMEOUT + config.fill_pages / FILL_PAGES_PER_SECOND_FLOOR
            await guest.wait_for(lambda s: s.running, timeout=timeout,
                                 what="the test guest to boot")
    except BaseException:
        guest.close()
        raise
    return guest

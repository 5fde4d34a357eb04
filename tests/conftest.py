"""Shared fixtures: booting the self-checking test guest in a real QEMU, always cleaned up."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.guest import RunningGuest, boot_guest
from agent.qemu import vm

# AF_UNIX paths must fit in sun_path (108 bytes); keep a margin for QEMU's own checks.
MAX_SOCKET_PATH = 100
QEMU_TOOLS = (vm.QEMU_BINARY, "as", "ld")
SHM_BEFORE = pytest.StashKey[set[str]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.stash[SHM_BEFORE] = _shm_entries()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if tests left anything in /dev/shm: RAM files there are host memory."""
    before = session.stash.get(SHM_BEFORE, None)
    if before is None:
        return
    left = sorted(_shm_entries() - before)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("!", f"tests left these in {vm.SHM_DIR}: {', '.join(left)}",
                               red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _shm_entries() -> set[str]:
    try:
        return {entry.name for entry in vm.SHM_DIR.iterdir()}
    except OSError:
        return set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip @pytest.mark.qemu tests, saying why, where QEMU or binutils are missing."""
    missing = [tool for tool in QEMU_TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"needs {', '.join(missing)} (make setup installs them)")
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def vm_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for one test's QEMU sockets and logs, short enough for a unix socket."""
    if len(str(tmp_path / "vm00" / "qmp.sock")) <= MAX_SOCKET_PATH:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="ferry-"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def start_guest(vm_dir: Path) -> Iterator[Callable[..., RunningGuest]]:
    """Factory booting test guests (keywords as agent.guest.boot_guest); each is killed and
    its RAM file, socket and pidfile removed at teardown, whatever the test did."""
    with contextlib.ExitStack() as cleanup:   # runs every close() even if one fails
        count = 0

        def start(**kwargs: Any) -> RunningGuest:
            nonlocal count
            directory = vm_dir / f"vm{count:02d}"
            count += 1
            directory.mkdir()
            guest = asyncio.run(boot_guest(directory, **kwargs))
            cleanup.callback(guest.close)
            return guest

        yield start


@pytest.fixture
def guest(start_guest: Callable[..., RunningGuest]) -> RunningGuest:
    """One running test guest with the default config (64 MiB, 256 pages at 2000 pages/s)."""
    return start_guest()


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Factory mounting a tmpfs with the given `-o` options in a fresh directory (root
    only: the test is skipped where mount is refused); all unmounted at teardown."""
    points: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"tmpfs{len(points)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        points.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(points):
            subprocess.run(["umount", "-l", str(point)], check=False)

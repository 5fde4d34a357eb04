"""The destination's errors when QEMU's socket or the RAM file fails: they say what happened."""

from __future__ import annotations

import array
import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.batch import codec
from agent.errors import LocalError, QemuError
from agent.migration.destination import DestinationJob, IncomingVm, apply_pages
from agent.qemu.vmspec import PAGE_SIZE
from agent.state.config import AgentConfig


class StubQemu:
    """A QEMU process that exits with `status` (None: keeps running past any wait)."""

    def __init__(self, status: int | None) -> None:
        self.status = status

    async def wait(self, timeout: float) -> int:
        if self.status is None:
            raise QemuError(f"still runs after {timeout:g} s")
        return self.status

    def log_tail(self) -> str:
        return "qemu: the last lines of its log"


def stream_failure(tmp_path: Path, status: int | None) -> QemuError:
    job = DestinationJob(config=AgentConfig(home=tmp_path, ram_dir=tmp_path),
                         link=None, peer="hosta", job_id="0123456789ab")  # type: ignore[arg-type]
    job.incoming = IncomingVm(spec=SimpleNamespace(), paths=SimpleNamespace(),  # type: ignore[arg-type]
                              process=StubQemu(status))  # type: ignore[arg-type]
    return asyncio.run(job._stream_failed(ConnectionResetError(104, "Connection reset by peer")))


def test_a_socket_failure_because_qemu_died_says_it_exited(tmp_path: Path) -> None:
    error = stream_failure(tmp_path, -9)
    assert str(error) == ("destination QEMU exited with status -9: "
                          "qemu: the last lines of its log")


def test_a_socket_failure_while_qemu_runs_names_the_socket_error(tmp_path: Path) -> None:
    error = stream_failure(tmp_path, None)
    assert "migration socket failed (Connection reset by peer) while QEMU still runs" in str(error)
    assert "last lines of its log" in str(error)


def test_pages_that_cannot_be_written_name_the_ram_file(tmp_path: Path) -> None:
    npages = 4
    sent = bytearray(codec.zero_block_hash(PAGE_SIZE) * npages)
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    encoder = codec.BatchEncoder(None, PAGE_SIZE, sent, compress_level=None)
    batch, _ = encoder.encode(memoryview(array.array("Q", [1])), src=page,
                              offsets=memoryview(array.array("Q", [0])))
    ram_path = tmp_path / "vm.ram"
    ram_path.write_bytes(bytes(npages * PAGE_SIZE))
    fd = os.open(ram_path, os.O_RDONLY)   # pwrite fails as on a full tmpfs: EBADF here
    try:
        incoming = IncomingVm(spec=SimpleNamespace(npages=npages),  # type: ignore[arg-type]
                              paths=SimpleNamespace(ram_path=ram_path),  # type: ignore[arg-type]
                              ram_fd=fd, ram=bytearray(npages * PAGE_SIZE))  # type: ignore[arg-type]
        with pytest.raises(LocalError, match=rf"RAM file {ram_path}: Bad file descriptor$"):
            apply_pages(incoming, bytes(batch.payload))
    finally:
        os.close(fd)


@pytest.mark.parametrize("huge", [False, True], ids=["pwrite", "mapped"])
def test_a_full_tmpfs_is_an_error_naming_the_file_not_a_crash(mount_tmpfs, huge: bool) -> None:
    """More pages than the tmpfs holds: written by pwrite or copied in through the mapping
    (a huge-page ram_dir), the batch fails with ENOSPC naming the file, never a SIGBUS."""
    import mmap
    import random
    npages = 512                                    # 2 MiB into a 1 MiB tmpfs
    rng = random.Random(3)
    guest = rng.randbytes(npages * PAGE_SIZE)
    sent = bytearray(codec.zero_block_hash(PAGE_SIZE) * npages)
    encoder = codec.BatchEncoder(guest, PAGE_SIZE, sent, compress_level=None)
    ram_path = mount_tmpfs("size=1m") / "vm.ram"
    fd = os.open(ram_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, npages * PAGE_SIZE)
        with mmap.mmap(fd, npages * PAGE_SIZE) as ram:
            incoming = IncomingVm(spec=SimpleNamespace(npages=npages),  # type: ignore[arg-type]
                                  paths=SimpleNamespace(ram_path=ram_path),  # type: ignore[arg-type]
                                  ram_fd=fd, ram=ram, ram_huge=huge)
            with pytest.raises(LocalError,
                               match=rf"RAM file {ram_path}: No space left on device$"):
                position = 0
                while position < npages:
                    batch, position = encoder.encode(array.array("Q", range(npages)), position)
                    apply_pages(incoming, bytes(batch.payload))
    finally:
        os.close(fd)

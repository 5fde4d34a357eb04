"""Live storage migration end to end: a VM with a qcow2 and a raw disk, written to while
it migrates, arrives with both disks exactly as they were when the source stopped."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import QemuError
from agent.guest import GuestConfig
from agent.guest.build import default_cache_dir
from agent.qemu import qmp
from agent.qemu.vm import TCG_RAM_PADDING
from agent.storage.disk_sink import SPACE_MARGIN
from tests.agents import AgentPair, pid_alive, read_guest

pytestmark = pytest.mark.qemu

MIB = 1 << 20
# QEMU < 9.0 under TCG loses dirty pages of a RAM block of 64-page multiples (DESIGN §7).
PAD = TCG_RAM_PADDING
QCOW2_SIZE = 96 * MIB
RAW_SIZE = 48 * MIB + 12 * 1024   # not a whole number of 64 KiB blocks


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fys-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agents(root: Path) -> Iterator[AgentPair]:
    (root / "target").mkdir()
    pair = AgentPair.create(root, allow=(default_cache_dir(), root / "target"))
    try:
        pair.start()
        yield pair
    finally:
        pair.cleanup()


def make_disks(root: Path) -> tuple[Path, Path]:
    """A qcow2 and a raw image with random data, a repeated pattern (dedup), zeroed ranges,
    holes, and a raw size that is not a whole number of 64 KiB blocks."""
    src = root / "src"
    src.mkdir()
    qcow2, raw = src / "d0.qcow2", src / "d1.img"
    seed = src / "seed.img"
    with open(seed, "wb") as f:
        f.truncate(QCOW2_SIZE)
        f.write(os.urandom(8 * MIB))
        f.seek(40 * MIB)
        f.write(os.urandom(MIB))
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(seed), str(qcow2)], check=True)
    seed.unlink()
    with open(raw, "wb") as f:
        f.truncate(RAW_SIZE)
        f.seek(MIB)
        f.write(os.urandom(3 * MIB))
    for image, fmt, cmd in ((qcow2, "qcow2", "write -P 0x22 16M 4M"),
                            (qcow2, "qcow2", "write -z 24M 4M"),
                            (raw, "raw", f"write -P 0x44 {RAW_SIZE - 12 * 1024} 12k")):
        subprocess.run(["qemu-io", "-f", fmt, "-c", cmd, str(image)], check=True,
                       capture_output=True)
    return qcow2, raw


def disk_args(qcow2: Path, raw: Path, writer_sock: Path) -> tuple[str, ...]:
    return ("-drive", f"file={qcow2},format=qcow2,if=none,id=d0",
            "-device", "virtio-blk-pci,drive=d0,id=vd0",
            "-blockdev", f"driver=file,filename={raw},node-name=f1",
            "-blockdev", "driver=raw,file=f1,node-name=n1",
            "-device", "virtio-blk-pci,drive=n1,id=vd1",
            "-chardev", f"socket,id=wq,path={writer_sock},server=on,wait=off",
            "-mon", "chardev=wq,mode=control")


class DiskWriter(threading.Thread):
    """Writes 64 KiB patterns through the block layer (HMP qemu-io) while the VM runs."""

    def __init__(self, sock: Path) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.stop = threading.Event()
        self.log: list[tuple[str, int, int]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._write())
        except BaseException as exc:  # reported by the test
            self.error = exc

    async def _write(self) -> None:
        targets = (("/machine/peripheral/vd0/virtio-backend", QCOW2_SIZE),
                   ("/machine/peripheral/vd1/virtio-backend", RAW_SIZE))
        async with qmp.connect(self.sock) as monitor:
            n = 0
            while not self.stop.is_set():
                status = (await monitor.execute("query-status"))["status"]
                if status != "running":
                    return
                device, size = targets[n % 2]
                offset = (n * 7919 * 65536) % (size - 65536) // 65536 * 65536
                pattern = 1 + n % 250
                try:
                    await monitor.hmp(f'qemu-io -d {device} "write -P {pattern} {offset} 64k"')
                except QemuError:
                    return  # the VM stopped for the switchover
                self.log.append((device, offset, pattern))
                n += 1
                await asyncio.sleep(0.005)


def compare(a: Path, b: Path, fmt_a: str, fmt_b: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
                          capture_output=True, text=True, check=False)


def test_vm_with_two_disks_migrates_live(agents, start_guest, root) -> None:
    qcow2, raw = make_disks(root)
    writer_sock = root / "w.sock"
    guest = start_guest(config=GuestConfig(ws_pages=2000, rate=2000), ram_size=64 * MIB + PAD,
                        name="stor", extra_args=disk_args(qcow2, raw, writer_sock))
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the first pass")
    writer = DiskWriter(writer_sock)
    writer.start()
    time.sleep(0.5)  # writes before and during the migration
    t0, t1 = root / "target" / "d0.qcow2", root / "target" / "d1.img"
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path), "--bandwidth", "40M",
                                        "--disk-map", f"{qcow2}={t0}", "--disk-map",
                                        f"{raw}={t1}")
    writer.stop.set()
    writer.join(10)
    assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
    assert writer.error is None and len(writer.log) > 10, writer.error
    assert report["disk_bytes"] > 11 * MIB and len(report["disks"]) == 2
    assert all(d["rounds"] >= 2 for d in report["disks"]), report["disks"]
    # The disks' last round ran in QEMU's pre-switchover pause, before the device state.
    marks = report["switchover_ms"]
    assert {"pre_switchover", "continued", "disks_sent", "ram_sent"} <= set(marks), marks
    assert marks["pre_switchover"] <= marks["continued"] <= marks["disks_sent"]
    # The source QEMU quit; its images are the content at the moment it stopped.
    deadline = time.monotonic() + 10
    while guest.process.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for src, dst, fmt in ((qcow2, t0, "qcow2"), (raw, t1, "raw")):
        result = compare(src, dst, fmt, fmt)
        assert result.returncode == 0, f"{src} vs {dst}: {result.stdout}{result.stderr}"
    # And the writer's writes are there: each 64 KiB it wrote holds its last pattern.
    t0_raw = root / "t0.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(t0), str(t0_raw)], check=True)
    last = {(device, offset): pattern for device, offset, pattern in writer.log}
    images = {"/machine/peripheral/vd0/virtio-backend": t0_raw,
              "/machine/peripheral/vd1/virtio-backend": t1}
    for (device, offset), pattern in last.items():
        with open(images[device], "rb") as f:
            f.seek(offset)
            assert f.read(65536) == bytes([pattern]) * 65536, (device, offset, pattern)
    assert subprocess.run(["qemu-img", "info", "-U", "--output=json", str(t0)],
                          capture_output=True, text=True, check=True).stdout.count('"qcow2"')
    # The destination runs the guest, with no bitmap or export of ours left behind.
    record = agents.b.vm_record("stor")
    assert pid_alive(record.pid) and read_guest(record.ram_path).errors == 0
    leftovers = asyncio.run(_bitmaps_and_exports(Path(record.qmp_path)))
    assert leftovers == ([], []), leftovers


async def _bitmaps_and_exports(qmp_path: Path) -> tuple[list, list]:
    async with qmp.connect(qmp_path) as monitor:
        bitmaps = [b for blk in await monitor.execute("query-block")
                   for b in (blk.get("inserted") or {}).get("dirty-bitmaps", [])]
        exports = await monitor.execute("query-block-exports")
    return bitmaps, exports


def test_disk_format_conversion_raw_to_qcow2(agents, start_guest, root) -> None:
    _, raw = make_disks(root)
    guest = start_guest(config=GuestConfig(ws_pages=100), ram_size=64 * MIB + PAD, name="stor",
                        extra_args=("-drive", f"file={raw},format=raw,if=virtio"))
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the first pass")
    target = root / "target" / "d1.qcow2"
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path), "--disk-format", "qcow2",
                                        "--disk-map", f"{raw}={target}")
    assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
    assert compare(raw, target, "raw", "qcow2").returncode == 0


def test_shared_storage_copies_nothing_and_the_destination_opens_the_same_image(
        agents, start_guest, root) -> None:
    image = root / "target" / "shared.qcow2"   # inside the destination's allowed paths
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(image)],
                   check=True, capture_output=True)
    guest = start_guest(config=GuestConfig(ws_pages=100), ram_size=64 * MIB + PAD, name="stor",
                        extra_args=("-drive", f"file={image},format=qcow2,if=virtio"))
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the first pass")
    rc, report, stderr = agents.migrate("--qmp", str(guest.qmp_path), "--storage", "shared")
    assert rc == 0, f"{report}\n{stderr}\n{agents.logs()}"
    assert report["disk_bytes"] == 0 and report["disks"] == []
    record = agents.b.vm_record("stor")
    assert pid_alive(record.pid) and read_guest(record.ram_path).errors == 0

    async def write_from_destination() -> str:
        """The file the destination QEMU's disk is, after writing to it through that QEMU."""
        async with qmp.connect(Path(record.qmp_path)) as monitor:
            [block] = [b for b in await monitor.execute("query-block") if b.get("inserted")]
            device = block["device"] or block["qdev"]
            await monitor.hmp(f'qemu-io {device} "write -P 0x6b 4M 1M"')
            await monitor.hmp(f'qemu-io {device} "flush"')  # qcow2 metadata to the file
            return str(block["inserted"]["file"])

    assert asyncio.run(write_from_destination()) == str(image)
    # Both the data written before the migration and the destination's write are in the one
    # image (-U: the destination QEMU holds it open).
    for pattern, at, length in ((0x5A, "1M", "2M"), (0x6B, "4M", "1M")):
        said = subprocess.run(["qemu-io", "-U", "-r", "-f", "qcow2", "-c",
                               f"read -P {pattern} {at} {length}", str(image)],
                              capture_output=True, text=True, check=True).stdout
        assert "verification failed" not in said and "read " in said, said


# ---------------------------------------------------------------------------- rollback, refusals

def boot_with_disks(start_guest, root: Path, *extra: str):
    qcow2, raw = make_disks(root)
    writer_sock = root / "w.sock"
    guest = start_guest(config=GuestConfig(ws_pages=500, rate=2000), ram_size=64 * MIB + PAD,
                        name="stor", extra_args=(*disk_args(qcow2, raw, writer_sock), *extra))
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the first pass")
    return guest, qcow2, raw, writer_sock


def source_leftovers(guest) -> tuple[list, list]:
    """Bitmaps and exports on the source QEMU once the agent let go of its monitor."""
    return asyncio.run(_bitmaps_and_exports(guest.qmp_path))


def test_destination_qemu_killed_during_disk_copy_rolls_back(agents, start_guest, root):
    import os
    import signal

    guest, qcow2, raw, _ = boot_with_disks(start_guest, root)
    before = {p: p.read_bytes() if p.suffix == ".img" else None for p in (raw,)}
    t0, t1 = root / "target" / "d0.qcow2", root / "target" / "d1.img"
    proc = agents.popen_migrate("--qmp", str(guest.qmp_path), "--bandwidth", "4M",
                                "--disk-map", f"{qcow2}={t0}", "--disk-map", f"{raw}={t1}")
    deadline = time.monotonic() + 30
    while (pid := agents.b.incoming_pid("stor")) is None:
        assert time.monotonic() < deadline, agents.logs()
        time.sleep(0.02)
    time.sleep(1.0)  # RAM round 0 (~9 MiB at 4 MB/s) is under way, disks next
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, f"{out}\n{err}"
    assert guest.process.returncode is None and guest.mailbox().errors == 0
    assert raw.read_bytes() == before[raw]          # the guest did not write; neither did we
    assert source_leftovers(guest) == ([], [])
    deadline = time.monotonic() + 10
    while t0.exists() or t1.exists():
        assert time.monotonic() < deadline, "destination images left behind"
        time.sleep(0.05)


@pytest.fixture
def small_target(agents: AgentPair, root: Path) -> Iterator[Path]:
    """root/target as a tmpfs just big enough to pass the space check for the two disks
    of make_disks: a disk that fills up after the check, as a real one can."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run the suite as root (CI does)")
    target = root / "target"
    size = QCOW2_SIZE + RAW_SIZE + 2 * SPACE_MARGIN + 4 * MIB
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "ferry-test", str(target)],
                   check=True)
    try:
        yield target
    finally:
        # Lazy: a QEMU that still holds an image open must not keep the mount alive.
        subprocess.run(["umount", "-l", str(target)], check=False)


def fill_up(path: Path, leave: int) -> None:
    """Take all but `leave` bytes of path's file system (which the destination is writing
    to at the same time: measure again when it took some in between)."""
    with open(path, "wb") as f:
        for _ in range(20):
            want = shutil.disk_usage(path.parent).free - leave
            try:
                os.posix_fallocate(f.fileno(), f.seek(0, os.SEEK_END), max(want, 0))
                return
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    raise AssertionError(f"could not fill {path.parent}")


def test_destination_disk_full_mid_way_rolls_back(agents, start_guest, root, small_target):
    guest, qcow2, raw, _ = boot_with_disks(start_guest, root)
    before = raw.read_bytes()
    t0, t1 = small_target / "d0.qcow2", small_target / "d1.img"
    proc = agents.popen_migrate("--qmp", str(guest.qmp_path), "--bandwidth", "8M",
                                "--disk-map", f"{qcow2}={t0}", "--disk-map", f"{raw}={t1}")
    # The space check has passed once the images exist; now the disk fills up, leaving
    # less than the ~12 MiB of data the two disks hold. RAM goes first (~9 MiB at 8 MB/s),
    # so the filler wins the race by a wide margin.
    try:
        deadline = time.monotonic() + 30
        while not (t0.exists() and t1.exists()):
            assert time.monotonic() < deadline and proc.poll() is None, agents.logs()
            time.sleep(0.01)
        fill_up(small_target / "filler", leave=2 * MIB)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, f"{out}\n{err}\n{agents.logs()}"
    error = json.loads(out)["error"]
    assert "no space left on the destination" in error and str(small_target) in error, error
    # Nothing lost: the source runs on, its disks untouched, with nothing of ours left in
    # its QEMU; the destination removed its images and kept nothing running.
    assert guest.process.returncode is None and guest.mailbox().errors == 0
    assert raw.read_bytes() == before
    assert source_leftovers(guest) == ([], [])
    deadline = time.monotonic() + 10
    while t0.exists() or t1.exists() or agents.b.leftovers():
        assert time.monotonic() < deadline, (list(small_target.iterdir()), agents.b.leftovers())
        time.sleep(0.05)


def test_disk_target_outside_allowed_paths_is_refused(agents, start_guest, root) -> None:
    guest, qcow2, raw, _ = boot_with_disks(start_guest, root)
    rc, report, _ = agents.migrate("--qmp", str(guest.qmp_path),
                                   "--disk-map", f"{qcow2}={root / 'elsewhere' / 'd0.qcow2'}",
                                   "--disk-map", f"{raw}={root / 'target' / 'd1.img'}")
    assert rc == 1 and "outside the destination's allowed paths" in report["error"]
    assert guest.process.returncode is None
    assert source_leftovers(guest) == ([], [])
    assert not any((root / "target").iterdir())


def test_disk_that_does_not_fit_is_refused_before_copying(agents, start_guest, root) -> None:
    huge = root / "huge.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(huge), "64T"], check=True)
    guest = start_guest(config=GuestConfig(ws_pages=100), ram_size=64 * MIB + PAD, name="stor",
                        extra_args=("-drive", f"file={huge},format=qcow2,if=virtio"))
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the first pass")
    rc, report, _ = agents.migrate("--qmp", str(guest.qmp_path), "--disk-map",
                                   f"{huge}={root / 'target' / 'huge.qcow2'}")
    assert rc == 1 and "not enough space for disk" in report["error"]
    assert not any((root / "target").iterdir())


def test_disk_format_ferry_cannot_copy_is_refused(agents, start_guest, root) -> None:
    vmdk = root / "d.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "16M"], check=True)
    guest = start_guest(config=GuestConfig(ws_pages=100), ram_size=64 * MIB + PAD, name="stor",
                        extra_args=("-drive", f"file={vmdk},format=vmdk,if=virtio"))
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the first pass")
    rc, report, _ = agents.migrate("--qmp", str(guest.qmp_path))
    assert rc == 1 and "ferry copies qcow2 and raw" in report["error"]
    assert agents.b.leftovers() == []


def test_disk_in_use_by_a_block_job_is_refused(agents, start_guest, root) -> None:
    guest, qcow2, raw, writer_sock = boot_with_disks(start_guest, root)

    async def start_job() -> None:
        async with qmp.connect(writer_sock) as monitor:
            await monitor.execute("drive-mirror", {
                "device": "d0", "target": str(root / "mirror.qcow2"), "format": "qcow2",
                "sync": "full", "mode": "absolute-paths", "speed": 1, "job-id": "slow"})

    async def cancel_job() -> None:
        async with qmp.connect(writer_sock) as monitor:
            await monitor.execute("block-job-cancel", {"device": "slow", "force": True})

    asyncio.run(start_job())
    try:
        rc, report, _ = agents.migrate("--qmp", str(guest.qmp_path), "--disk-map",
                                       f"{qcow2}={root / 'target' / 'a'}", "--disk-map",
                                       f"{raw}={root / 'target' / 'b'}")
        assert rc == 1 and "in use by a block job" in report["error"]
        assert agents.b.leftovers() == []
    finally:
        asyncio.run(cancel_job())


def test_plan_targets_names_a_missing_directory(tmp_path) -> None:
    from agent.errors import UserError
    from agent.qemu.vmspec import DiskSpec
    from agent.storage.disk_sink import plan_targets

    disk = DiskSpec(0, "/src/d.qcow2", "qcow2", MIB, "#block1")
    with pytest.raises(UserError, match="does not exist on the destination"):
        plan_targets((disk,), {"/src/d.qcow2": str(tmp_path / "no" / "d.qcow2")}, None,
                     (tmp_path,))


def test_plan_targets_points_an_existing_target_to_shared_storage_or_a_map(tmp_path) -> None:
    from agent.errors import UserError
    from agent.qemu.vmspec import DiskSpec
    from agent.storage.disk_sink import plan_targets

    existing = tmp_path / "d.qcow2"
    existing.write_bytes(b"")
    disk = DiskSpec(0, str(existing), "qcow2", MIB, "#block1")
    with pytest.raises(UserError, match="use --storage shared; else copy it elsewhere with "
                                        f"--disk-map {existing}=NEW_PATH"):
        plan_targets((disk,), {}, None, (tmp_path,))

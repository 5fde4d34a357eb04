"""The write cap that makes a disk copy converge: the policy on its own, and the cap set
on a real QEMU's devices (a -drive with limits of its own, a -blockdev without) and put
back exactly as it was."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.guest import GuestConfig
from agent.migration import recovery
from agent.qemu import qmp
from agent.qemu.vm import TCG_RAM_PADDING
from agent.state import journal
from agent.state.config import AgentConfig
from agent.storage.disk_throttle import LIMITS, MIN_WRITE_OPS, WriteThrottle, disk_write_cap

MIB = 1 << 20
GRANULE = 64 << 10


# ---------------------------------------------------------------------------- policy

def test_a_final_round_that_fits_the_pause_needs_no_cap() -> None:
    # 5 MiB left at 50 MiB/s: 0.1 s, inside a 0.2 s share of the pause.
    assert disk_write_cap(5 * MIB, None, 1.0, 50 * MIB, 0.2, GRANULE, None) is None
    assert disk_write_cap(5 * MIB, None, 1.0, 50 * MIB, 0.2, GRANULE, 40) == 40


def test_rounds_that_still_shrink_keep_their_cap() -> None:
    # 40 MiB left (0.8 s) but down from 80: the copy converges as it is.
    assert disk_write_cap(40 * MIB, 80 * MIB, 1.0, 50 * MIB, 0.2, GRANULE, None) is None


def test_scattered_small_writes_are_capped_below_the_copy_rate() -> None:
    # 4 KiB writes dirtying 1280 granules (80 MiB) a second against a 50 MiB/s copy: the
    # guest may dirty at most half the copy rate.
    ops = disk_write_cap(80 * MIB, None, 1.0, 50 * MIB, 0.2, GRANULE, None)
    assert ops == int(50 * MIB / GRANULE / 2)
    # A guest dirtying less than that is held at half of what it did.
    assert disk_write_cap(20 * MIB, 20 * MIB, 1.0, 50 * MIB, 0.2, GRANULE, None) == 160


def test_a_cap_that_did_not_help_is_halved() -> None:
    assert disk_write_cap(30 * MIB, 30 * MIB, 1.0, 50 * MIB, 0.2, GRANULE, 200) == 100


@pytest.mark.parametrize("rate, round_s, dirty", [(0.0, 1.0, MIB), (1e6, 0.0, MIB),
                                                  (1e6, 1.0, 0)])
def test_nothing_measured_changes_nothing(rate: float, round_s: float, dirty: int) -> None:
    assert disk_write_cap(dirty, None, round_s, rate, 0.2, GRANULE, 7) == 7


# ---------------------------------------------------------------------------- on QEMU

async def _limits(monitor: qmp.Qmp) -> dict[str, dict[str, Any]]:
    return {b["inserted"]["node-name"]: {k: b["inserted"].get(k) for k in
                                         (*LIMITS, "iops_size", "bps_max")}
            for b in await monitor.execute("query-block") if b.get("inserted")
            and not str(b.get("qdev", "")).startswith("/machine/system.flash")}


async def _read_limits(sock: Path) -> dict[str, dict[str, Any]]:
    async with qmp.connect(sock) as monitor:
        return await _limits(monitor)


async def _cap_and_release(sock: Path, node: str, ops: int) -> tuple[dict, dict, int | None]:
    async with qmp.connect(sock) as monitor:
        throttle = WriteThrottle(monitor, node, GRANULE)
        await throttle.cap(ops)
        capped = await _limits(monitor)
        await throttle.cap(ops // 2)
        await throttle.release()
        return capped, await _limits(monitor), throttle.lowest


@pytest.mark.qemu
def test_the_cap_lowers_writes_only_and_release_puts_the_devices_limits_back(
        start_guest, tmp_path: Path) -> None:
    images = []
    for name in ("d0.qcow2", "d1.img"):
        image = tmp_path / name
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2" if name.endswith("qcow2")
                        else "raw", str(image), "16M"], check=True)
        images.append(image)
    guest = start_guest(config=GuestConfig(ws_pages=100, rate=100),
                        ram_size=32 * MIB + TCG_RAM_PADDING, name="thr", extra_args=(
        # The -drive has limits of its own (a lower byte rate for writes than ours).
        "-drive", f"file={images[0]},format=qcow2,if=none,id=d0,node-name=n0,"
                  "throttling.iops-total=5000,throttling.bps-write=1000000,"
                  "throttling.iops-size=8192",
        "-device", "virtio-blk-pci,drive=d0,id=vd0",
        # The -blockdev has no backend name: found by its device's qdev.
        "-blockdev", f"driver=file,filename={images[1]},node-name=f1",
        "-blockdev", "driver=raw,file=f1,node-name=n1",
        "-device", "virtio-blk-pci,drive=n1,id=vd1"))
    before = asyncio.run(_read_limits(guest.qmp_path))
    assert before["n0"]["iops"] == 5000 and before["n1"]["iops_wr"] == 0

    capped, after, lowest = asyncio.run(_cap_and_release(guest.qmp_path, "n0", 100))
    # QEMU takes no write limit beside a total one: the total is capped instead.
    assert capped["n0"]["iops"] == 100 and capped["n0"]["iops_wr"] == 0
    assert capped["n0"]["bps_wr"] == 1000000          # the device's own, lower limit kept
    assert capped["n0"]["iops_size"] == 8192
    assert capped["n1"] == before["n1"]               # the other disk untouched
    assert after == before and lowest == 50

    capped, after, _ = asyncio.run(_cap_and_release(guest.qmp_path, "n1", 1))
    assert capped["n1"]["iops_wr"] == MIN_WRITE_OPS
    assert capped["n1"]["bps_wr"] == MIN_WRITE_OPS * GRANULE
    assert after == before
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the guest to keep running")


async def _stop_and_cap(sock: Path, node: str) -> dict[str, Any]:
    async with qmp.connect(sock) as monitor:
        throttle = WriteThrottle(monitor, node, GRANULE)
        await throttle.prepare()
        undo = throttle.restore_args()
        await throttle.cap(50)
        await monitor.execute("stop")
        return undo


@pytest.mark.qemu
def test_a_restarted_agent_lifts_the_cap_of_a_job_its_crash_left(start_guest,
                                                                 tmp_path: Path) -> None:
    """The source agent died in pre-copy with a disk capped: recovery resumes the VM and
    puts the device's own limits back, from what the job journaled before capping."""
    image = tmp_path / "d0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    guest = start_guest(config=GuestConfig(ws_pages=100, rate=100),
                        ram_size=32 * MIB + TCG_RAM_PADDING, name="thr", extra_args=(
        "-drive", f"file={image},format=qcow2,if=none,id=d0,node-name=n0,"
                  "throttling.bps-read=3000000",
        "-device", "virtio-blk-pci,drive=d0,id=vd0"))
    before = asyncio.run(_read_limits(guest.qmp_path))
    undo = asyncio.run(_stop_and_cap(guest.qmp_path, "n0"))
    assert asyncio.run(_read_limits(guest.qmp_path))["n0"]["iops_wr"] == 50
    config = AgentConfig(home=tmp_path / "home", ram_dir=tmp_path)
    journal.write(config, journal.Entry(job="j1", role="source", step=journal.Step.PRECOPY,
                                        vm="thr", qmp_path=str(guest.qmp_path), peer="hostb",
                                        disk_limits=[undo]))
    assert asyncio.run(recovery.recover(config)) == []
    assert asyncio.run(_read_limits(guest.qmp_path)) == before
    assert journal.entries(config) == []
    before_pass = guest.mailbox().passes
    guest.wait_until(lambda s: s.passes > before_pass, timeout=30,
                     what="the resumed guest to go on")

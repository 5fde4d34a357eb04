"""`make demo`: a real live migration of the test guest, with a local disk, between two
agents on this machine.

Two agents (own homes, ports on loopback, trusting each other) run as processes; the
guest is started with `ferry vm start --ram private` on the first (plain -m RAM, as
libvirt starts VMs), with a qcow2 disk, and moved with `ferry migrate` while it rewrites
memory and checks every page it wrote. Afterwards it
must run on the second agent's host with no page lost (the guest itself counts the pages
it finds corrupted) and the disk's copy must equal the original (`qemu-img compare`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.cli import guarded
from agent.errors import QemuError
from agent.guest import build_guest
from agent.guest.build import default_cache_dir
from agent.guest.remote import read_mailbox_over_qmp
from agent.guest.workload import PAGES_PER_MIB, guest_config
from agent.localpair import AgentPair, pid_alive, read_guest
from agent.qemu import qmp, vm

MIB = 1 << 20
DEFAULT_RAM_MIB = 1024
DEFAULT_FILL_MIB = 512
DEFAULT_RATE = 5000          # pages per second the guest rewrites (~20 MB/s)
BOOT_TIMEOUT_S = 30.0
WATCH_S = 1.0
VM_NAME = "demo"
DISK_MIB = 256
DISK_DATA_MIB = 32


def ferry(*args: str) -> list[str]:
    """The argv of a `ferry` command run by this Python."""
    return [sys.executable, "-m", "agent", *args]


async def wait_for_passes(qmp_path: str, passes: int, timeout: float) -> None:
    """Wait until the guest (private RAM: read over QMP) finished `passes` passes."""
    async with qmp.connect(qmp_path) as monitor:
        deadline = time.monotonic() + timeout
        while (state := await read_mailbox_over_qmp(monitor)).passes < passes:
            if time.monotonic() > deadline:
                raise QemuError(f"the guest did not get going within {timeout:g} s: {state}")
            await asyncio.sleep(0.05)


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    accel = vm.choose_accel()
    out(f"accelerator: {accel.accel.value} ({accel.reason})")
    config = guest_config(args.ram_mib, args.fill_mib, args.rate)
    kernel = build_guest(config)
    root = Path(tempfile.mkdtemp(prefix="ferry-demo-"))
    disk, disk_copy = root / "disk.qcow2", root / "b-disks" / "disk.qcow2"
    disk_copy.parent.mkdir()
    pair = AgentPair.create(root, allow=(default_cache_dir(), disk_copy.parent))
    try:
        make_disk(disk, args.disk_mib)
        pair.start()
        out(f"agents: a on 127.0.0.1:{pair.a.port}, b on 127.0.0.1:{pair.b.port} "
            f"(homes in {root}), each trusting the other's key")
        started = subprocess.run(
            ferry("vm", "start", VM_NAME, "--memory", f"{args.ram_mib}M", "--ram", "private",
                  "--home",
                  str(pair.a.home), "--", "-kernel", str(kernel),
                  "-drive", f"file={disk},format=qcow2,if=virtio"),
            capture_output=True, text=True, check=False)
        if started.returncode != 0:
            raise QemuError(f"ferry vm start failed: {started.stderr.strip()}")
        out(started.stdout.strip())
        source = pair.a.vm_record(VM_NAME)
        out(f"guest: {config.fill_pages // PAGES_PER_MIB} MiB of content, rewrites "
            f"{config.ws_pages} pages at {config.rate} pages/s and checks each one; "
            f"disk {disk} ({args.disk_mib} MiB qcow2, {DISK_DATA_MIB} MiB written)")
        asyncio.run(wait_for_passes(source.qmp_path, 1, BOOT_TIMEOUT_S))
        out(f"$ ferry migrate {VM_NAME} --to hostb --disk-map {disk}={disk_copy}")
        sys.stdout.flush()
        cap = ("--bandwidth", args.bandwidth) if args.bandwidth else ()
        migrate = subprocess.run(ferry("migrate", VM_NAME, "--to", "hostb", "--home",
                                       str(pair.a.home), "--disk-map", f"{disk}={disk_copy}",
                                       *cap),
                                 check=False)
        if migrate.returncode != 0:
            out("migration failed; the source VM keeps running on a")
            return 1
        if args.png:
            draw_timeline(pair.a.home, args.png, out)
        dest = pair.b.vm_record(VM_NAME)
        before = read_guest(dest.ram_path)
        time.sleep(WATCH_S)
        after = read_guest(dest.ram_path)
        beats = after.heartbeat - before.heartbeat
        out(f"on b: QEMU pid {dest.pid} runs the guest: heartbeat +{beats}"
            f" ms in {WATCH_S:g} s, {after.passes} passes, {after.errors} corrupted pages")
        out(f"on a: source QEMU pid {source.pid} "
            f"{'still runs (unexpected)' if pid_alive(source.pid) else 'has quit'}")
        same = subprocess.run(["qemu-img", "compare", "-U", str(disk), str(disk_copy)],
                              capture_output=True, text=True, check=False)
        out(f"disk: {disk_copy} on b {'equals' if same.returncode == 0 else 'DIFFERS FROM'} "
            f"the original")
        ok = after.errors == 0 and after.heartbeat > before.heartbeat and same.returncode == 0
        return 0 if ok else 1
    finally:
        pair.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def draw_timeline(home: Path, png: Path, out: Callable[[str], None]) -> None:
    """`ferry report JOB --png FILE` for the job the demo just ran (the newest)."""
    listed = subprocess.run(ferry("history", "--home", str(home), "--limit", "1", "--json"),
                            capture_output=True, text=True, check=True)
    job = json.loads(listed.stdout)["jobs"][0]["job"]
    out(f"$ ferry report {job} --png {png}")
    drawn = subprocess.run(ferry("report", job, "--home", str(home), "--png", str(png)),
                           capture_output=True, text=True, check=False)
    out((drawn.stdout or drawn.stderr).strip())


def make_disk(path: Path, size_mib: int) -> None:
    """A qcow2 disk with random data at its start (what a guest would have written)."""
    seed = path.with_suffix(".seed")
    with open(seed, "wb") as f:
        f.truncate(size_mib * MIB)
        f.write(os.urandom(min(DISK_DATA_MIB, size_mib) * MIB))
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(seed), str(path)],
                   check=True)
    seed.unlink()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agent.demo", description=__doc__)
    parser.add_argument("--ram-mib", type=int, default=DEFAULT_RAM_MIB)
    parser.add_argument("--fill-mib", type=int, default=DEFAULT_FILL_MIB)
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE, help="pages per second")
    parser.add_argument("--disk-mib", type=int, default=DISK_MIB)
    parser.add_argument("--bandwidth", metavar="RATE", help="cap the migration's wire rate")
    parser.add_argument("--png", type=Path, metavar="FILE",
                        help="also draw the migration's timeline (ferry report --png)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded("ferry demo", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

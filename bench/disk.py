"""ferry's disk copy between two local agents against reading the same export with qemu-img.

    python -m bench disk [--json] [--disk-mib N] [--repeat N] [--reads N]

One run builds a qcow2 disk (2 GiB virtual by default) with mixed content: random runs,
text-like (compressible) runs, duplicated runs (dedup), zeroed ranges (qcow2 zero clusters)
and holes, in runs of 64 KiB to 8 MiB, the first MiB a hole. Then, per repeat:

- two real agents (agent.localpair); `ferry vm start` boots a 64 MiB VM with that disk on
  virtio and no kernel: the firmware finds nothing to boot and halts, so the guest is idle
  and the disk dominates (the test guest busy-waits, which under TCG takes one of the two
  cores for itself);
- nbd_read: from the VM's own QEMU (QMP `nbd-server-start` + `block-export-add`, read-only,
  as ferry does), `qemu-img convert -n -f raw nbd+unix:///EXPORT?socket=PATH
  --target-image-opts driver=null-co,size=N` reads the export and drops the bytes (a raw
  /dev/null target is refused: it cannot grow). One untimed warm-up, then --reads timed runs,
  wall time of the whole process;
- disk_copy: `ferry migrate NAME --to hostb --disk-map SRC=DST --json`; the time is the
  report's per-disk `seconds` (every round of that disk: bitmaps, exports, NBD reads,
  encoding, sending over the encrypted channel); the copy is then checked with
  `qemu-img compare`.

- qemu_copy: QEMU's own copy of the same disk on this machine, without encryption:
  `qemu-img convert -n --target-is-zero` from a read-only qemu-storage-daemon export of the
  image to a writable one of a fresh qcow2 beside it, run after the migration: what writing
  the data, not just reading it, costs here.

Both speeds count the same bytes: the disk's data, i.e. every extent that the export's
`base:allocation` does not flag ZERO (holes and zero clusters read as zero; both ferry and
qemu-img skip them). GB/s is 10**9 of those bytes per second. ferry's `seconds` end when
its last batch is queued on the channel, so some data may still be on the way to the
destination image: at most the channel's high-water marks (8 MiB each way), the loopback
socket buffers and the destination's writes in flight (16 MiB), about 40 MiB or 4 % of the
default disk's ~1 GB of data, in ferry's favour; the final flush is not counted either.

On a small machine the CPUs decide both speeds, so each run also reports the CPU seconds per GB
of data each side cost: qemu-img plus the VM's QEMU during the timed reads; for ferry, both
agents, both QEMUs and the CLI during the whole migration (its 64 MiB of RAM included).

Targets (medians over the repeats and timed reads): disk_copy_gbps >= 0.7 * nbd_read_gbps;
disk_copy_gbps >= 1.3 * qemu_copy_gbps at no more CPU seconds per GB than QEMU's copy.
Exit code 0 when all are met, 1 when not or when a run failed, 130 when interrupted. Everything the
bench starts or writes (agents, QEMUs, images, /dev/shm files) is removed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent import procfs
from agent.errors import FerryError
from agent.localpair import AgentPair
from agent.qemu import qmp as qmp_mod
from agent.storage.nbd import NbdClient
from agent.storage.nbd_proto import BASE_ALLOCATION, AllocationFlag
from bench import met_text, run_async, run_measurement
from bench import parser as bench_parser
from bench.codec import WORDS

MIB = 1 << 20
GIB = 1 << 30
GB = 1e9
BLOCK = 64 << 10
"""Runs are whole 64 KiB blocks: qcow2's cluster and ferry's disk block."""
TARGET_RATIO = 0.7
"""ferry's copy against qemu-img only reading the export."""
QEMU_COPY_TARGET = 1.3
"""ferry's copy against QEMU's own copy of the same disk, at no more CPU per GB."""
DEFAULT_DISK_MIB = 2048
RAM_MIB = 64
VM_NAME = "benchdisk"
EXPORT = "bench-read"
# Shares of the disk by kind of run; data (random, text, dup) is about half of the disk.
MIX = {"random": 0.24, "text": 0.22, "dup": 0.06, "zero": 0.12, "hole": 0.36}
DATA_KINDS = ("random", "text", "dup")
MAX_RUN_BLOCKS = 128          # 8 MiB
FIRST_HOLE = MIB              # keeps the firmware from finding a boot sector
TEXT_TEMPLATE = 8 * MIB
QEMU_IMG_TIMEOUT_S = 120.0
CPU_POLL_S = 0.05
LOGS_ENV = "FERRY_BENCH_LOGS"   # a file for the agents' logs when the migration fails
MIGRATE_TIMEOUT_S = 300.0
COMPARE_TIMEOUT_S = 120.0


T = TypeVar("T")


class BenchError(FerryError):
    """A run could not be measured (setup failed, a migration or a read did not finish)."""


# ---------------------------------------------------------------------------- the disk

@dataclass(frozen=True, slots=True)
class Run:
    """length bytes at offset of one kind; a dup run copies the bytes at source."""

    offset: int
    length: int
    kind: str
    source: int = -1


def plan_layout(size: int, seed: int = 1) -> list[Run]:
    """Runs of whole blocks covering [0, size) (a partial last block is a hole), kinds
    drawn by MIX; a dup run copies an earlier random or text run of at least its length."""
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    runs = [Run(0, min(FIRST_HOLE, size), "hole")]
    offset = runs[0].length
    end = size - size % BLOCK
    data: list[Run] = []
    while offset < end:
        kind = rng.choices(kinds, weights)[0]
        length = min(rng.randint(1, MAX_RUN_BLOCKS) * BLOCK, end - offset)
        source = -1
        if kind == "dup":
            donors = [r for r in data if r.length >= length]
            if not donors:
                kind = "random"
            else:
                source = rng.choice(donors).offset
        run = Run(offset, length, kind, source)
        if kind in ("random", "text"):
            data.append(run)
        runs.append(run)
        offset += length
    if end < size:
        runs.append(Run(end, size - end, "hole"))
    return runs


def shares(runs: Sequence[Run]) -> dict[str, int]:
    """Bytes of each kind."""
    total = dict.fromkeys(MIX, 0)
    for run in runs:
        total[run.kind] += run.length
    return total


def text_template(rng: random.Random) -> bytes:
    """TEXT_TEMPLATE bytes of words: compressible like logs or source files."""
    words = []
    size = 0
    while size < TEXT_TEMPLATE:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words).encode()[:TEXT_TEMPLATE]


def write_seed(path: Path, runs: Sequence[Run], size: int, seed: int = 1) -> None:
    """A sparse raw file holding the data runs (zero runs and holes left sparse)."""
    rng = random.Random(seed)
    text = text_template(rng)
    # AES-CTR keystream: random-looking, reproducible, and far faster than random.randbytes.
    stream = Cipher(algorithms.AES(rng.randbytes(32)), modes.CTR(rng.randbytes(16))).encryptor()
    with open(path, "wb+") as f:
        f.truncate(size)
        for run in runs:
            if run.kind == "random":
                data = stream.update(bytes(run.length))
            elif run.kind == "text":
                # Each block from its own offset, so blocks differ (no accidental dedup).
                starts = (rng.randrange(len(text) - BLOCK) for _ in range(run.length // BLOCK))
                data = b"".join(text[s:s + BLOCK] for s in starts)
            elif run.kind == "dup":
                data = os.pread(f.fileno(), run.length, run.source)
            else:
                continue
            os.pwrite(f.fileno(), data, run.offset)


def make_disk(path: Path, runs: Sequence[Run], size: int) -> None:
    """The qcow2 image: the seed converted, then the zero runs made zero clusters."""
    seed = path.with_suffix(".seed")
    try:
        write_seed(seed, runs, size)
        subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(seed), str(path)],
                       check=True, capture_output=True)
    finally:
        seed.unlink(missing_ok=True)
    zero = [f"write -z {r.offset} {r.length}" for r in runs if r.kind == "zero"]
    for start in range(0, len(zero), 200):   # keep the command line short
        argv = ["qemu-io", "-f", "qcow2"]
        for command in zero[start:start + 200]:
            argv += ["-c", command]
        subprocess.run([*argv, str(path)], check=True, capture_output=True)


# ---------------------------------------------------------------------------- measuring

QSD_START_TIMEOUT_S = 10.0

def qemu_img_read_argv(socket_path: Path, export: str, size: int) -> list[str]:
    """qemu-img reading a whole NBD export and dropping the bytes (null-co target)."""
    return ["qemu-img", "convert", "-n", "-f", "raw",
            f"nbd+unix:///{export}?socket={socket_path}",
            "--target-image-opts", f"driver=null-co,size={size}"]


async def _node_of(monitor: qmp_mod.Qmp, image: Path) -> tuple[str, int]:
    for block in await monitor.execute("query-block"):
        inserted = block.get("inserted") or {}
        if inserted.get("file") == str(image):
            return inserted["node-name"], int(inserted["image"]["virtual-size"])
    raise BenchError(f"the VM has no disk {image}")


async def _data_bytes(socket_path: Path) -> int:
    """Bytes of the export that base:allocation does not flag ZERO (what both copy)."""
    async with NbdClient.connect(str(socket_path), EXPORT,
                                 meta_contexts=[BASE_ALLOCATION]) as nbd:
        extents = await nbd.block_status(0, nbd.size, BASE_ALLOCATION)
    return sum(e.length for e in extents if not e.flags & AllocationFlag.ZERO)


async def _timed(argv: Sequence[str]) -> float:
    """Wall seconds of one run of argv, which must succeed; killed if it overruns or if
    the bench is interrupted."""
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), QEMU_IMG_TIMEOUT_S)
    except TimeoutError:
        raise BenchError(f"{argv[0]} did not finish within {QEMU_IMG_TIMEOUT_S:g} s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()}")
    return seconds


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process so far (None if there is none)."""
    return None if pid is None else procfs.cpu_seconds(pid)


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that were waited for (qemu-img, ferry CLI)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuWatch:
    """CPU seconds that some processes spend while the watch runs, polled from /proc so that
    a process that quits meanwhile (the source QEMU) still counts up to its last poll; one
    that appears meanwhile (the destination QEMU) counts from its start."""

    def __init__(self, pids: Callable[[], dict[str, int | None]]) -> None:
        self._pids = pids
        self._first: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self, *, starting: bool = False) -> None:
        for label, pid in self._pids().items():
            if (seconds := cpu_seconds(pid)) is not None:
                self._first.setdefault(label, seconds if starting else 0.0)
                self._last[label] = seconds

    def _run(self) -> None:
        while not self._stop.wait(CPU_POLL_S):
            self._poll()

    def __enter__(self) -> Self:
        self._poll(starting=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def spent(self) -> dict[str, float]:
        return {label: round(self._last[label] - self._first[label], 3) for label in self._last}


async def nbd_reads(qmp_path: Path, image: Path, socket_path: Path, reads: int,
                    qemu_pid: int) -> tuple[int, list[float], dict[str, float]]:
    """(data bytes, seconds of each timed qemu-img read, CPU seconds per read of qemu-img
    and of the VM's QEMU) for the VM's disk, exported by the VM's own QEMU; the export and
    the NBD server are gone again afterwards."""
    async with qmp_mod.connect(qmp_path) as monitor:
        node, size = await _node_of(monitor, image)
        await monitor.execute("nbd-server-start", {
            "addr": {"type": "unix", "data": {"path": str(socket_path)}}})
        try:
            await monitor.execute("block-export-add", {
                "type": "nbd", "id": EXPORT, "node-name": node, "name": EXPORT,
                "writable": False})
            try:
                data = await _data_bytes(socket_path)
                argv = qemu_img_read_argv(socket_path, EXPORT, size)
                await _timed(argv)   # warm-up
                children, served = children_cpu_seconds(), cpu_seconds(qemu_pid) or 0.0
                times = [await _timed(argv) for _ in range(reads)]
                cpu = {"qemu-img": round((children_cpu_seconds() - children) / reads, 3),
                       "qemu_src": round(((cpu_seconds(qemu_pid) or served) - served) / reads,
                                         3)}
            finally:
                mark = monitor.event_mark()
                await monitor.execute("block-export-del", {"id": EXPORT})
                await monitor.wait_event("BLOCK_EXPORT_DELETED", after=mark, timeout=10)
        finally:
            await monitor.execute("nbd-server-stop")
            socket_path.unlink(missing_ok=True)
    return data, times, cpu


def qemu_img_copy_argv(source: Path, target: Path, export: str) -> list[str]:
    """qemu-img copying one NBD export to another that reads as zero, skipping zeros."""
    return ["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", "-O", "raw",
            f"nbd+unix:///{export}?socket={source}", f"nbd+unix:///{export}?socket={target}"]


def storage_daemon_argv(image: Path, socket_path: Path, export: str, *,
                        writable: bool) -> list[str]:
    """qemu-storage-daemon exporting a qcow2 image over NBD on a unix socket."""
    return ["qemu-storage-daemon",
            "--blockdev", f"driver=file,filename={image},node-name=file",
            "--blockdev", "driver=qcow2,file=file,node-name=disk",
            "--nbd-server", f"addr.type=unix,addr.path={socket_path}",
            "--export", (f"type=nbd,id={export},node-name=disk,name={export},"
                         f"writable={'on' if writable else 'off'}")]


class StorageDaemon:
    """A qemu-storage-daemon serving one image until the block ends."""

    def __init__(self, image: Path, socket_path: Path, *, writable: bool) -> None:
        self.socket_path = socket_path
        self.proc = subprocess.Popen(storage_daemon_argv(image, socket_path, EXPORT,
                                                         writable=writable),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> Self:
        deadline = time.monotonic() + QSD_START_TIMEOUT_S
        while not self.socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BenchError(f"qemu-storage-daemon did not start: {err.strip()}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.socket_path.unlink(missing_ok=True)


def qemu_copy(image: Path, size: int, work: Path) -> tuple[float, dict[str, float]]:
    """(seconds, CPU seconds by process) of QEMU copying `image` into a fresh qcow2 in
    `work` between two storage daemons; the copy is removed afterwards."""
    target = work / "qemu-copy.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size)],
                   check=True, capture_output=True)
    try:
        with StorageDaemon(image, work / "copy-src.nbd", writable=False) as src, \
                StorageDaemon(target, work / "copy-dst.nbd", writable=True) as dst:
            pids: dict[str, int | None] = {"qsd_src": src.proc.pid, "qsd_dst": dst.proc.pid}
            children = children_cpu_seconds()
            with CpuWatch(lambda: pids) as watch:
                seconds = run_async(_timed(qemu_img_copy_argv(src.socket_path,
                                                              dst.socket_path, EXPORT)))
            return seconds, {**watch.spent(),
                             "qemu-img": round(children_cpu_seconds() - children, 3)}
    finally:
        target.unlink(missing_ok=True)


def ferry(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def one_run(image: Path, work: Path, reads: int, note: Callable[[str], None]) -> dict[str, Any]:
    """Boot the VM on a fresh agent pair, time the qemu-img reads, migrate, check the copy."""
    root = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    target_dir = root / "b-disks"
    target_dir.mkdir()
    target = target_dir / image.name
    pair = AgentPair.create(root, allow=(target_dir,))
    try:
        pair.start()
        started = subprocess.run(
            ferry("vm", "start", VM_NAME, "--memory", f"{RAM_MIB}M", "--home", str(pair.a.home),
                  "--", "-drive", f"file={image},format=qcow2,if=virtio"),
            capture_output=True, text=True, check=False)
        if started.returncode != 0:
            raise BenchError(f"ferry vm start failed: {started.stderr.strip()}")
        record = pair.a.vm_record(VM_NAME)
        note(f"reading the export with qemu-img ({reads} timed runs after a warm-up)")
        data, times, read_cpu = run_async(nbd_reads(
            Path(record.qmp_path), image, root / "read.nbd", reads, record.pid))
        note(f"qemu-img: {data / GB:.2f} GB of data in {statistics.median(times):.2f} s "
             f"(median); migrating")
        assert pair.a.proc is not None and pair.b.proc is not None
        pids = {"agent_a": pair.a.proc.pid, "agent_b": pair.b.proc.pid, "qemu_src": record.pid}
        children = children_cpu_seconds()
        with CpuWatch(lambda: {**pids, "qemu_dst": pair.b.incoming_pid(VM_NAME)}) as watch:
            rc, report, stderr = pair.migrate(VM_NAME, "--disk-map", f"{image}={target}",
                                              timeout=MIGRATE_TIMEOUT_S)
        copy_cpu = {**watch.spent(), "ferry_cli": round(children_cpu_seconds() - children, 3)}
        if rc != 0 or report.get("status") != "completed":
            why = report.get("error") or " ".join(stderr.strip().splitlines()[-1:]) or f"exit {rc}"
            if os.environ.get(LOGS_ENV):      # both agents' logs, to see why
                Path(os.environ[LOGS_ENV]).write_text(pair.logs())
            raise BenchError(f"ferry migrate failed: {why}")
        disk = report["disks"][0]
        same = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                               str(image), str(target)], capture_output=True, text=True,
                              check=False, timeout=COMPARE_TIMEOUT_S)
        if same.returncode != 0:
            raise BenchError(f"the copy differs from the original: {same.stdout.strip()}")
        note("QEMU's own copy of the disk (information)")
        copy_seconds, qemu_copy_cpu = qemu_copy(image, disk["size"], root)
        return {"data_bytes": data, "qemu_img_seconds": [round(t, 3) for t in times],
                "ferry_seconds": disk["seconds"], "blocks_read": disk["blocks_read"],
                "wire_bytes": disk["wire_bytes"], "rounds": disk["rounds"],
                "data_blocks": disk["data_blocks"], "zero_blocks": disk["zero_blocks"],
                "dedup_blocks": disk["dedup_blocks"], "total_ms": report.get("total_ms"),
                "downtime_ms": report.get("downtime_ms"), "qemu_img_cpu_s": read_cpu,
                "migration_cpu_s": copy_cpu, "qemu_copy_seconds": round(copy_seconds, 3),
                "qemu_copy_cpu_s": qemu_copy_cpu}
    finally:
        pair.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The two speeds (GB/s of data bytes; medians over runs and timed reads) and the
    verdict."""
    copy = statistics.median(r["data_bytes"] / r["ferry_seconds"] for r in runs) / GB
    read = statistics.median(r["data_bytes"] / t for r in runs for t in r["qemu_img_seconds"]) / GB
    # CPU per GB of data: what each side costs the machine (both are CPU-bound on 2 cores).
    read_cpu = statistics.median(sum(r["qemu_img_cpu_s"].values()) / r["data_bytes"]
                                 for r in runs) * GB
    copy_cpu = statistics.median(sum(r["migration_cpu_s"].values()) / r["data_bytes"]
                                 for r in runs) * GB
    qemu = statistics.median(r["data_bytes"] / r["qemu_copy_seconds"] for r in runs) / GB
    qemu_cpu = statistics.median(sum(r["qemu_copy_cpu_s"].values()) / r["data_bytes"]
                                 for r in runs) * GB
    targets = {"read": copy >= TARGET_RATIO * read,
               "qemu_copy_speed": copy >= QEMU_COPY_TARGET * qemu,
               "qemu_copy_cpu": copy_cpu <= qemu_cpu}
    return {"disk_copy_gbps": round(copy, 3), "nbd_read_gbps": round(read, 3),
            "ratio": round(copy / read, 3) if read else None, "target_ratio": TARGET_RATIO,
            "qemu_copy_gbps": round(qemu, 3),
            "qemu_copy_ratio": round(copy / qemu, 3) if qemu else None,
            "qemu_copy_target": QEMU_COPY_TARGET,
            "cpu_s_per_gb": {"nbd_read": round(read_cpu, 2), "disk_copy": round(copy_cpu, 2),
                             "qemu_copy": round(qemu_cpu, 2)},
            "targets": targets, "met": all(targets.values())}


def readable(result: dict[str, Any]) -> str:
    targets, cpu = result["targets"], result["cpu_s_per_gb"]
    run = result["runs"][0]
    return (f"disk copy {result['disk_copy_gbps']:.2f} GB/s, NBD read (qemu-img) "
            f"{result['nbd_read_gbps']:.2f} GB/s, ratio {result['ratio']:.2f} "
            f"({run['data_bytes'] / GB:.2f} GB of data on a {result['disk_mib']} MiB disk; "
            f"load {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f})\n"
            f"CPU seconds per GB: disk copy {result['cpu_s_per_gb']['disk_copy']:.2f} "
            f"(agents, both QEMUs, CLI; the 64 MiB of RAM too), NBD read "
            f"{result['cpu_s_per_gb']['nbd_read']:.2f} (qemu-img and the VM's QEMU) on "
            f"{result['cpus']} CPUs\n"
            f"QEMU's own copy (qemu-img between two storage daemons, unencrypted): "
            f"{result['qemu_copy_gbps']:.2f} GB/s, {cpu['qemu_copy']:.2f} CPU seconds per GB\n"
            f"target disk copy >= {TARGET_RATIO:.0%} of NBD read: {met_text(targets['read'])}\n"
            f"target disk copy >= {QEMU_COPY_TARGET}x QEMU's copy: "
            f"{met_text(targets['qemu_copy_speed'])} (ratio {result['qemu_copy_ratio']:.2f})\n"
            f"target disk copy CPU per GB <= QEMU's copy: {met_text(targets['qemu_copy_cpu'])} "
            f"({cpu['disk_copy']:.2f} against {cpu['qemu_copy']:.2f})")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = bench_parser("disk", __doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--disk-mib", type=int, default=DEFAULT_DISK_MIB,
                        help=f"virtual size of the disk in MiB (default {DEFAULT_DISK_MIB})")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="migrations (each with its own qemu-img reads; default 1)")
    parser.add_argument("--reads", type=int, default=3, metavar="N",
                        help="timed qemu-img reads per migration (default 3)")
    args = parser.parse_args(argv)
    if args.disk_mib < 2 or args.repeat < 1 or args.reads < 1:
        parser.error("--disk-mib must be at least 2, --repeat and --reads at least 1")
    return args


@dataclass
class Workspace:
    """The bench's directory on tmpfs (images), removed whatever happens."""

    path: Path

    @classmethod
    def create(cls) -> Workspace:
        return cls(Path(tempfile.mkdtemp(prefix="ferry-bench-disk-", dir="/dev/shm")))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def measure(args: argparse.Namespace, note: Callable[[str], None]) -> dict[str, Any]:
    size = args.disk_mib * MIB
    work = Workspace.create()
    try:
        image = work.path / "disk.qcow2"
        layout = plan_layout(size)
        note(f"building a {args.disk_mib} MiB qcow2 disk: "
             + ", ".join(f"{kind} {n / GIB:.2f} GiB" for kind, n in shares(layout).items()))
        make_disk(image, layout, size)
        load_before = os.getloadavg()
        runs = []
        for n in range(args.repeat):
            note(f"run {n + 1} of {args.repeat}")
            runs.append(one_run(image, work.path, args.reads, note))
        return {**summarize(runs), "disk_mib": args.disk_mib, "cpus": os.cpu_count(),
                "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()], "runs": runs}
    finally:
        work.remove()


def main(argv: Sequence[str]) -> int:
    """`python -m bench disk`: 0 when the target holds, 1 when not or on failure."""
    args = parse_args(argv)
    return run_measurement("disk", lambda note: measure(args, note), readable, args.json,
                           "interrupted; everything started was cleaned up")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

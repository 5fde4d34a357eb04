"""One disk of a one-shot local import copied by QEMU's own block layer: one
qemu-storage-daemon opens the source read-only and the new target, and a `blockdev-mirror`
job (sync=full) moves the blocks between them inside the daemon (issue #13, the --local
speed target).

Through two NBD exports and ferry's codec a local copy ran at 0.15-0.35x `qemu-img
convert` of the same image, and QEMU's own copy between the same two exports at 0.2-0.4x:
the exports, not the codec, cost most of it. Inside one daemon the job copies as fast as
convert (measured 0.2 s for 200 MiB of data both ways). What the job skips and how:
onto a new target (which reads as zero) it copies only the ranges the source allocates;
data that reads as zero is written as zero clusters or holes (`detect-zeroes=unmap` on the
target, per request of up to 1 MiB; convert looks at every 4 KiB). The copy is then
compared with the source by `qemu-img compare` (QEMU's block layer on both sides, whole
images).

Warm passes keep ferry's path (agent.importer.copy): each needs the block hashes of the
previous one, which only ferry's codec keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from agent.errors import FerryError, LocalError, QemuError, QmpTimeoutError
from agent.importer.images import (
    STOP_TIMEOUT_S,
    ImageInfo,
    Window,
    die_with_parent,
    escape,
    image_nodes,
)
from agent.qemu import qmp

JOB = "import"
PROGRESS_S = 0.25
"""How often the job's progress is read (query-jobs) while it runs."""
START_TIMEOUT_S = 10.0
MAP_TIMEOUT_S = 120.0
COMPARE_TIMEOUT_S = 3600.0


@dataclass(frozen=True, slots=True)
class JobProgress:
    """The job's own figures: bytes of the virtual disk done, of total."""

    done: int
    total: int


def source_spec(info: ImageInfo, window: Window | None) -> str:
    """The source as a `json:` filename qemu-img opens read-only (a disk inside an OVA as
    a raw slice of its package file)."""
    node: dict[str, Any] = {"driver": "file", "filename": str(info.path)}
    if window is not None:
        node = {"driver": "raw", "offset": window[0], "size": window[1], "file": node}
    return "json:" + json.dumps({"driver": info.format, "file": node})


def data_bytes(spec: str, timeout: float = MAP_TIMEOUT_S) -> int:
    """Bytes of an image that hold data (not holes, not zero ranges): `qemu-img map`."""
    done = subprocess.run(["qemu-img", "map", "-U", "--output=json", spec],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise LocalError(f"qemu-img map {spec}: {done.stderr.strip()}")
    return sum(int(e["length"]) for e in json.loads(done.stdout)
               if e.get("data") and not e.get("zero"))


def daemon_argv(info: ImageInfo, window: Window | None, target: Path, target_format: str,
                qmp_socket: Path) -> list[str]:
    """qemu-storage-daemon with the source (read-only, force-share: its VM may still hold
    it), the target (zeros written as holes) and a QMP monitor, no export."""
    source = image_nodes(info.path, info.format, writable=False, window=window, prefix="s")
    target_file = f"driver=file,filename={escape(target)},node-name=tfile,discard=unmap"
    return ["qemu-storage-daemon", *source,
            "--blockdev", target_file,
            "--blockdev", (f"driver={target_format},file=tfile,node-name=timg,"
                           f"discard=unmap,detect-zeroes=unmap"),
            "--chardev", f"socket,id=mon,path={escape(qmp_socket)},server=on,wait=off",
            "--monitor", "chardev=mon"]


class CopyDaemon:
    """The daemon of one copy, its QMP session open while the `async with` block runs;
    stopped (which flushes and closes the target) however the block ends."""

    def __init__(self, argv: list[str], qmp_socket: Path, label: str) -> None:
        self.argv = argv
        self.qmp_socket = qmp_socket
        self.label = label
        self.log_path = qmp_socket.with_name(qmp_socket.name + ".log")
        self.proc: asyncio.subprocess.Process | None = None
        self.monitor: qmp.Qmp | None = None

    async def __aenter__(self) -> Self:
        if shutil.which("qemu-storage-daemon") is None:
            raise LocalError("qemu-storage-daemon not found; install qemu-utils "
                             "(scripts/install-host-packages.sh)")
        self.qmp_socket.unlink(missing_ok=True)
        with open(self.log_path, "wb") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
                preexec_fn=die_with_parent)
        try:
            self.monitor = await self._connect()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _connect(self) -> qmp.Qmp:
        """The daemon's monitor, once it listens; its own message if it exits first."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        delay = 0.002
        while True:
            if self.proc.returncode is not None:
                reason = (self.log_path.read_text(errors="replace").strip()
                          or f"exit {self.proc.returncode}")
                raise LocalError(f"qemu-storage-daemon cannot open {self.label}: {reason}")
            if self.qmp_socket.exists():
                with contextlib.suppress(FerryError, OSError):
                    return await qmp.connect(self.qmp_socket, timeout=1.0)
            if time.monotonic() > deadline:
                raise LocalError(f"qemu-storage-daemon for {self.label} did not listen "
                                 f"within {START_TIMEOUT_S:g} s")
            await asyncio.sleep(delay)   # the daemon has no readiness signal here
            delay = min(delay * 2, 0.05)

    async def copy(self, on_progress: Callable[[JobProgress], None] | None = None) -> None:
        """Run the mirror job until the target holds the source, then complete it; its
        error, if it failed.

        A mirror, not a backup: onto a target that reads as zero (a new image) it copies
        only what the source allocates, where a backup writes zeros over the rest (on a
        raw file, fallocated: a sparse 16 MiB source made a 15 MiB file)."""
        monitor = self.monitor
        assert monitor is not None
        mark = monitor.event_mark()
        await monitor.execute("blockdev-mirror", {
            "job-id": JOB, "device": "simg", "target": "timg", "sync": "full",
            "auto-finalize": True, "auto-dismiss": False})
        try:
            while True:
                # Woken when the job moves on, or after PROGRESS_S to read how far it is.
                with contextlib.suppress(QmpTimeoutError):
                    await monitor.wait_event("JOB_STATUS_CHANGE", after=mark,
                                             timeout=PROGRESS_S, match=_ours)
                mark = monitor.event_mark()
                jobs = [j for j in await monitor.execute("query-jobs") if j["id"] == JOB]
                if not jobs:
                    raise QemuError(f"{self.label}: the copy job vanished")
                job = jobs[0]
                if on_progress is not None:
                    on_progress(JobProgress(int(job["current-progress"]),
                                            int(job["total-progress"])))
                if job["status"] == "ready":
                    # Nothing writes the read-only source: in sync now is in sync for good.
                    await monitor.execute("job-complete", {"id": JOB})
                elif job["status"] == "concluded":
                    if job.get("error"):
                        raise LocalError(f"copying {self.label} failed: {job['error']}")
                    return
        except BaseException:
            with contextlib.suppress(FerryError, OSError):
                await asyncio.shield(monitor.execute("job-cancel", {"id": JOB}))
            raise

    async def stop(self) -> None:
        monitor, self.monitor = self.monitor, None
        proc, self.proc = self.proc, None
        try:
            if monitor is not None:
                with contextlib.suppress(FerryError, OSError):
                    await monitor.disconnect()
            if proc is not None and proc.returncode is None:
                proc.terminate()     # the daemon flushes and closes its images on SIGTERM
                try:
                    await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
                    raise LocalError(f"qemu-storage-daemon for {self.label} did not stop "
                                     f"within {STOP_TIMEOUT_S:g} s: the target may be "
                                     f"incomplete") from None
            elif proc is not None:
                await proc.wait()
        finally:
            self.qmp_socket.unlink(missing_ok=True)
            self.log_path.unlink(missing_ok=True)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await asyncio.shield(self.stop())


def _ours(event: qmp.QmpEvent) -> bool:
    return bool(event.data.get("id") == JOB)


def compare(spec: str, target: Path, target_format: str,
            timeout: float = COMPARE_TIMEOUT_S) -> str | None:
    """None when the target reads as the source does, else qemu-img's account of the first
    difference."""
    done = subprocess.run(["qemu-img", "compare", "-U", "-F", target_format, spec,
                           str(target)], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if done.returncode == 0:
        return None
    if done.returncode == 1:
        return done.stdout.strip() or "content differs"
    raise LocalError(f"qemu-img compare {target}: {done.stderr.strip() or done.stdout.strip()}")

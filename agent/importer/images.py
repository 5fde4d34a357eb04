"""Disk images of other hypervisors as QEMU sees them: `qemu-img info` of a source, and a
qemu-storage-daemon exporting one image over NBD on a unix socket (checked on QEMU 7.2).

An import reads every source through QEMU's own block layer, so any format and subformat
QEMU reads (vmdk sparse, flat, split and streamOptimized, vdi, vhdx, vpc, qcow2, raw)
arrives as plain blocks; the target it writes is exported the same way, writable.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from agent.errors import LocalError, UserError

log = logging.getLogger(__name__)

SOURCE_FORMATS = ("qcow2", "raw", "vmdk", "vdi", "vhdx", "vpc")
"""Image formats an import reads (qemu-img's names; vpc is Microsoft's .vhd)."""
TARGET_FORMATS = ("qcow2", "raw")
"""Formats an import writes."""
EXPORT = "disk"
"""The NBD export name of every daemon here (one export each)."""
INFO_TIMEOUT_S = 30.0
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1      # <linux/prctl.h>


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What `qemu-img info` says about one image."""

    path: Path
    format: str
    virtual_size: int
    actual_size: int         # bytes the file(s) take on disk
    subformat: str | None    # vmdk's create type (monolithicSparse, ...), vpc's, ...


Window = tuple[int, int]
"""(offset, size): an image that is a region of a larger file (a disk inside an OVA's
tar, read in place), seen by QEMU through a raw node with that offset and size."""


def probe(path: Path, expected_format: str | None = None,
          window: Window | None = None) -> ImageInfo:
    """`qemu-img info -U` of a source image; refuses a missing, unreadable, corrupt or
    unsupported one. With `expected_format` (what the configuration says) QEMU does not
    probe, so a damaged image is not taken for raw."""
    if expected_format is not None and expected_format not in SOURCE_FORMATS:
        raise UserError(f"disk {path}: format {expected_format!r} cannot be imported "
                        f"(ferry reads {', '.join(SOURCE_FORMATS)})")
    if not path.is_absolute():
        raise UserError(f"disk {path}: the source image path must be absolute")
    if not path.is_file():
        raise UserError(f"disk {path}: no such image file"
                        + (" (it is not a regular file)" if path.exists() else ""))
    if not os.access(path, os.R_OK):
        raise UserError(f"disk {path}: not readable by this agent (check its permissions)")
    argv = ["qemu-img", "info", "-U", "--output=json"]
    target = str(path)
    if window is not None:
        if expected_format is None:
            raise UserError(f"disk {path} at byte {window[0]}: a disk inside a package "
                            f"needs its format from the package's description")
        target = "json:" + json.dumps({"driver": expected_format, "file": {
            "driver": "raw", "offset": window[0], "size": window[1],
            "file": {"driver": "file", "filename": str(path)}}})
    elif expected_format is not None:
        argv += ["-f", expected_format]
    try:
        done = subprocess.run([*argv, target], capture_output=True, text=True,
                              timeout=INFO_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalError(f"disk {path}: qemu-img info failed: {exc}") from exc
    if done.returncode != 0:
        reason = done.stderr.strip().removeprefix("qemu-img: ") or "no reason given"
        raise UserError(f"disk {path}: QEMU cannot read this image: {reason}")
    try:
        info = json.loads(done.stdout)
        fmt, size = str(info["format"]), int(info["virtual-size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LocalError(f"disk {path}: unexpected qemu-img info output: {exc}") from exc
    if fmt not in SOURCE_FORMATS:
        raise UserError(f"disk {path}: format {fmt!r} cannot be imported "
                        f"(ferry reads {', '.join(SOURCE_FORMATS)})")
    if info.get("backing-filename"):
        raise UserError(f"disk {path}: has a backing file {info['backing-filename']!r}; "
                        f"import a flattened image (qemu-img convert) instead")
    if size <= 0:
        raise UserError(f"disk {path}: virtual size {size} is not a disk")
    specific = (info.get("format-specific") or {}).get("data") or {}
    subformat = specific.get("create-type") or specific.get("subformat")
    return ImageInfo(path=path, format=fmt, virtual_size=size,
                     actual_size=int(info.get("actual-size", 0)),
                     subformat=str(subformat) if subformat else None)


def image_nodes(image: Path, fmt: str, *, writable: bool, window: Window | None = None,
                prefix: str = "") -> list[str]:
    """`--blockdev` options opening `image` (or the `window` of it) as `fmt`; the top node
    is named PREFIX + "img".

    A source is opened read-only with force-share, as `qemu-img info -U` is: a warm import
    reads a disk that its VM may still hold open for writing."""
    if writable:
        file_opts, format_opts = "", ""
    else:
        file_opts, format_opts = ",read-only=on", ",read-only=on,force-share=on"
    nodes = ["--blockdev",
             f"driver=file,filename={escape(image)},node-name={prefix}file{file_opts}"]
    under = f"{prefix}file"
    if window is not None:
        nodes += ["--blockdev", f"driver=raw,file={under},offset={window[0]},size={window[1]},"
                                f"node-name={prefix}slice{file_opts}"]
        under = f"{prefix}slice"
    return [*nodes, "--blockdev",
            f"driver={fmt},file={under},node-name={prefix}img{format_opts}"]


def daemon_argv(image: Path, fmt: str, socket_path: Path, *, writable: bool,
                window: Window | None = None) -> list[str]:
    """qemu-storage-daemon exporting `image` (or the `window` of it) as NBD export EXPORT
    on `socket_path`."""
    return ["qemu-storage-daemon",
            *image_nodes(image, fmt, writable=writable, window=window),
            "--nbd-server", f"addr.type=unix,addr.path={escape(socket_path)}",
            "--export", (f"type=nbd,id=e0,node-name=img,name={EXPORT},"
                         f"writable={'on' if writable else 'off'}")]


def die_with_parent() -> None:
    """In a daemon's child process before exec: SIGTERM it when the process that started it
    dies (a killed `ferry import` must not leave a daemon copying on, or holding images)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def escape(path: Path) -> str:
    """A path inside a QEMU option string (commas are doubled)."""
    return str(path).replace(",", ",,")


class StorageDaemon:
    """One qemu-storage-daemon serving one image over NBD, stopped (and its socket
    removed) when the `async with` block ends, however it ends."""

    def __init__(self, image: Path, fmt: str, socket_path: Path, *, writable: bool,
                 window: Window | None = None) -> None:
        self.image = image
        self.window = window
        self.format = fmt
        self.socket_path = socket_path
        self.writable = writable
        self.log_path = socket_path.with_name(socket_path.name + ".log")
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Self:
        if shutil.which("qemu-storage-daemon") is None:
            raise LocalError("qemu-storage-daemon not found; install qemu-utils "
                             "(scripts/install-host-packages.sh)")
        self.socket_path.unlink(missing_ok=True)
        # Its messages go to a file beside the socket: a pipe nobody reads could fill up
        # and stall the daemon.
        with open(self.log_path, "wb") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                *daemon_argv(self.image, self.format, self.socket_path,
                             writable=self.writable, window=self.window),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=log_file, preexec_fn=die_with_parent)
        try:
            await self._started()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _started(self) -> None:
        """Wait until the socket takes connections: the file appears at bind(), a moment
        before listen(), so only a connection that succeeds says the daemon is ready."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        delay = 0.002
        while not await self._accepts():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                if self.proc.returncode is None:
                    raise LocalError(f"qemu-storage-daemon for {self.image} did not listen "
                                     f"within {START_TIMEOUT_S:g} s")
                reason = (self.log_path.read_text(errors="replace").strip()
                          or f"exit {self.proc.returncode}")
                raise LocalError(f"qemu-storage-daemon cannot open {self.image}: {reason}")
            await asyncio.sleep(delay)   # poll: the daemon has no readiness signal here
            delay = min(delay * 2, 0.05)

    async def _accepts(self) -> bool:
        try:
            _, writer = await asyncio.open_unix_connection(str(self.socket_path))
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
                except TimeoutError:
                    log.warning("qemu-storage-daemon for %s ignored SIGTERM; killing it",
                                self.image)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            elif proc is not None:
                await proc.wait()
        finally:
            self.socket_path.unlink(missing_ok=True)
            self.log_path.unlink(missing_ok=True)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await asyncio.shield(self.stop())

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

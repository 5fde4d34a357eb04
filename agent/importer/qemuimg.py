"""One disk of a one-shot local import copied by QEMU's own block layer: `qemu-img
convert` from the source (read-only, shared: its VM may still hold it) into a new target,
with progress from its `-p` output; then `qemu-img compare` of the two, whole images
(issue #13, the --local speed target).

Through two NBD exports and ferry's codec a local copy ran at 0.15-0.35x `qemu-img
convert` of the same image, the exports costing most of it. A `blockdev-mirror` job inside
one qemu-storage-daemon ran the copy itself as fast as convert, but on 512 MiB images
(0.15-0.2 s of copying) its fixed costs (`qemu-img create`, the daemon and its monitor,
zeroing the target first: QEMU 7.2's mirror does with sync=full) left it at 0.55-0.87x;
convert itself is the fastest way QEMU has, so ferry runs it. It copies only what the
source allocates, and zeros in data become holes or zero clusters (4 KiB at a time).

Warm passes keep ferry's path (agent.importer.copy): each needs the block hashes of the
previous one, which only ferry's codec keeps.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import LocalError
from agent.importer.images import ImageInfo, Window, die_with_parent

MAP_TIMEOUT_S = 120.0
COMPARE_TIMEOUT_S = 3600.0


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


async def convert(spec: str, target: Path, target_format: str,
                  on_progress: Callable[[float], None] | None = None) -> None:
    """`qemu-img convert` the source `spec` into a new `target`; `on_progress` hears the
    share done (0..1) as convert reports it. Raises with qemu-img's own message; stopped
    (and waited for) however this ends, and killed with its parent (PR_SET_PDEATHSIG)."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "convert", "-U", "-p", "-O", target_format, spec, str(target),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent)
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.ensure_future(proc.stderr.read())
    try:
        pending = b""
        while chunk := await proc.stdout.read(4096):
            # "    (12.50/100%)\r" per step of progress.
            *lines, pending = (pending + chunk).replace(b"\n", b"\r").split(b"\r")
            for line in lines:
                share = _share(line)
                if share is not None and on_progress is not None:
                    on_progress(share)
        status = await proc.wait()
        message = (await errors).decode(errors="replace").strip()
    except BaseException:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.shield(proc.wait())
        errors.cancel()
        raise
    if status != 0:
        raise LocalError(f"qemu-img convert into {target} failed: "
                         f"{message or f'exit {status}'}")


def _share(line: bytes) -> float | None:
    text = line.strip().lstrip(b"(").split(b"/", 1)[0]
    try:
        return min(max(float(text) / 100, 0.0), 1.0)
    except ValueError:
        return None


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

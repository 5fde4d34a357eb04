"""A VM's argv pointed at the images its block graph uses now.

After a disk moved live (`ferry disk move`, or any mirror that replaced a node), QEMU's
command line (/proc/PID/cmdline) still names the old image and format, while query-block
shows the new ones. A destination built from the old argv would open, or refuse, the old
image; so the source describes its VM with each disk option rewritten to the file and
format query-block shows for that drive (-drive by its id, -blockdev by the device that
uses it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from agent.qemu.vmspec import format_keyval, keyval_get, keyval_set, parse_keyval

BLOCK_OPTIONS = frozenset({"-drive", "-blockdev", "-device"})


def _current(blocks: list[dict[str, Any]]) -> tuple[dict[str, tuple[str, str]],
                                                     dict[str, tuple[str, str]]]:
    """(file, format) of each inserted drive by drive id, and by guest device id."""
    by_drive: dict[str, tuple[str, str]] = {}
    by_device: dict[str, tuple[str, str]] = {}
    for block in blocks:
        inserted = block.get("inserted") or {}
        path, fmt = str(inserted.get("file") or ""), str(inserted.get("drv") or "")
        if not os.path.isabs(path) or not fmt:
            continue
        if block.get("device"):
            by_drive[str(block["device"])] = (path, fmt)
        parts = [p for p in str(block.get("qdev") or "").split("/") if p]
        qdev = parts[2] if parts[:2] == ["machine", "peripheral"] and len(parts) > 2 else \
            (parts[-1] if parts else "")
        if qdev:
            by_device[qdev] = (path, fmt)
    return by_drive, by_device


def current_disk_argv(argv: Sequence[str], blocks: list[dict[str, Any]]) -> list[str]:
    """argv (without the binary) with every disk option naming the image query-block
    (`blocks`) shows for it; options and disks that did not change are left as they are."""
    out = list(argv)
    by_drive, by_device = _current(blocks)
    # Where each option value sits: disk options only, the rest is not parsed here.
    spots = [(i + 1, "-" + out[i].lstrip("-")) for i in range(len(out) - 1)
             if out[i].startswith("-") and "-" + out[i].lstrip("-") in BLOCK_OPTIONS]
    blockdevs: dict[str, int] = {}
    virtio = 0
    for at, name in spots:
        pairs = parse_keyval(out[at])
        if name == "-blockdev" and not out[at].startswith("{"):
            node = keyval_get(pairs, "node-name")
            if node:
                blockdevs[node] = at
        elif name == "-drive":
            drive_id = keyval_get(pairs, "id")
            if drive_id is None and keyval_get(pairs, "if") == "virtio" \
                    and keyval_get(pairs, "index") is None:
                drive_id = f"virtio{virtio}"   # QEMU's name for an unnamed virtio drive
            if keyval_get(pairs, "if") == "virtio":
                virtio += 1
            now = by_drive.get(drive_id or "")
            if now is not None and keyval_get(pairs, "file") not in (None, now[0]):
                keyval_set(pairs, "file", now[0])
                keyval_set(pairs, "format", now[1])
                out[at] = format_keyval(pairs)
    for at, name in spots:
        if name != "-device":
            continue
        pairs = parse_keyval(out[at], implied_key="driver")
        drive, device_id = keyval_get(pairs, "drive"), keyval_get(pairs, "id")
        now = by_device.get(device_id or "")
        if now is not None and drive in blockdevs:
            _point_blockdev(out, blockdevs, drive, *now)
    return out


def _point_blockdev(out: list[str], blockdevs: dict[str, int], node: str, path: str,
                    fmt: str) -> None:
    """The -blockdev `node` (a format node over a file node, or a file node) made to
    read `path` as `fmt`."""
    at = blockdevs[node]
    pairs = parse_keyval(out[at])
    driver = keyval_get(pairs, "driver")
    if driver == "file":
        if keyval_get(pairs, "filename") == path and fmt == "raw":
            return
        # The device sat on the file itself; it now needs a format node of its own.
        out[at] = format_keyval([("driver", fmt), ("node-name", node),
                                 ("file.driver", "file"), ("file.filename", path)])
        return
    child = keyval_get(pairs, "file")
    if child in blockdevs:
        child_at = blockdevs[child]
        child_pairs = parse_keyval(out[child_at])
        if keyval_get(child_pairs, "driver") == "file" and \
                keyval_get(child_pairs, "filename") != path:
            keyval_set(child_pairs, "filename", path)
            out[child_at] = format_keyval(child_pairs)
    elif keyval_get(pairs, "file.filename") not in (None, path):
        keyval_set(pairs, "file.filename", path)
    if driver != fmt:
        keyval_set(pairs, "driver", fmt)
    out[at] = format_keyval(pairs)

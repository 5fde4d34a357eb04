"""The filesystem under a RAM directory (agent.toml's ram_dir), read from /proc/self/mountinfo.

A destination's RAM file lives there. On a tmpfs mounted with huge pages (`huge=always`,
`within_size` or `advise`) a partial write() zeroes the rest of its 2 MiB page every
time, so pages are better copied in through the mapping; on a plain tmpfs, write() into a
fresh 4 KiB page is the cheaper way (see agent.batch.codec.apply_batch).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
HUGE_MODES = frozenset({"always", "within_size", "advise"})
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    """The mount a path lives on."""

    point: str
    fstype: str
    options: frozenset[str]   # the filesystem's own (super block) options

    @property
    def huge_pages(self) -> bool:
        """A tmpfs that backs files with transparent huge pages."""
        return self.fstype == "tmpfs" and any(
            opt.partition("=")[2] in HUGE_MODES for opt in self.options
            if opt.startswith("huge="))


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo (octal)."""
    return _OCTAL.sub(lambda m: chr(int(m[1], 8)), field)


def mount_of(path: Path, mountinfo: str | None = None) -> Mount | None:
    """The innermost mount holding path (resolved), or None if mountinfo cannot be read."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: Mount | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if dash < 5 or len(fields) < dash + 4:   # mount point first, then fs, source, options
            continue
        point = _unescape(fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        # Later lines mount over earlier ones at the same point: >= keeps the last.
        if inside and (best is None or len(point) >= len(best.point)):
            best = Mount(point, fields[dash + 1], frozenset(fields[dash + 3].split(",")))
    return best


def huge_pages(path: Path) -> bool:
    """Whether files under path get transparent huge pages (a tmpfs mounted with huge=)."""
    mount = mount_of(path)
    return mount is not None and mount.huge_pages

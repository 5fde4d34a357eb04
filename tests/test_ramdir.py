"""agent.ramdir: which mount holds a RAM directory, and whether it gives huge pages."""

from __future__ import annotations

from pathlib import Path

from agent import ramdir

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
26 22 0:22 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,size=24683792k
40 22 0:40 / /run/ferry\\040ram rw,relatime - tmpfs tmpfs rw,size=8g,huge=within_size
41 26 0:41 / /dev/shm/big rw,relatime - tmpfs tmpfs rw,huge=advise
42 26 0:42 / /dev/shm/never rw,relatime - tmpfs tmpfs rw,huge=never
43 22 0:43 / /mnt/hugefs rw,relatime - hugetlbfs none rw,pagesize=2M
44 22 0:44 / /srv/mémoire\\040vive rw,relatime - tmpfs tmpfs rw,huge=always
"""


def mount(path: str) -> ramdir.Mount | None:
    return ramdir.mount_of(Path(path), MOUNTINFO)


def test_innermost_mount_wins():
    assert mount("/dev/shm/x").point == "/dev/shm"
    assert mount("/dev/shm/big/vm.ram").point == "/dev/shm/big"
    assert mount("/dev/shmother").point == "/"     # a prefix of the name is not a parent
    assert mount("/var/lib").fstype == "ext4"


def test_huge_pages_only_on_a_tmpfs_mounted_with_them():
    assert not mount("/dev/shm/a").huge_pages
    assert mount("/dev/shm/big/a").huge_pages
    assert mount("/run/ferry ram/a").huge_pages      # \\040 in mountinfo is a space
    assert not mount("/dev/shm/never/a").huge_pages
    assert not mount("/mnt/hugefs/a").huge_pages     # hugetlbfs: not a tmpfs
    assert mount("/srv/mémoire vive/a").huge_pages   # a non-ASCII name beside an escape


def test_this_hosts_dev_shm_reads():
    found = ramdir.mount_of(Path("/dev/shm"))
    assert found is not None and found.fstype == "tmpfs"

"""Prefaulting the destination's RAM file: extents merged within bounds, pages populated."""

import mmap
import os

from agent.memory.prefault import MAX_EXTENTS, MERGE_GAP, Prefaulter, coarse_extents


def test_close_extents_merge_and_far_ones_stay_apart():
    assert coarse_extents([(0, 4096), (8192, 4096), (MERGE_GAP * 4, 4096)]) == [
        (0, 12288), (MERGE_GAP * 4, 4096)]


def test_many_extents_are_merged_down_to_the_limit():
    extents = [(i * 4 * MERGE_GAP, 4096) for i in range(MAX_EXTENTS * 3)]
    merged = coarse_extents(extents)
    assert len(merged) <= MAX_EXTENTS
    covered = sum(n for _, n in merged)
    assert all(any(o <= e < o + n for o, n in merged) for e, _ in extents)
    assert covered >= len(extents) * 4096


def test_prefault_populates_the_file_and_keeps_content(tmp_path):
    path = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    fd = os.open(os.path.join(path, f"ferry-prefault-{os.getpid()}"),
                 os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = 16 << 20
        os.ftruncate(fd, size)
        ram = mmap.mmap(fd, size)
        ram[4096:4100] = b"keep"
        worker = Prefaulter(ram, [(0, 8 << 20), (size - 4096, 1 << 30), (size * 2, 4096)])
        worker.wait()
        assert ram[4096:4100] == b"keep" and ram[0:4] == bytes(4)
        # Out-of-range parts are clipped; 0 means this kernel lacks MADV_POPULATE_WRITE.
        assert worker.populated in (0, (8 << 20) + 4096)
        assert os.fstat(fd).st_blocks * 512 >= worker.populated
        ram.close()
    finally:
        os.close(fd)
        os.unlink(os.path.join(path, f"ferry-prefault-{os.getpid()}"))

"""Dirty trackers on real mappings, SEEK_DATA extents on tmpfs, soft-dirty on synthetic data."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import tempfile
from array import array

import pytest

from agent._native import scan as native
from agent.errors import VmNotMigratableError
from agent.memory import _scan_py as twin
from agent.memory import scan, tracker
from agent.memory.tracker import HashScanTracker, SoftDirtyTracker

PAGE = scan.PAGE_SIZE
HASH = scan.HASH_SIZE
NPAGES = 64
SHM = "/dev/shm"


def address_of(buf: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


@pytest.fixture
def shm_file():
    """A sparse NPAGES-page file on tmpfs (like a guest RAM file): its fd and path."""
    fd, path = tempfile.mkstemp(dir=SHM, prefix="ferry-test-")
    try:
        os.ftruncate(fd, NPAGES * PAGE)
        yield fd, path
    finally:
        os.close(fd)
        os.unlink(path)


def test_first_round_is_the_nonzero_pages_then_only_writes():
    with mmap.mmap(-1, NPAGES * PAGE) as ram:
        for page in (0, 9, 63):
            ram[page * PAGE + 100] = 7
        with HashScanTracker(ram, threads=2) as hs:
            assert hs.name == "hash-scan" and hs.npages == NPAGES
            first = hs.collect()
            assert first == array("Q", [0, 9, 63])
            assert hs.collect() == first          # nothing acknowledged: still to send
            hs.acknowledge(first)
            assert hs.collect() == array("Q")
            ram[12 * PAGE] = 1
            ram[63 * PAGE + PAGE - 1] = 1
            assert hs.collect() == array("Q", [12, 63])
            hs.acknowledge([12])
            assert hs.collect() == array("Q", [63])   # unacknowledged pages stay dirty
            ram[9 * PAGE + 100] = 0               # back to zero: differs from what was sent
            assert hs.collect() == array("Q", [9, 63])


def test_sent_hash_of_the_copy_catches_a_page_written_while_read():
    with mmap.mmap(-1, NPAGES * PAGE) as ram:
        hs = HashScanTracker(ram, threads=1)
        ram[5 * PAGE] = 1
        assert hs.collect() == array("Q", [5])
        copy = ram[5 * PAGE:6 * PAGE]             # what a round would send
        ram[5 * PAGE + 1] = 2                     # the guest writes after the copy
        hs.sent_hashes[5 * HASH:6 * HASH] = scan.hash_pages(copy)
        assert hs.collect() == array("Q", [5])    # caught next round
        hs.sent_hashes[5 * HASH:6 * HASH] = scan.hash_pages(ram[5 * PAGE:6 * PAGE])
        assert hs.collect() == array("Q")
        hs.close()


def test_acknowledge_rejects_unsorted_or_outside_pages():
    with mmap.mmap(-1, NPAGES * PAGE) as ram:
        hs = HashScanTracker(ram)
        hs.collect()
        with pytest.raises(ValueError):
            hs.acknowledge([3, 2])
        with pytest.raises(ValueError):
            hs.acknowledge([NPAGES])


def test_bad_ram_length_rejected():
    with pytest.raises(ValueError):
        HashScanTracker(bytes(PAGE + 1))


def test_data_extents_on_sparse_tmpfs_file(shm_file):
    fd, _ = shm_file
    for backend in (native, twin):
        assert backend.data_extents(fd, NPAGES * PAGE) == []
    os.pwrite(fd, b"x" * 10, 5 * PAGE + 100)
    os.pwrite(fd, b"y" * (PAGE + 1), 20 * PAGE)     # spills into page 21
    os.pwrite(fd, b"z", (NPAGES - 1) * PAGE)
    expected = [(5 * PAGE, PAGE), (20 * PAGE, 2 * PAGE), ((NPAGES - 1) * PAGE, PAGE)]
    for backend in (native, twin):
        assert backend.data_extents(fd, NPAGES * PAGE) == expected
        assert backend.data_extents(fd, 21 * PAGE) == [(5 * PAGE, PAGE), (20 * PAGE, PAGE)]
        assert backend.extent_pages(expected, NPAGES) == [(5, 1), (20, 2), (NPAGES - 1, 1)]


def test_hash_scan_skipping_holes_finds_the_same_pages(shm_file):
    fd, _ = shm_file
    with mmap.mmap(fd, NPAGES * PAGE) as ram, \
            mmap.mmap(fd, NPAGES * PAGE, access=mmap.ACCESS_READ) as view:
        rng = random.Random(3)
        written = sorted(rng.sample([p for p in range(NPAGES) if p != 30], 10))
        for page in written:
            ram[page * PAGE + rng.randrange(PAGE)] = rng.randrange(1, 256)
        ram[30 * PAGE:31 * PAGE] = bytes(PAGE)       # written, but zeros: data, not dirty
        with HashScanTracker(view, fd=fd, threads=3) as skipping, \
                HashScanTracker(view, threads=3) as full:
            assert skipping.collect() == full.collect() == array("Q", written)
            assert skipping.current_hashes == full.current_hashes


def test_soft_dirty_parsing_of_synthetic_pagemap():
    rng = random.Random(5)
    entries = []
    for _ in range(300):
        entry = rng.getrandbits(55)                  # PFN and low flags: noise
        entry |= rng.choice([0, 1 << 63, 1 << 62]) | rng.choice([0, 1 << 61])
        entries.append(entry | (1 << 55 if rng.random() < 0.3 else 0))
    pagemap = b"".join(e.to_bytes(8, "little") for e in entries)
    expected = array("Q", [i for i, e in enumerate(entries) if e & 1 << 55])
    assert scan.soft_dirty_indices(pagemap) == expected
    # read_pagemap finds the entries of a mapping at their offset (vaddr / PAGE * 8).
    with tempfile.TemporaryFile() as fake:
        fake.write(pagemap)
        fake.flush()
        vaddr = 100 * PAGE
        entries_of_mapping = tracker.read_pagemap(fake.fileno(), vaddr, 50)
        assert entries_of_mapping == pagemap[100 * 8:150 * 8]
        assert scan.soft_dirty_indices(entries_of_mapping) == \
            array("Q", [i - 100 for i in expected if 100 <= i < 150])


def test_availability_is_a_boolean_and_decides_the_choice():
    usable = tracker.available(os.getpid())
    assert isinstance(usable, bool)
    with mmap.mmap(-1, NPAGES * PAGE) as ram:
        chosen = tracker.choose_tracker(ram)
        assert chosen.name == "hash-scan"
        chosen.close()


def test_choose_tracker_with_a_process(shm_file):
    fd, path = shm_file
    with mmap.mmap(fd, NPAGES * PAGE) as ram:
        chosen = tracker.choose_tracker(ram, pid=os.getpid(), ram_path=path, fd=fd)
        try:
            assert chosen.name == ("soft-dirty" if tracker.available(os.getpid())
                                   else "hash-scan")
            assert chosen.npages == NPAGES
        finally:
            chosen.close()


def test_find_ram_mapping_in_proc_maps(shm_file):
    fd, path = shm_file
    with mmap.mmap(fd, NPAGES * PAGE) as ram:
        assert tracker.find_ram_mapping(os.getpid(), path) == (address_of(ram), NPAGES * PAGE)
    with mmap.mmap(fd, NPAGES * PAGE, flags=mmap.MAP_PRIVATE) as private:
        with pytest.raises(VmNotMigratableError, match="privately"):
            tracker.find_ram_mapping(os.getpid(), path)
        del private
    with pytest.raises(VmNotMigratableError, match="does not map"):
        tracker.find_ram_mapping(os.getpid(), path)


def test_soft_dirty_tracker_on_this_process(shm_file):
    fd, path = shm_file
    with mmap.mmap(fd, NPAGES * PAGE) as ram:
        vaddr, _ = tracker.find_ram_mapping(os.getpid(), path)
        with SoftDirtyTracker(os.getpid(), vaddr, NPAGES) as sd:
            assert sd.collect() == array("Q", range(NPAGES))   # nothing known yet
            ram[7 * PAGE] = 1
            second = sd.collect()
            assert set(second) <= set(range(NPAGES))
            if tracker.available(os.getpid()):
                assert 7 in second
            else:
                assert second == array("Q")      # the bit never sets without kernel support


@pytest.mark.parametrize("count", [1, 3, 8, 1000])
def test_collect_in_parts_equals_collect(tmp_path, count):
    """Scanning part by part finds exactly what one scan finds, as absolute indices."""
    import mmap as mmap_mod
    import os as os_mod
    import random

    path = tmp_path / "ram"
    npages = 300
    with open(path, "wb") as f:
        f.truncate(npages * 4096)
    fd = os_mod.open(path, os_mod.O_RDWR)
    try:
        ram = mmap_mod.mmap(fd, npages * 4096)
        rng = random.Random(count)
        for page in rng.sample(range(npages), 60):
            ram[page * 4096:page * 4096 + 8] = rng.randbytes(8)
        whole = HashScanTracker(ram, fd=fd)
        pieces = HashScanTracker(ram, fd=fd)
        expected = list(whole.collect())
        parts = pieces.parts(count)
        assert parts[0].first == 0 and parts[-1].end == npages
        assert all(p.first < p.end for p in parts) and len(parts) <= count
        assert all(parts[i].end == parts[i + 1].first for i in range(len(parts) - 1))
        found = [page for part in parts for page in pieces.collect_part(part)]
        assert found == expected
        assert pieces.current_hashes == whole.current_hashes
        whole.close()
        pieces.close()
        ram.close()
    finally:
        os_mod.close(fd)


def test_shifted_matches_twin():
    from agent.memory import _scan_py, scan as scan_sel

    indices = array("Q", [0, 5, 7, 1 << 40])
    assert list(scan_sel.shifted(indices, 3)) == list(_scan_py.shifted(indices, 3)) == [
        3, 8, 10, (1 << 40) + 3]

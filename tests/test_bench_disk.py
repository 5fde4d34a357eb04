"""bench disk's pure parts (layout, seed file, summary), and the overlapped disk pipeline it
measures: the source's read-ahead/encode/send loop and the destination's coalesced,
pipelined NBD writes, each against fake NBD clients that answer out of order; one small
real run of the bench."""

from __future__ import annotations

import array
import asyncio
import gc
import json
import os
import random
import struct
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.batch import codec
from agent.batch.format import HEADER, MAGIC, VERSION, EntryKind, block_shift
from agent.buffers import BufferPool
from agent.qemu.destargv import DiskTarget
from agent.qemu.vmspec import DiskSpec
from agent.storage import disk_sink, disk_source
from agent.storage.disk_sink import DiskWriter, WriteRun, overlaps, write_runs
from agent.storage.disk_source import DISK_BLOCK, DISK_HEADER, DiskRounds
from bench import disk as bd

MIB = 1 << 20
BLOCK = 512          # small blocks for the pure write_runs tests


# ---------------------------------------------------------------------------- the bench

def test_layout_covers_the_disk_in_whole_blocks_and_dups_copy_earlier_data():
    size = 256 * MIB + 12 * 1024
    runs = bd.plan_layout(size, seed=3)
    assert runs[0] == bd.Run(0, bd.FIRST_HOLE, "hole")
    position = 0
    for run in runs:
        assert run.offset == position and run.length > 0
        position += run.length
    assert position == size
    assert runs[-1] == bd.Run(size - 12 * 1024, 12 * 1024, "hole")
    by_offset = {r.offset: r for r in runs}
    for run in runs[:-1]:
        assert run.offset % bd.BLOCK == 0 and run.length % bd.BLOCK == 0
        assert run.length <= bd.MAX_RUN_BLOCKS * bd.BLOCK
        if run.kind == "dup":
            donor = by_offset[run.source]
            assert donor.kind in ("random", "text") and donor.length >= run.length
            assert donor.offset < run.offset
    assert bd.plan_layout(size, seed=3) == runs


def test_layout_shares_follow_the_mix():
    size = 2048 * MIB
    total = bd.shares(bd.plan_layout(size))
    assert sum(total.values()) == size
    for kind, share in bd.MIX.items():
        assert abs(total[kind] / size - share) < 0.1, (kind, total)


def test_seed_file_holds_each_kind(tmp_path: Path):
    size = 64 * MIB
    runs = bd.plan_layout(size, seed=2)     # a seed whose layout has every kind
    seed = tmp_path / "seed.img"
    bd.write_seed(seed, runs, size, seed=2)
    data = seed.read_bytes()
    assert len(data) == size
    kinds = set()
    for run in runs:
        chunk = data[run.offset:run.offset + run.length]
        kinds.add(run.kind)
        if run.kind in ("hole", "zero"):
            assert chunk == bytes(run.length)
        elif run.kind == "dup":
            assert chunk == data[run.source:run.source + run.length]
        elif run.kind == "text":
            assert chunk.replace(b" ", b"").isalpha()
        else:
            assert chunk.count(0) < run.length // 64
    assert kinds == set(bd.MIX)


def test_qemu_img_reads_the_export_into_a_null_target():
    argv = bd.qemu_img_read_argv(Path("/run/x.nbd"), "ex", 1 << 31)
    assert argv[:4] == ["qemu-img", "convert", "-n", "-f"]
    assert "nbd+unix:///ex?socket=/run/x.nbd" in argv
    assert argv[-2:] == ["--target-image-opts", f"driver=null-co,size={1 << 31}"]


def test_qemu_copy_skips_zeros_between_two_exports():
    argv = bd.qemu_img_copy_argv(Path("/run/a.nbd"), Path("/run/b.nbd"), "ex")
    assert argv[:4] == ["qemu-img", "convert", "-n", "--target-is-zero"]
    assert argv[-2:] == ["nbd+unix:///ex?socket=/run/a.nbd", "nbd+unix:///ex?socket=/run/b.nbd"]
    daemon = bd.storage_daemon_argv(Path("/i.qcow2"), Path("/run/a.nbd"), "ex", writable=False)
    assert "type=nbd,id=ex,node-name=disk,name=ex,writable=off" in daemon


def test_summary_uses_the_same_bytes_for_both_speeds():
    cpu = {"qemu_img_cpu_s": {"qemu-img": 1.0, "qemu_src": 0.5},
           "migration_cpu_s": {"agent_a": 1.0, "agent_b": 1.0, "qemu_dst": 1.5},
           "qemu_copy_seconds": 1.25, "qemu_copy_cpu_s": {"qemu-img": 0.5, "qsd_dst": 0.5}}
    runs = [{"data_bytes": 10**9, "ferry_seconds": 2.0, "qemu_img_seconds": [1.0, 1.2, 0.8],
             **cpu},
            {"data_bytes": 10**9, "ferry_seconds": 1.0, "qemu_img_seconds": [1.0, 1.0, 1.0],
             **cpu}]
    result = bd.summarize(runs)
    assert result["cpu_s_per_gb"] == {"nbd_read": 1.5, "disk_copy": 3.5, "qemu_copy": 1.0}
    assert result["qemu_copy_gbps"] == pytest.approx(0.8)
    assert result["disk_copy_gbps"] == pytest.approx(0.75)
    assert result["nbd_read_gbps"] == pytest.approx(1.0)
    assert result["ratio"] == pytest.approx(0.75)
    assert result["targets"] == {"read": True, "qemu_copy_speed": False, "qemu_copy_cpu": False}
    assert result["qemu_copy_ratio"] == pytest.approx(0.75 / 0.8, abs=1e-3)
    assert result["met"] is False
    for run in runs:   # QEMU's copy slower and dearer: every target holds
        run["qemu_copy_seconds"], run["qemu_copy_cpu_s"] = 2.5, {"qemu-img": 4.0}
    assert bd.summarize(runs)["met"] is True
    runs[1]["ferry_seconds"] = 10.0
    assert bd.summarize(runs)["targets"]["read"] is False


# ---------------------------------------------------------------------------- write_runs

def raw_batch(entries: list[tuple[EntryKind, int, int]], data: bytes) -> bytes:
    """An uncompressed batch of BLOCK-byte blocks: (kind, block, COPY source) entries."""
    words: list[int] = []
    for kind, block, source in entries:
        words.append(int(kind) << 62 | block)
        if kind is EntryKind.COPY:
            words.append(source)
    copies = sum(1 for kind, _, _ in entries if kind is EntryKind.COPY)
    header = HEADER.pack(MAGIC, VERSION, block_shift(BLOCK), 0, len(entries), copies,
                         len(data), len(data))
    return header + struct.pack(f"<{len(words)}Q", *words) + data


def apply_runs(runs: list[WriteRun], disk: bytearray) -> None:
    """What the destination does with the runs, one after the other."""
    for run in runs:
        at, n = run.block * BLOCK, run.count * BLOCK
        if run.kind is EntryKind.ZERO:
            disk[at:at + n] = bytes(n)
        elif run.kind is EntryKind.DATA:
            assert run.data is not None and run.data.nbytes == n
            disk[at:at + n] = run.data
        else:
            source = bytes(disk[run.source * BLOCK:run.source * BLOCK + n])
            disk[at:at + n] = source


@st.composite
def batches(draw: st.DrawFn) -> tuple[int, list[tuple[EntryKind, int, int]], bytes]:
    nblocks = draw(st.integers(2, 24))
    entries = []
    data = b""
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(list(EntryKind)))
        block = draw(st.integers(0, nblocks - 1))
        source = 0
        if kind is EntryKind.COPY:
            source = draw(st.sampled_from([j for j in range(nblocks) if j != block]))
        if kind is EntryKind.DATA:
            data += bytes([draw(st.integers(1, 255))]) * BLOCK
        entries.append((kind, block, source))
    # Runs of neighbours are what the encoder makes; add some on purpose.
    if draw(st.booleans()) and nblocks >= 8:
        start, source = draw(st.integers(0, nblocks - 4)), draw(st.integers(0, nblocks - 4))
        for k in range(4):
            if start + k != source + k:
                entries.append((EntryKind.COPY, start + k, source + k))
    return nblocks, entries, data


@settings(max_examples=300, deadline=None)
@given(batches(), st.integers(1, 6))
def test_write_runs_do_what_the_entries_do(batch, max_blocks):
    nblocks, entries, data = batch
    decoded = codec.decode_batch(raw_batch(entries, data), nblocks, BLOCK)
    rng = random.Random(nblocks)
    start = bytearray(rng.randbytes(nblocks * BLOCK))
    expected = bytearray(start)
    codec.apply_batch(decoded, expected)
    runs = write_runs(decoded, max_blocks)
    got = bytearray(start)
    apply_runs(runs, got)
    assert got == expected
    assert sum(r.count for r in runs) == len(entries)
    assert all(1 <= r.count <= max_blocks for r in runs)


def test_write_runs_join_neighbours_but_not_overlapping_copies():
    data = b"a" * BLOCK + b"b" * BLOCK + b"c" * BLOCK
    entries = [(EntryKind.DATA, 4, 0), (EntryKind.DATA, 5, 0), (EntryKind.ZERO, 6, 0),
               (EntryKind.ZERO, 7, 0), (EntryKind.DATA, 9, 0),
               (EntryKind.COPY, 10, 0), (EntryKind.COPY, 11, 1),      # one run
               (EntryKind.COPY, 13, 12), (EntryKind.COPY, 14, 13)]    # 14 <- 13 just written
    runs = write_runs(codec.decode_batch(raw_batch(entries, data), 16, BLOCK))
    assert [(r.kind, r.block, r.count, r.source) for r in runs] == [
        (EntryKind.DATA, 4, 2, -1), (EntryKind.ZERO, 6, 2, -1), (EntryKind.DATA, 9, 1, -1),
        (EntryKind.COPY, 10, 2, 0), (EntryKind.COPY, 13, 1, 12), (EntryKind.COPY, 14, 1, 13)]
    assert runs[0].data is not None and bytes(runs[0].data) == data[:2 * BLOCK]
    assert runs[2].data is not None and bytes(runs[2].data) == data[2 * BLOCK:]
    assert runs[3].spans == ((10, 12), (0, 2)) and runs[0].spans == ((4, 6),)


def test_overlaps():
    assert overlaps(((0, 4),), ((3, 5),))
    assert not overlaps(((0, 4),), ((4, 5),))
    assert overlaps(((10, 12), (0, 2)), ((20, 30), (1, 2)))
    assert not overlaps(((10, 12), (0, 2)), ((2, 10), (12, 13)))


# ---------------------------------------------------------------------------- fake NBD

class FakeNbd:
    """An in-memory export whose requests finish after random delays, so requests in flight
    together complete in any order; each takes effect when it completes."""

    def __init__(self, size: int, seed: int = 1, content: bytes | None = None) -> None:
        self.disk = bytearray(content if content is not None else size)
        self.rng = random.Random(seed)
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests: list[tuple[str, int, int]] = []

    async def _delay(self) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            for _ in range(self.rng.randrange(4)):
                await asyncio.sleep(0)
            if self.rng.random() < 0.2:
                await asyncio.sleep(0.001)
        finally:
            self.in_flight -= 1

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        payload = bytes(data)   # the caller must keep data unchanged until we return
        await self._delay()
        self.requests.append(("write", offset, len(payload)))
        self.disk[offset:offset + len(payload)] = payload

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._delay()
        self.requests.append(("zero", offset, length))
        self.disk[offset:offset + length] = bytes(length)

    async def flush(self) -> None:
        writes_before = sum(1 for r in self.requests if r[0] == "write")
        await self._delay()
        self.requests.append(("flush", writes_before, self.in_flight))

    async def read(self, offset: int, length: int) -> bytearray:
        # Reads see the export as it is when the request arrives.
        data = bytearray(self.disk[offset:offset + length])
        await self._delay()
        self.requests.append(("read", offset, length))
        return data

    async def readinto(self, offset: int, buffer: memoryview) -> None:
        await self._delay()
        buffer[:] = self.disk[offset:offset + len(buffer)]


def disk_spec(size: int) -> DiskSpec:
    return DiskSpec(index=0, path="/d.img", format="raw", virtual_size=size, node="n0")


def write_through(batches: list[bytes], size: int, seed: int = 1) -> tuple[FakeNbd, DiskWriter]:
    """Every batch applied by a DiskWriter into a fake export of `size` bytes, drained."""

    async def main() -> tuple[FakeNbd, DiskWriter]:
        fake = FakeNbd(size, seed=seed)
        writer = DiskWriter(disk_spec(size), DiskTarget("/t.img", "raw"))
        writer.nbd = fake  # type: ignore[assignment]
        for batch in batches:
            await writer.apply(memoryview(batch))
        await writer.drain()
        return fake, writer

    return asyncio.run(main())


def test_disk_writer_keeps_entry_order_where_requests_touch_the_same_blocks():
    """Batches that rewrite, zero and copy the same blocks over and over, applied with many
    requests in flight that complete out of order, leave what the entries say."""
    nblocks = 40
    size = nblocks * DISK_BLOCK - 1000          # a partial last block too
    rng = random.Random(7)
    expected = bytearray(nblocks * DISK_BLOCK)
    payloads = []
    for _ in range(60):
        words, data, copies, count = [], b"", 0, 0
        for _ in range(rng.randrange(1, 12)):
            block = rng.randrange(nblocks)
            kind = rng.choice(list(EntryKind))
            if kind is EntryKind.COPY:
                # Not from the partial last block: beyond the disk's end the reference
                # (whole blocks) holds bytes the disk cannot.
                source = rng.choice([j for j in range(nblocks - 1) if j != block])
                words += [int(kind) << 62 | block, source]
                copies += 1
            else:
                words.append(int(kind) << 62 | block)
                if kind is EntryKind.DATA:
                    data += bytes([rng.randrange(1, 256)]) * DISK_BLOCK
            count += 1
        batch = HEADER.pack(MAGIC, VERSION, block_shift(DISK_BLOCK), 0, count, copies,
                            len(data), len(data)) + struct.pack(f"<{len(words)}Q", *words) + data
        codec.apply_batch(codec.decode_batch(batch, nblocks, DISK_BLOCK), expected)
        payloads.append(batch)
    # What the destination would hold: the last partial block is cut at the disk's end.
    want = bytes(expected[:size])

    fake, writer = write_through(payloads, size, seed=11)
    assert not writer.pending and not writer.touches and writer.held == 0
    assert bytes(fake.disk) == want
    assert fake.most_in_flight > 1


def test_disk_writer_joins_neighbouring_blocks_into_one_request():
    nblocks = 64
    size = nblocks * DISK_BLOCK
    content = os.urandom(size)
    sent = bytearray(codec.zero_block_hash(DISK_BLOCK) * nblocks)
    encoder = codec.BatchEncoder(None, DISK_BLOCK, sent, compress_level=None,
                                 max_data_bytes=disk_source.BATCH_DATA_BYTES)
    indices = array.array("Q", range(nblocks))
    batches, position = [], 0
    while position < nblocks:
        batch, position = encoder.encode(indices, position, src=content, base=0)
        batches.append(bytes(batch.payload))

    fake, _ = write_through(batches, size)
    assert bytes(fake.disk) == content
    blocks_per_request = disk_source.BATCH_DATA_BYTES // DISK_BLOCK
    assert len(fake.requests) == -(-nblocks // blocks_per_request)   # one write per batch
    assert disk_sink.RUN_BLOCKS >= blocks_per_request


def test_disk_writer_flushes_beside_the_writes_as_the_bytes_add_up(monkeypatch):
    """A flush goes out every FLUSH_EVERY_BYTES written, while writes are still in flight,
    so the final flush in the pause has little left to write back."""
    monkeypatch.setattr(disk_sink, "FLUSH_EVERY_BYTES", 8 * DISK_BLOCK)
    nblocks = 64
    size = nblocks * DISK_BLOCK
    content = os.urandom(size)
    sent = bytearray(codec.zero_block_hash(DISK_BLOCK) * nblocks)
    encoder = codec.BatchEncoder(None, DISK_BLOCK, sent, compress_level=None,
                                 max_data_bytes=4 * DISK_BLOCK)
    indices = array.array("Q", range(nblocks))
    batches, position = [], 0
    while position < nblocks:
        batch, position = encoder.encode(indices, position, src=content, base=0)
        batches.append(bytes(batch.payload))

    fake, writer = write_through(batches, size, seed=5)
    assert bytes(fake.disk) == content
    flushes = [r for r in fake.requests if r[0] == "flush"]
    assert writer.flushes == len(flushes) == nblocks // 8
    assert any(in_flight > 1 for _, _, in_flight in flushes)   # beside writes, not after


# ---------------------------------------------------------------------------- source loop

def rounds_for(size: int) -> DiskRounds:
    return DiskRounds(None, disk_spec(size), Path("/unused.nbd"), "job")  # type: ignore[arg-type]


def test_read_and_encode_sends_every_range_once_in_order():
    """Overlapped reads and encodes: the payloads, applied in order, rebuild the disk."""
    nblocks = 300
    size = nblocks * DISK_BLOCK - 4096
    rng = random.Random(2)
    content = bytearray(rng.randbytes(size))
    content[DISK_BLOCK * 100:DISK_BLOCK * 120] = content[:DISK_BLOCK * 20]    # dedup
    content[DISK_BLOCK * 150:DISK_BLOCK * 160] = bytes(DISK_BLOCK * 10)      # zero blocks
    ranges = [(0, 90 * DISK_BLOCK + 5), (95 * DISK_BLOCK, 200 * DISK_BLOCK),
              (297 * DISK_BLOCK, size - 297 * DISK_BLOCK)]

    async def main() -> tuple[list[bytes], DiskRounds]:
        fake = FakeNbd(size, content=bytes(content))
        rounds = rounds_for(size)
        got = []
        async for payload in rounds._read_and_encode(fake, ranges):  # type: ignore[arg-type]
            got.append(bytes(payload))
        return got, rounds

    payloads, rounds = asyncio.run(main())
    target = bytearray(nblocks * DISK_BLOCK)
    for payload in payloads:
        (index,) = DISK_HEADER.unpack_from(payload)
        assert index == 0
        codec.decode_and_apply(payload[DISK_HEADER.size:], target, nblocks, DISK_BLOCK)
    covered = bytearray(nblocks * DISK_BLOCK)
    for offset, length in ranges:
        first, end = offset // DISK_BLOCK, -(-(offset + length) // DISK_BLOCK)
        covered[first * DISK_BLOCK:end * DISK_BLOCK] = \
            content.ljust(nblocks * DISK_BLOCK, b"\0")[first * DISK_BLOCK:end * DISK_BLOCK]
    assert target == covered
    c = rounds.counters
    assert c.blocks_read == 91 + 200 + 3
    assert c.dedup_blocks == 20 and c.zero_blocks == 0   # zero blocks: already zero there
    assert c.batches == len(payloads) and c.wire_bytes == sum(map(len, payloads))


def test_read_and_encode_stopped_early_leaves_nothing_running():
    size = 200 * DISK_BLOCK

    async def main() -> None:
        fake = FakeNbd(size, content=os.urandom(size))
        rounds = rounds_for(size)
        stream = rounds._read_and_encode(fake, [(0, size)])  # type: ignore[arg-type]
        await stream.__anext__()
        await stream.aclose()  # type: ignore[attr-defined]
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []
        assert fake.in_flight == 0

    asyncio.run(main())


def test_payload_buffers_are_reused_only_when_nothing_views_them():
    pool = BufferPool(disk_source.PAYLOAD_POOL)
    first = pool.take(1000)
    view = memoryview(first)[:1000]
    second = pool.take(1000)
    assert second is not first
    view.release()
    gc.collect()
    assert pool.take(1000) is first
    assert pool.take(10 * MIB) is not first   # too small: a new one
    views = [memoryview(pool.take(10)) for _ in range(disk_source.PAYLOAD_POOL + 5)]
    assert len({id(v.obj) for v in views}) == len(views)     # none handed out twice
    assert len(pool._buffers) == disk_source.PAYLOAD_POOL


# ---------------------------------------------------------------------------- a real run

@pytest.mark.qemu
def test_bench_disk_small_run(capsys):
    before = set(os.listdir("/dev/shm"))
    code = bd.main(["--json", "--disk-mib", "64", "--reads", "1"])
    captured = capsys.readouterr()
    assert captured.out, f"no result (exit {code}): {captured.err}"
    result = json.loads(captured.out)
    assert code == (0 if result["met"] else 1)
    assert result["disk_copy_gbps"] > 0 and result["nbd_read_gbps"] > 0
    run = result["runs"][0]
    assert run["data_bytes"] > 4 * MIB and run["blocks_read"] * DISK_BLOCK >= run["data_bytes"]
    assert set(os.listdir("/dev/shm")) <= before
    assert run["qemu_img_cpu_s"]["qemu-img"] > 0
    assert {"agent_a", "agent_b", "qemu_src", "qemu_dst"} <= set(run["migration_cpu_s"])
    assert run["qemu_copy_seconds"] > 0 and result["qemu_copy_gbps"] > 0
    assert set(run["qemu_copy_cpu_s"]) == {"qsd_src", "qsd_dst", "qemu-img"}


def test_cpu_watch_counts_a_process_that_appears_from_its_start():
    pids: dict[str, int | None] = {"me": os.getpid(), "later": None}
    with bd.CpuWatch(lambda: dict(pids)) as watch:
        deadline = time.process_time() + 0.2
        while time.process_time() < deadline:
            pass
        pids["later"] = os.getpid()
        time.sleep(3 * bd.CPU_POLL_S)
    spent = watch.spent()
    assert 0.1 <= spent["me"] < 5
    assert spent["later"] >= spent["me"]      # counted from 0: this process's whole life

"""Page-batch codec throughput (encode, decode+apply) next to memcpy, one thread, one run.

Guest-like RAM (zero, text-like, random and duplicate 4 KiB pages) goes through
agent.batch.codec as round 0 would (every page dirty, the destination all zeros), with zstd off,
at level 1 and at level 3; then the same pages again when nothing changed (a page
rewritten with the same bytes is still dirty). Decode+apply takes the encoded batches into
a second buffer. Speeds are GB/s (10^9 bytes/s) of guest RAM processed, best of a few
repetitions; ratios are to the memcpy measured in the same run.
"""

from __future__ import annotations

import json
import mmap
import random
import sys
import time
from array import array
from collections.abc import Callable, Sequence

from agent.batch import codec
from bench import sized_args

PAGE_SIZE = 4096
MIB = 1 << 20
GB = 1e9
DEFAULT_SIZE_MIB = 256
# memcpy baselines: RAM into a batch-sized buffer (what the encoder does) and in large chunks.
BATCH_CHUNK = MIB
MEMCPY_CHUNK = 64 * MIB
LEVELS = (None, 1, 3)
# Shares of page kinds; "dup" pages repeat an earlier non-zero page (shared libraries,
# page cache copies), which is what COPY entries are for.
PAGE_MIX = {"zero": 0.30, "text": 0.30, "random": 0.25, "dup": 0.15}
WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by",
         "from", "kernel", "page", "memory", "buffer", "qemu", "guest", "device", "migrate",
         "round", "dirty", "hash", "zero", "copy", "send", "receive", "struct", "int", "return",
         "static", "void", "if", "else", "while", "unsigned", "long", "char"]


def guest_like_template(size: int, seed: int = 1) -> bytearray:
    """size bytes of zero, text-like, random and duplicate pages, mixed."""
    rng = random.Random(seed)
    npages = size // PAGE_SIZE
    kinds = rng.choices(list(PAGE_MIX), weights=list(PAGE_MIX.values()), k=npages)
    text = " ".join(rng.choices(WORDS, k=2 * MIB // 4)).encode()
    template = bytearray(size)
    filled: list[int] = []
    for page, kind in enumerate(kinds):
        at = page * PAGE_SIZE
        if kind == "text":
            start = rng.randrange(len(text) - PAGE_SIZE)
            template[at:at + PAGE_SIZE] = text[start:start + PAGE_SIZE]
        elif kind == "random":
            template[at:at + PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
        elif kind == "dup" and filled:
            j = rng.choice(filled)
            template[at:at + PAGE_SIZE] = template[j * PAGE_SIZE:(j + 1) * PAGE_SIZE]
        if kind != "zero":
            filled.append(page)
    return template


def guest_ram(size: int) -> mmap.mmap:
    """An anonymous mapping of size guest-like bytes; not a repeated template, since the
    repeats would all turn into COPY entries and flatter the figures."""
    ram = mmap.mmap(-1, size)
    ram[:] = guest_like_template(size)
    return ram


def best_seconds(run: Callable[[], object], repeat: int,
                 prepare: Callable[[], object] = lambda: None) -> float:
    """Shortest wall time of run() over repeat tries (prepare() untimed before each)."""
    best = float("inf")
    for _ in range(repeat):
        prepare()
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def encode_all(encoder: codec.BatchEncoder, indices: array[int],
               keep: bool) -> list[codec.EncodedBatch]:
    """Every batch for indices, or none if not keep (each dropped once made)."""
    batches = []
    pos = 0
    while pos < len(indices):
        batch, pos = encoder.encode(indices, pos)
        if keep:
            batches.append(batch)
    return batches


def measure_level(ram: mmap.mmap, dst: mmap.mmap, level: int | None,
                  repeat: int) -> dict[str, float]:
    """Round 0 of ram at one zstd level (None: off): encode, then decode+apply into dst."""
    size = len(ram)
    npages = size // PAGE_SIZE
    indices = array("Q", range(npages))
    zero_sent = codec.zero_block_hash(PAGE_SIZE) * npages
    state: dict[str, codec.BatchEncoder] = {}

    def fresh() -> None:
        state["encoder"] = codec.BatchEncoder(ram, PAGE_SIZE, bytearray(zero_sent),
                                              compress_level=level)

    # Timed as a sender streams: each batch is dropped once made, so its buffer is reused
    # by the next one (keeping them all would time page faults of fresh memory instead).
    seconds = best_seconds(lambda: encode_all(state["encoder"], indices, keep=False),
                           repeat, fresh)
    fresh()
    batches = encode_all(state["encoder"], indices, keep=True)
    figures = {"encode_gbps": size / GB / seconds,
               "wire_ratio": sum(b.nbytes for b in batches) / size,
               "batches": len(batches)}
    for kind in ("zero", "copy", "data", "unchanged"):
        figures[kind] = sum(getattr(b, f"{kind}_count") for b in batches)
    payloads = [b.payload for b in batches]
    del batches

    def apply_all() -> None:
        for payload in payloads:
            codec.apply_batch(codec.decode_batch(payload, npages, PAGE_SIZE), dst)

    apply_all()  # faults dst in and checks the result
    assert dst[:] == ram[:], "decode+apply did not reproduce the source"
    figures["decode_apply_gbps"] = size / GB / best_seconds(apply_all, repeat)
    return figures


def memcpy_gbps(ram: mmap.mmap, chunk: int, repeat: int) -> float:
    """Copying all of ram through one buffer of chunk bytes."""
    size = len(ram)
    chunk = min(size, chunk)
    with memoryview(ram) as view, memoryview(bytearray(chunk)) as target:

        def copy_all() -> None:
            for off in range(0, size - chunk + 1, chunk):
                target[:] = view[off:off + chunk]  # one copy, no temporary

        copy_all()
        return size / GB / best_seconds(copy_all, repeat)


def measure(size: int, repeat: int) -> dict[str, object]:
    """Every figure over one guest-like buffer of size bytes."""
    ram = guest_ram(size)
    dst = mmap.mmap(-1, size)
    try:
        memcpy = {"batch": memcpy_gbps(ram, BATCH_CHUNK, repeat),
                  "large": memcpy_gbps(ram, MEMCPY_CHUNK, repeat)}
        rounds = {"off" if level is None else f"zstd{level}": measure_level(ram, dst, level, repeat)
                  for level in LEVELS}
        # Nothing changed since the last send: every page is copied, hashed, skipped.
        npages = size // PAGE_SIZE
        indices = array("Q", range(npages))
        encoder = codec.BatchEncoder(ram, PAGE_SIZE,
                                     bytearray(codec.zero_block_hash(PAGE_SIZE) * npages))
        encode_all(encoder, indices, keep=False)
        unchanged = size / GB / best_seconds(lambda: encode_all(encoder, indices, keep=False),
                                             repeat)
    finally:
        ram.close()
        dst.close()
    return {"backend": codec.BACKEND, "size_mib": size // MIB, "memcpy_gbps": memcpy,
            "round0": rounds, "unchanged_encode_gbps": unchanged}


def table(result: dict[str, object]) -> str:
    """The result as a readable table with ratios to memcpy into a batch-sized buffer."""
    memcpy, rounds, unchanged = (result["memcpy_gbps"], result["round0"],
                                 result["unchanged_encode_gbps"])
    assert isinstance(memcpy, dict) and isinstance(rounds, dict) and isinstance(unchanged, float)
    base = memcpy["batch"]
    lines = [f"backend {result['backend']}, {result['size_mib']} MiB guest-like RAM, 1 thread",
             (f"memcpy: {base:.2f} GB/s into a 1 MiB buffer, {memcpy['large']:.2f} GB/s in "
              f"64 MiB chunks"),
             (f"{'round 0':>8}  {'encode GB/s':>11}  {'x memcpy':>8}  {'decode+apply GB/s':>17}"
              f"  {'x memcpy':>8}  {'wire/RAM':>8}  zero/copy/data/unchanged pages")]
    for name, r in rounds.items():
        lines.append(f"{name:>8}  {r['encode_gbps']:>11.2f}  {r['encode_gbps'] / base:>8.2f}"
                     f"  {r['decode_apply_gbps']:>17.2f}  {r['decode_apply_gbps'] / base:>8.2f}"
                     f"  {r['wire_ratio']:>8.3f}  {r['zero']}/{r['copy']}/{r['data']}/"
                     f"{r['unchanged']}")
    lines.append(f"encode, nothing changed: {unchanged:.2f} GB/s ({unchanged / base:.2f} x memcpy)")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """`python -m bench codec [--json] [--size-mib N] [--repeat N]`; 0 on success."""
    args = sized_args("codec", __doc__, argv, size_mib=DEFAULT_SIZE_MIB,
                      size_help="guest RAM size")
    result = measure(args.size_mib * MIB, args.repeat)
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

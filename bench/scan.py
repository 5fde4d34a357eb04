"""Page scan throughput against XXH3-128 over large buffers and memcpy, measured in one run.

Target (DESIGN §3, §8): the full native scan (hash every 4 KiB page, compare with the sent
hashes, list the dirty pages) runs at >= 80 % of the `xxhash` package hashing 64 MiB
buffers with XXH3-128, with 1 and with 2 threads each. Speeds are GB/s (10^9 bytes/s),
best of a few repetitions over a guest-like buffer (zero, text-like and random pages).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence

import xxhash

from agent._native import scan
from bench import sized_args

PAGE_SIZE = scan.PAGE_SIZE
HASH_SIZE = scan.HASH_SIZE
MIB = 1 << 20
GB = 1e9
DEFAULT_SIZE_MIB = 1024
# The guest-like pages are built once in a template this big and repeated to fill RAM.
TEMPLATE_SIZE = 64 * MIB
# The xxhash baseline hashes large buffers, where XXH3 runs at its best.
XXH_CHUNK = 64 * MIB
MEMCPY_CHUNK = 256 * MIB
THREAD_COUNTS = (1, 2)
TARGET_RATIO = 0.8
# Shares of zero, text-like and random pages; a booted idle guest has many zero pages.
PAGE_MIX = {"zero": 0.35, "text": 0.35, "random": 0.30}
WORDS = ("the of and to in is was for on that with as by at from kernel page memory "
         "buffer qemu guest device migrate round dirty hash zero copy send receive "
         "struct int return static void if else while unsigned long char").split()


def guest_like_template(size: int, seed: int = 1) -> bytearray:
    """size bytes of pages: zero, text-like (words, varied per page) and random, mixed."""
    rng = random.Random(seed)
    npages = size // PAGE_SIZE
    kinds = rng.choices(list(PAGE_MIX), weights=list(PAGE_MIX.values()), k=npages)
    text = " ".join(rng.choices(WORDS, k=2 * MIB // 4)).encode()
    noise = os.urandom(kinds.count("random") * PAGE_SIZE)
    template = bytearray(size)
    used_noise = 0
    for page, kind in enumerate(kinds):
        offset = page * PAGE_SIZE
        if kind == "text":
            start = rng.randrange(len(text) - PAGE_SIZE)
            template[offset:offset + PAGE_SIZE] = text[start:start + PAGE_SIZE]
        elif kind == "random":
            template[offset:offset + PAGE_SIZE] = noise[used_noise:used_noise + PAGE_SIZE]
            used_noise += PAGE_SIZE
    return template


def guest_ram(size: int) -> mmap.mmap:
    """An anonymous mapping of size bytes, populated with guest-like pages."""
    template = guest_like_template(min(size, TEMPLATE_SIZE))
    ram = mmap.mmap(-1, size)
    for offset in range(0, size, len(template)):
        ram[offset:offset + len(template)] = template[:size - offset]
    return ram


def best_seconds(run: Callable[[], object], repeat: int) -> float:
    """Shortest wall time of run() over repeat tries, after one untimed warm-up."""
    run()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def xxh3_in_threads(view: memoryview, nthreads: int) -> None:
    """XXH3-128 of every XXH_CHUNK of view, the chunks split contiguously over threads."""
    chunks = [view[off:off + XXH_CHUNK] for off in range(0, len(view), XXH_CHUNK)]

    def work(share: list[memoryview]) -> None:
        for chunk in share:
            xxhash.xxh3_128_intdigest(chunk)

    shares = [chunks[i * len(chunks) // nthreads:(i + 1) * len(chunks) // nthreads]
              for i in range(nthreads)]
    threads = [threading.Thread(target=work, args=(share,)) for share in shares[1:]]
    for thread in threads:
        thread.start()
    work(shares[0])
    for thread in threads:
        thread.join()
    for chunk in chunks:
        chunk.release()


def measure(size: int, repeat: int) -> dict[str, object]:
    """The three figures, in GB/s, over one guest-like buffer of size bytes."""
    ram = guest_ram(size)
    try:
        npages = size // PAGE_SIZE
        sent = scan.ZERO_PAGE_HASH * npages          # round 0: every non-zero page is dirty
        current = bytearray(npages * HASH_SIZE)
        scan_gbps = {str(n): size / GB / best_seconds(
            lambda n=n: scan.scan(ram, sent, current, threads=n), repeat) for n in THREAD_COUNTS}
        with memoryview(ram) as view:
            xxh_gbps = {str(n): size / GB / best_seconds(
                lambda n=n: xxh3_in_threads(view, n), repeat) for n in THREAD_COUNTS}
            # Assigning into a memoryview copies once; a bytearray slice would copy twice.
            with memoryview(bytearray(min(size, MEMCPY_CHUNK))) as target:

                def copy_all() -> None:
                    for off in range(0, size, len(target)):
                        chunk = min(len(target), size - off)
                        target[:chunk] = view[off:off + chunk]

                memcpy_gbps = size / GB / best_seconds(copy_all, repeat)
    finally:
        ram.close()
    return {"scan_gbps": scan_gbps, "xxh3_128_gbps": xxh_gbps, "memcpy_gbps": memcpy_gbps}


def targets_met(result: dict[str, object]) -> bool:
    """scan >= TARGET_RATIO * xxh3-128 for every thread count measured."""
    scan_gbps, xxh_gbps = result["scan_gbps"], result["xxh3_128_gbps"]
    assert isinstance(scan_gbps, dict) and isinstance(xxh_gbps, dict)
    return all(scan_gbps[n] >= TARGET_RATIO * xxh_gbps[n] for n in xxh_gbps)


def table(result: dict[str, object]) -> str:
    """The result as a readable table with the target verdict."""
    scan_gbps, xxh_gbps = result["scan_gbps"], result["xxh3_128_gbps"]
    assert isinstance(scan_gbps, dict) and isinstance(xxh_gbps, dict)
    lines = [f"{'threads':>7}  {'scan GB/s':>10}  {'xxh3-128 GB/s':>13}  {'ratio':>6}"]
    for n in xxh_gbps:
        ratio = scan_gbps[n] / xxh_gbps[n]
        lines.append(f"{n:>7}  {scan_gbps[n]:>10.2f}  {xxh_gbps[n]:>13.2f}  {ratio:>6.2f}")
    lines.append(f"memcpy: {result['memcpy_gbps']:.2f} GB/s")
    verdict = "met" if targets_met(result) else "NOT met"
    lines.append(f"target scan >= {TARGET_RATIO:.0%} of xxh3-128 per thread count: {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """`python -m bench scan [--json]`: 0 when the target holds, 1 when it does not."""
    args = sized_args("scan", __doc__, argv, size_mib=DEFAULT_SIZE_MIB,
                      size_help="buffer size")
    result = measure(args.size_mib * MIB, args.repeat)
    print(json.dumps(result) if args.json else table(result))
    return 0 if targets_met(result) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

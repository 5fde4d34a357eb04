"""ferry's local disk import (agent.importer.copy) against `qemu-img convert -O qcow2` of
the same image on the same machine, per source format.

    python -m bench import [--json] [--size-mib N] [--repeat N] [--formats F,F,...]

One run writes a seed (512 MiB virtual by default) with bench disk's mix of content:
random runs, text-like runs, duplicated runs, zero runs and holes, in runs of 64 KiB to
8 MiB. Per format the seed is converted with qemu-img (`-o subformat=...` for vmdk and
vpc), then the zero runs are written into the image as zero bytes (allocated data that
reads as zero, as a guest's zeroed blocks are; where the image refuses such a rewrite,
they stay holes and `zero_runs_as_data` says so). Then, per repeat, in alternating order:

- qemu_img: `qemu-img convert -f FMT -O qcow2 SRC DST` into a new file, wall time of the
  process;
- ferry: `import_disk(SRC, DST, target_format="qcow2")` in this process (on uvloop, as
  the agent runs): a one-shot `--local` import, copied by `qemu-img convert` run by
  agent.importer.qemuimg. Timed: the whole call (probing, `qemu-img map`, the copy; then
  the verification by `qemu-img compare`, which a bare convert does not do) and the
  report's copy and verify seconds apart. The target is judged on the call without the
  verification (`ferry_copy`): the work convert does;
  the ratio with it is printed too;
- ferry codec (information): the same call with engine "ferry", ferry's own path through
  two NBD exports and the batch codec, which warm passes and imports to a peer take; wall
  time of the whole call, its verification (blocks read back and hashed) included.

The first ferry target of each format is checked with `qemu-img compare` against the
source. Everything lives on /dev/shm, so both read and write memory, not a disk: the
speeds are the programs' own. MB/s is 10**6 bytes of the source's data (everything its
`base:allocation` does not flag zero) per second of the median time.

Target: ferry's speed >= 0.8 x qemu-img's for every format (medians over the repeats).
Exit code 0 when met for every format, 1 when not or when a run failed, 130 when
interrupted. Everything the bench writes is removed on the way out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.errors import FerryError
from agent.importer.copy import DiskImportReport, import_disk
from agent.net.channel import run as run_on_uvloop
from bench import parser as bench_parser
from bench import run_measurement
from bench.disk import BLOCK, MIB, Run, plan_layout, shares, write_seed

TARGET_RATIO = 0.8
DEFAULT_SIZE_MIB = 512
QEMU_IMG_TIMEOUT_S = 300.0
# name -> (qemu-img format, create options); every format and subformat an import reads.
FORMATS: dict[str, tuple[str, list[str]]] = {
    "raw": ("raw", []),
    "qcow2": ("qcow2", []),
    "vmdk-monolithicSparse": ("vmdk", ["-o", "subformat=monolithicSparse"]),
    "vmdk-monolithicFlat": ("vmdk", ["-o", "subformat=monolithicFlat"]),
    "vmdk-twoGbMaxExtentSparse": ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"]),
    "vmdk-twoGbMaxExtentFlat": ("vmdk", ["-o", "subformat=twoGbMaxExtentFlat"]),
    "vmdk-streamOptimized": ("vmdk", ["-o", "subformat=streamOptimized"]),
    "vdi": ("vdi", []),
    "vhdx": ("vhdx", []),
    "vpc-fixed": ("vpc", ["-o", "subformat=fixed"]),
    "vpc-dynamic": ("vpc", ["-o", "subformat=dynamic"]),
}


class BenchError(FerryError):
    """A run could not be measured."""


def run(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True,
                          timeout=QEMU_IMG_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[:2])} failed: {done.stderr.strip()}")


def make_image(seed: Path, image: Path, name: str, runs: Sequence[Run]) -> bool:
    """The seed converted to format `name`, its zero runs then written as zero bytes;
    whether the image took them (a streamOptimized vmdk may refuse rewrites)."""
    fmt, options = FORMATS[name]
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, *options, str(seed), str(image)])
    zero = [f"write -P 0 {r.offset} {r.length}" for r in runs if r.kind == "zero"]
    try:
        for start in range(0, len(zero), 200):   # keep the command line short
            argv = ["qemu-io", "-f", fmt]
            for command in zero[start:start + 200]:
                argv += ["-c", command]
            run([*argv, str(image)])
    except BenchError:
        if name != "vmdk-streamOptimized":
            raise
        return False
    return True


def remove_image(image: Path) -> None:
    """The image and any extent files beside it (vmdk's -s001, -f001, -flat)."""
    for path in image.parent.glob(image.stem + "*"):
        path.unlink(missing_ok=True)


def time_qemu_img(image: Path, fmt: str, target: Path) -> float:
    started = time.perf_counter()
    run(["qemu-img", "convert", "-f", fmt, "-O", "qcow2", str(image), str(target)])
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def time_ferry(image: Path, fmt: str, target: Path, work: Path,
               check: bool, engine: str = "auto") -> tuple[float, DiskImportReport]:
    started = time.perf_counter()
    report = run_on_uvloop(import_disk(image, target, roots=[work], target_format="qcow2",
                                       source_format=fmt, run_dir=work, engine=engine))
    seconds = time.perf_counter() - started
    if check:
        done = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", "qcow2",
                               str(image), str(target)], capture_output=True, text=True,
                              timeout=QEMU_IMG_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise BenchError(f"ferry's import of {image.name} differs from it: "
                             f"{done.stdout.strip() or done.stderr.strip()}")
    target.unlink()
    return seconds, report


def one_format(seed: Path, work: Path, name: str, runs: Sequence[Run], repeat: int,
               note: Callable[[str], None]) -> dict[str, Any]:
    fmt = FORMATS[name][0]
    image = work / f"src-{name}.img"
    target = work / "target.qcow2"
    try:
        zero_data = make_image(seed, image, name, runs)
        qemu_times: list[float] = []
        codec_times: list[float] = []
        ferry_times: list[float] = []
        copy_times: list[float] = []
        verify_times: list[float] = []
        report: DiskImportReport | None = None
        for n in range(repeat):
            # Alternate who goes first, so neither always finds the caches warmer.
            order = ("qemu", "ferry") if n % 2 == 0 else ("ferry", "qemu")
            for who in order:
                if who == "qemu":
                    qemu_times.append(time_qemu_img(image, fmt, target))
                else:
                    seconds, report = time_ferry(image, fmt, target, work, check=n == 0)
                    ferry_times.append(seconds)
                    copy_times.append(report.copy_seconds)
                    verify_times.append(report.verify_seconds)
            codec_times.append(time_ferry(image, fmt, target, work, check=n == 0,
                                          engine="ferry")[0])
        assert report is not None
        qemu_s, ferry_s = statistics.median(qemu_times), statistics.median(ferry_times)
        # The call less its verification: probing, map and copy.
        copy_s = statistics.median(f - v for f, v in zip(ferry_times, verify_times,
                                                          strict=True))
        data = report.allocated_bytes
        # Microseconds: a small image copies in tens of ms, where ms would skew the ratio.
        result = {
            "format": name, "virtual_size": report.virtual_size, "data_bytes": data,
            "written_bytes": report.bytes_written, "zero_runs_as_data": zero_data,
            "qemu_img_seconds": [round(t, 6) for t in qemu_times],
            "ferry_seconds": [round(t, 6) for t in ferry_times],
            "ferry_copy_seconds": copy_times, "ferry_verify_seconds": verify_times,
            "ferry_codec_seconds": [round(t, 6) for t in codec_times],
            "engine": report.engine,
            "qemu_img_mbps": round(data / qemu_s / 1e6, 1),
            "ferry_mbps": round(data / ferry_s / 1e6, 1),
            "ferry_copy_mbps": round(data / copy_s / 1e6, 1),
            "ferry_codec_mbps": round(data / statistics.median(codec_times) / 1e6, 1),
            "ratio": round(qemu_s / copy_s, 3),
            "ratio_with_verify": round(qemu_s / ferry_s, 3), "verified": report.verified,
            "met": qemu_s / copy_s >= TARGET_RATIO}
        note(f"{name}: ferry {copy_s:.2f} s (+{ferry_s - copy_s:.2f} s verifying), "
             f"qemu-img {qemu_s:.2f} s, ratio {result['ratio']:.2f} "
             f"({result['ratio_with_verify']:.2f} verified)")
        return result
    finally:
        remove_image(image)
        target.unlink(missing_ok=True)


def readable(result: dict[str, Any]) -> str:
    lines = [f"{'format':<27}{'data MiB':>9}{'ferry':>7}{'+verify':>8}{'qemu-img':>10}"
             f"{'ratio':>7}{'+verify':>8}{'ferry codec':>12}  MB/s; target {TARGET_RATIO}x"]
    for row in result["formats"]:
        lines.append(f"{row['format']:<27}{row['data_bytes'] / MIB:>9.0f}"
                     f"{row['ferry_copy_mbps']:>7.0f}{row['ferry_mbps']:>8.0f}"
                     f"{row['qemu_img_mbps']:>10.0f}{row['ratio']:>7.2f}"
                     f"{row['ratio_with_verify']:>8.2f}{row['ferry_codec_mbps']:>12.0f}  "
                     f"{'met' if row['met'] else 'MISSED'}")
    missed = [row["format"] for row in result["formats"] if not row["met"]]
    lines.append(f"{result['size_mib']} MiB images, median of {result['repeat']} runs each, "
                 f"{result['cpus']} CPUs, load {result['load_before'][0]:.2f} -> "
                 f"{result['load_after'][0]:.2f}")
    lines.append("every format met the target" if not missed
                 else f"missed the target: {', '.join(missed)}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = bench_parser("import", __doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--size-mib", type=int, default=DEFAULT_SIZE_MIB,
                        help=f"virtual size of each image in MiB (default {DEFAULT_SIZE_MIB})")
    parser.add_argument("--repeat", type=int, default=3, metavar="N",
                        help="timed runs of each side per format (default 3)")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="comma-separated formats (default: all)")
    args = parser.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown or not args.formats:
        parser.error(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")
    if args.size_mib < 2 or args.repeat < 1:
        parser.error("--size-mib must be at least 2, --repeat at least 1")
    return args


def measure(args: argparse.Namespace, note: Callable[[str], None]) -> dict[str, Any]:
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-import-", dir="/dev/shm"))
    try:
        layout = plan_layout(size)
        note(f"seed of {args.size_mib} MiB: "
             + ", ".join(f"{kind} {n / MIB:.0f} MiB" for kind, n in shares(layout).items()))
        seed = work / "seed.raw"
        write_seed(seed, layout, size)
        load_before = os.getloadavg()
        rows = [one_format(seed, work, name, layout, args.repeat, note)
                for name in args.formats]
        return {"formats": rows, "met": all(row["met"] for row in rows),
                "target_ratio": TARGET_RATIO, "size_mib": args.size_mib,
                "repeat": args.repeat, "block": BLOCK, "cpus": os.cpu_count(),
                "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    """`python -m bench import`: 0 when every format meets the target, else 1."""
    args = parse_args(argv)
    return run_measurement("import", lambda note: measure(args, note), readable, args.json,
                           "interrupted; everything written was removed")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The disk copy of an import on one host (agent.importer.copy), with real qemu-img,
qemu-io and qemu-storage-daemon: every source format and subformat QEMU makes, into qcow2
and raw, compared with `qemu-img compare`; zero runs not written; warm passes; refusals;
clean-up after failures."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.errors import LocalError, UserError
from agent.importer import qemuimg, warmstate
from agent.importer.copy import DiskImportReport, Progress, default_state_file, import_disk
from agent.importer.images import probe
from agent.importer.verify import compare

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
BLOCK = 64 << 10
SIZE = 16 * MIB
# What each test image holds: a pattern, a run of zero bytes written as data (allocated in
# sparse formats, yet never to be written to the target), a second pattern at the end, the
# rest never written (holes). Offsets and lengths are whole 64 KiB blocks.
WRITES = [("0xab", 1 * MIB, 3 * MIB), ("0", 6 * MIB, 1 * MIB), ("0x5c", 15 * MIB, BLOCK)]
NONZERO_BYTES = 3 * MIB + BLOCK

# (qemu-img format, create options, format to tell qemu-img): every subformat of #13.
SOURCES = {
    "raw": ("raw", [], None),
    "qcow2": ("qcow2", [], None),
    "vmdk-monolithicSparse": ("vmdk", ["-o", "subformat=monolithicSparse"], None),
    "vmdk-monolithicFlat": ("vmdk", ["-o", "subformat=monolithicFlat"], None),
    "vmdk-twoGbMaxExtentSparse": ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"], None),
    "vmdk-twoGbMaxExtentFlat": ("vmdk", ["-o", "subformat=twoGbMaxExtentFlat"], None),
    "vmdk-streamOptimized": ("vmdk", ["-o", "subformat=streamOptimized"], None),
    "vdi-dynamic": ("vdi", [], None),
    "vdi-static": ("vdi", ["-o", "static=on"], None),
    "vhdx": ("vhdx", [], None),
    # A fixed VHD has its footer at the end only: QEMU's probe takes it for raw, so the
    # format comes from the configuration (or the .vhd name), as the inspector gives it.
    "vpc-fixed": ("vpc", ["-o", "subformat=fixed"], "vpc"),
    "vpc-dynamic": ("vpc", ["-o", "subformat=dynamic"], None),
}


def qemu_io(fmt: str, image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def make_source(directory: Path, name: str) -> tuple[Path, str, str | None]:
    fmt, options, told = SOURCES[name]
    image = directory / f"{name}.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *options, str(image), str(SIZE)],
                   check=True, capture_output=True)
    qemu_io(fmt, image, *(f"write -P {pattern} {offset} {length}"
                          for pattern, offset, length in WRITES))
    return image, fmt, told


def identical(source: Path, source_fmt: str, target: Path, target_fmt: str) -> bool:
    done = subprocess.run(["qemu-img", "compare", "-f", source_fmt, "-F", target_fmt,
                           str(source), str(target)], capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def data_bytes(image: Path, fmt: str) -> int:
    """Bytes of `image` that hold data (qemu-img map), i.e. its allocation."""
    done = subprocess.run(["qemu-img", "map", "--output=json", "-f", fmt, str(image)],
                          check=True, capture_output=True, text=True)
    return sum(e["length"] for e in json.loads(done.stdout) if e["data"])


def data_in(image: Path, fmt: str, start: int, length: int) -> bool:
    """Whether any of [start, start + length) of `image` is allocated as data."""
    done = subprocess.run(["qemu-img", "map", "--output=json", "-f", fmt, str(image)],
                          check=True, capture_output=True, text=True)
    return any(e["data"] and e["start"] < start + length and start < e["start"] + e["length"]
               for e in json.loads(done.stdout))


def qemu_children() -> list[int]:
    """Pids of qemu-storage-daemon and qemu-img processes this test process started."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        if name.startswith(("qemu-storage", "qemu-img")) and int(rest.split()[1]) == os.getpid():
            found.append(int(entry))
    return found


def run_import(source: Path, target: Path, roots: list[Path], **options: object
               ) -> DiskImportReport:
    return asyncio.run(import_disk(source, target, roots=roots, **options))  # type: ignore[arg-type]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.mark.parametrize("engine", ["auto", "ferry"])
@pytest.mark.parametrize("target_format", ["qcow2", "raw"])
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_import_every_format(tmp_path: Path, run_dir: Path, name: str,
                             target_format: str, engine: str) -> None:
    """engine auto: a one-shot copy by `qemu-img convert`; ferry: the codec's path."""
    source, fmt, told = make_source(tmp_path, name)
    target = tmp_path / f"out.{target_format}"
    seen: list[Progress] = []
    report = run_import(source, target, [tmp_path], target_format=target_format,
                        source_format=told, progress=seen.append, run_dir=run_dir,
                        engine=engine)
    assert identical(source, fmt, target, target_format)
    assert report.engine == ("qemu" if engine == "auto" else "ferry")
    assert report.format == fmt and report.target_format == target_format
    assert report.virtual_size >= SIZE
    assert report.verified and report.mismatches == 0
    assert report.blocks_compared == -(-report.virtual_size // BLOCK)
    # qemu-img creates a raw file with its first 4 KiB allocated (QEMU probes alignment
    # there), whether ferry creates it or convert does.
    first_block = 4096 if target_format == "raw" else 0
    # Only the two patterns are written: not the zero run, not the holes.
    assert not data_in(target, target_format, 6 * MIB, MIB)
    # convert finds zeros 4 KiB at a time, ferry 64 KiB: only the patterns become data.
    assert data_bytes(target, target_format) == NONZERO_BYTES + first_block
    if engine == "ferry":
        assert report.bytes_written == NONZERO_BYTES
        assert report.blocks_written == NONZERO_BYTES // BLOCK
    else:
        # convert's figure is the target's data map, read after the copy.
        assert report.bytes_written == data_bytes(target, target_format)
    assert report.bytes_read + report.zero_bytes_skipped == report.virtual_size
    assert report.bytes_read >= NONZERO_BYTES
    assert report.warm_pass == 1
    assert seen and seen[-1].done == seen[-1].total == report.allocated_bytes
    assert qemu_children() == [] and list(run_dir.iterdir()) == []


@pytest.mark.parametrize("engine", ["auto", "ferry"])
def test_sparse_sources_skip_their_holes(tmp_path: Path, run_dir: Path, engine: str) -> None:
    source, _, _ = make_source(tmp_path, "vmdk-monolithicSparse")
    report = run_import(source, tmp_path / "out.qcow2", [tmp_path], run_dir=run_dir,
                        engine=engine)
    # The holes are never read: only the grains qemu-io wrote (patterns and zero run).
    assert report.bytes_read == NONZERO_BYTES + MIB
    assert report.zero_bytes_skipped == SIZE - NONZERO_BYTES - MIB


def test_repeated_blocks_are_copied_on_the_target(tmp_path: Path, run_dir: Path) -> None:
    source, fmt, _ = make_source(tmp_path, "qcow2")
    target = tmp_path / "out.qcow2"
    report = run_import(source, target, [tmp_path], run_dir=run_dir, engine="ferry")
    # 0xab over 3 MiB is 48 equal blocks: the first is sent, the others copied there.
    assert report.dedup_blocks == 3 * MIB // BLOCK - 1
    assert identical(source, fmt, target, "qcow2")


def change_source(source: Path) -> None:
    """Three blocks change: one rewritten, one written where there was a hole, one zeroed."""
    qemu_io("qcow2", source, f"write -P 0x77 {2 * MIB} {BLOCK}",
            f"write -P 0x66 {10 * MIB} {BLOCK}", f"write -z {1 * MIB} {BLOCK}")


def test_warm_passes_write_only_what_changed(tmp_path: Path, run_dir: Path) -> None:
    source, _, _ = make_source(tmp_path, "qcow2")
    target = tmp_path / "out.qcow2"
    state = default_state_file(target)
    first = run_import(source, target, [tmp_path], state_file=state, run_dir=run_dir)
    assert first.warm_pass == 1 and first.bytes_written == NONZERO_BYTES and state.exists()

    change_source(source)
    second = run_import(source, target, [tmp_path], state_file=state, run_dir=run_dir)
    assert identical(source, "qcow2", target, "qcow2")
    assert second.warm_pass == 2 and second.verified
    assert second.blocks_read > 3           # the whole allocated source is read again
    assert (second.blocks_changed, second.blocks_written, second.blocks_zeroed) == (3, 2, 1)
    assert second.bytes_written == 2 * BLOCK

    third = run_import(source, target, [tmp_path], state_file=state, run_dir=run_dir)
    assert third.warm_pass == 3 and third.blocks_changed == 0 and third.bytes_written == 0
    assert identical(source, "qcow2", target, "qcow2")


def test_warm_pass_into_raw_notices_a_block_turned_zero(tmp_path: Path, run_dir: Path) -> None:
    source, _, _ = make_source(tmp_path, "qcow2")
    target = tmp_path / "out.raw"
    state = tmp_path / "hashes.state"
    run_import(source, target, [tmp_path], target_format="raw", state_file=state,
               run_dir=run_dir)
    # A discard turns the block into a hole: the source no longer reads it at all.
    qemu_io("qcow2", source, f"discard {15 * MIB} {BLOCK}")
    second = run_import(source, target, [tmp_path], target_format="raw", state_file=state,
                        run_dir=run_dir)
    assert (second.blocks_written, second.blocks_zeroed) == (0, 1)
    assert identical(source, "qcow2", target, "raw")


def test_failed_first_pass_leaves_no_target(tmp_path: Path, run_dir: Path) -> None:
    source, _, _ = make_source(tmp_path, "vmdk-monolithicSparse")
    target = tmp_path / "out.qcow2"
    state = default_state_file(target)

    def interrupt(progress: Progress) -> None:
        raise RuntimeError("operator gave up")

    with pytest.raises(RuntimeError, match="operator gave up"):
        run_import(source, target, [tmp_path], state_file=state, progress=interrupt,
                   run_dir=run_dir)
    assert not target.exists() and not state.exists()
    assert qemu_children() == [] and list(run_dir.iterdir()) == []


def test_failed_one_shot_copy_leaves_no_target(tmp_path: Path, run_dir: Path) -> None:
    """qemu-img convert interrupted: stopped and waited for, the target removed."""
    source, _, _ = make_source(tmp_path, "vdi-dynamic")
    target = tmp_path / "out.qcow2"

    def interrupt(progress: Progress) -> None:
        raise RuntimeError("operator gave up")

    with pytest.raises(RuntimeError, match="operator gave up"):
        run_import(source, target, [tmp_path], progress=interrupt, run_dir=run_dir)
    assert not target.exists()
    assert qemu_children() == [] and list(run_dir.iterdir()) == []


def copiers_naming(path: Path) -> list[int]:
    """Pids of qemu-storage-daemon or qemu-img processes whose command line names `path`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith((b"qemu-storage-daemon", b"qemu-img")) and any(
                    str(path).encode() in a
                                                                   for a in argv):
                found.append(int(entry))
    return found


def test_a_killed_import_leaves_no_daemon_and_the_next_one_starts_over(
        tmp_path: Path) -> None:
    """SIGKILL mid-copy: qemu-img dies with its parent, the half copy keeps its partial
    name (never the target's), and the next import replaces it."""
    source, fmt, _ = make_source(tmp_path, "qcow2")
    target = tmp_path / "out.qcow2"
    script = ("import asyncio, os, signal, sys; from pathlib import Path; "
              "from agent.importer.copy import import_disk; "
              "die = lambda p: os.kill(os.getpid(), signal.SIGKILL); "
              "asyncio.run(import_disk(Path(sys.argv[1]), Path(sys.argv[2]), "
              "roots=[Path(sys.argv[3])], progress=die))")
    done = subprocess.run([sys.executable, "-c", script, str(source), str(target),
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == -9, done.stderr
    partial = tmp_path / "out.qcow2.ferry-partial"
    assert partial.exists() and not target.exists()
    deadline = time.monotonic() + 10
    while copiers_naming(partial):
        assert time.monotonic() < deadline, "qemu-img outlived the killed import"
        time.sleep(0.05)
    report = run_import(source, target, [tmp_path])
    assert report.verified and identical(source, fmt, target, "qcow2")
    assert not partial.exists()


def test_compare_names_the_first_difference(tmp_path: Path) -> None:
    source, fmt, _ = make_source(tmp_path, "qcow2")
    other = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "qcow2", str(source), str(other)],
                   check=True)
    info = probe(source, fmt)
    assert qemuimg.compare(qemuimg.source_spec(info, None), other, "qcow2") is None
    qemu_io("qcow2", other, f"write -P 0x13 {5 * MIB} 4096")
    assert "mismatch at offset 5242880" in str(
        qemuimg.compare(qemuimg.source_spec(info, None), other, "qcow2"))


def test_failed_warm_pass_keeps_target_and_next_pass_repairs(tmp_path: Path,
                                                             run_dir: Path) -> None:
    source, _, _ = make_source(tmp_path, "qcow2")
    target = tmp_path / "out.qcow2"
    state = default_state_file(target)
    run_import(source, target, [tmp_path], state_file=state, run_dir=run_dir)
    change_source(source)

    def fail_at_the_end(progress: Progress) -> None:
        if progress.done == progress.total:   # after every block was written
            raise RuntimeError("gone at the end")

    with pytest.raises(RuntimeError):
        run_import(source, target, [tmp_path], state_file=state, progress=fail_at_the_end,
                   run_dir=run_dir)
    assert target.exists() and qemu_children() == []
    kept = warmstate.load(state, target, SIZE, BLOCK)
    assert kept.passes == 1
    assert kept.hashes.count(warmstate.UNKNOWN_HASH) == 3   # the blocks that pass touched
    repaired = run_import(source, target, [tmp_path], state_file=state, run_dir=run_dir)
    assert repaired.blocks_changed == 3 and repaired.verified
    assert identical(source, "qcow2", target, "qcow2")


def test_target_changed_behind_ferrys_back_fails_verification(tmp_path: Path,
                                                              run_dir: Path) -> None:
    source, _, _ = make_source(tmp_path, "qcow2")
    target = tmp_path / "out.qcow2"
    state = default_state_file(target)
    run_import(source, target, [tmp_path], state_file=state, run_dir=run_dir)
    qemu_io("qcow2", target, f"write -P 0x01 {8 * MIB} {BLOCK}")
    with pytest.raises(LocalError, match=r"verification failed: 1 of 256 blocks differ "
                                         r"from the source \(blocks 128\)"):
        run_import(source, target, [tmp_path], state_file=state, run_dir=run_dir)
    assert target.exists()
    again = run_import(source, target, [tmp_path], state_file=state, run_dir=run_dir)
    assert again.verified and again.blocks_zeroed == 1
    assert identical(source, "qcow2", target, "qcow2")


def test_target_outside_allowed_paths_refused(tmp_path: Path) -> None:
    source, _, _ = make_source(tmp_path, "raw")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "elsewhere.qcow2"
    with pytest.raises(UserError, match=f"import target '{outside}' is outside"):
        run_import(source, outside, [allowed])
    assert not outside.exists()


def test_existing_target_without_state_refused(tmp_path: Path) -> None:
    source, _, _ = make_source(tmp_path, "raw")
    target = tmp_path / "taken.qcow2"
    target.write_bytes(b"someone's")
    with pytest.raises(UserError, match="already exists"):
        run_import(source, target, [tmp_path])
    assert target.read_bytes() == b"someone's"


def test_missing_source_refused(tmp_path: Path) -> None:
    missing = tmp_path / "gone.vmdk"
    with pytest.raises(UserError, match=f"disk {missing}: no such image file"):
        run_import(missing, tmp_path / "out.qcow2", [tmp_path])
    assert not (tmp_path / "out.qcow2").exists()


def test_corrupt_image_refused(tmp_path: Path) -> None:
    source, _, _ = make_source(tmp_path, "qcow2")
    with open(source, "r+b") as image:
        image.seek(4)
        image.write((99).to_bytes(4, "big"))   # a qcow2 version no QEMU knows
    with pytest.raises(UserError, match=f"disk {source}: QEMU cannot read this image: .*"
                                        f"qcow2 version 99"):
        run_import(source, tmp_path / "out.qcow2", [tmp_path])
    assert not (tmp_path / "out.qcow2").exists()


def test_not_enough_space_refused(tmp_path: Path) -> None:
    source, _, _ = make_source(tmp_path, "qcow2")
    small = tmp_path / "small"
    small.mkdir()
    target = small / "out.qcow2"
    # A 16 MiB file system of its own (a private mount namespace): too small for the
    # source's data plus the margin ferry keeps.
    script = ("import asyncio, sys; from pathlib import Path; "
              "from agent.importer.copy import import_disk; "
              "asyncio.run(import_disk(Path(sys.argv[1]), Path(sys.argv[2]), "
              "roots=[Path(sys.argv[3])]))")
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c",
         'mount -t tmpfs -o size=16m tmpfs "$1" && shift && exec "$@"', "sh", str(small),
         sys.executable, "-c", script, str(source), str(target), str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1, done.stderr
    assert (f"UserError: not enough space for import target {target}: " in done.stderr
            and "MiB free in" in done.stderr), done.stderr
    assert not target.exists()


def test_compare_lists_the_blocks_that_differ() -> None:
    a = bytes(16 * 4)
    b = bytearray(a)
    b[16 * 2] = 1
    verdict = compare(a, bytes(b))
    assert (verdict.blocks_compared, verdict.mismatched, verdict.verified) == (4, (2,), False)
    assert compare(a, a).verified

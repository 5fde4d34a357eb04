"""The Linux guest of `python -m bench linux`: built from Debian packages into a cache, and
what its serial console says.

The kernel is Debian's `linux-image-amd64` (the package it depends on, fetched with
`apt-get download` and unpacked with `dpkg-deb -x`, never installed); the initramfs (cpio
newc, gzip, written here) holds Debian's static busybox, /init (linux_guest/init.sh) and
the workload (linux_guest/workload.c, compiled static with gcc). Everything lives under
the ferry cache directory (agent.guest.build.default_cache_dir()/linux), which the bench's
destination agent is allowed to read; a rebuilt source file gives a new cache entry.

The workload's page mix (workload.c; kinds by a hash of page index and generation): 30%
text-like, 25% binary-like records, 15% random, 20% zero, 10% copies of 16 template pages.
mix_ratio() measures what zstd makes of it (the workload's own pages, dumped on the host).

Every second the guest prints `FERRY-WL t=S pass=P checked=C written=W errors=E`: P full
verification passes over the working set, W pages rewritten so far, E pages found wrong;
with a disk (`ferry.disk_mib_s=R`: /dev/vda, blocks rewritten with O_DIRECT at R MiB/s and
read back with O_DIRECT) also `disk_pass= disk_written= disk_errors=`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import FerryError
from agent.guest.build import default_cache_dir

HERE = Path(__file__).with_name("linux_guest")
WORKLOAD_SOURCE = HERE / "workload.c"
INIT_SCRIPT = HERE / "init.sh"
KERNEL_META = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
PAGE_SIZE = 4096
KEY_CHARS = 16
STATUS = re.compile(r"FERRY-WL t=(\d+) pass=(\d+) checked=(\d+) written=(\d+) errors=(\d+)"
                    r"(?: disk_pass=(\d+) disk_written=(\d+) disk_errors=(\d+))?")
ERROR_LINE = re.compile(r"FERRY-WL ERROR .*")
PROBE = re.compile(r"FERRY-WL probe page=0 phys=0x([0-9a-f]+)")
EXITED = "FERRY-WL exited"
READY = re.compile(r"FERRY-WL ready ws_pages=(\d+) fill_s=([\d.]+)")
# Console on the serial port, little kernel chatter (it would slow TCG's serial), no
# reboot loop on a panic, and the TCG guest spared the speculation mitigations.
BASE_APPEND = "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off"
# The virtio disk's drivers, modules in Debian's kernel, in the order init.sh loads them.
DISK_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
                "virtio_pci", "virtio_blk")
MIX_PAGES = 8192            # pages dumped to measure the mix (32 MiB)
ZSTD_LEVEL = 3


class GuestBuildError(FerryError):
    """The Linux bench guest could not be built (a package, a tool or the compiler)."""


@dataclass(frozen=True, slots=True)
class LinuxGuest:
    """A built guest: the kernel and the initramfs to boot it with."""

    kernel: Path
    initrd: Path
    version: str                # the kernel package's version

    def qemu_args(self, ws_mib: int, dirty_mib_s: float, selftest: str = "",
                  disk_mib_s: float | None = None) -> list[str]:
        """`-kernel`, `-initrd` and `-append` for a workload of `ws_mib` dirtied at the rate
        (and with disk_mib_s, the first virtio disk rewritten at that rate)."""
        return ["-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", append_line(ws_mib, dirty_mib_s, selftest, disk_mib_s)]


def append_line(ws_mib: int, dirty_mib_s: float, selftest: str = "",
                disk_mib_s: float | None = None) -> str:
    if ws_mib < 1 or dirty_mib_s < 0 or (disk_mib_s is not None and disk_mib_s < 0):
        raise ValueError(f"working set {ws_mib} MiB, dirty rate {dirty_mib_s} MiB/s, disk "
                         f"rate {disk_mib_s}: need at least 1 MiB and rates >= 0")
    line = f"{BASE_APPEND} ferry.ws_mib={ws_mib} ferry.dirty_mib_s={dirty_mib_s:g}"
    if selftest:
        line += f" ferry.selftest={selftest}"
    return line + ("" if disk_mib_s is None else f" ferry.disk_mib_s={disk_mib_s:g}")


def cache_dir() -> Path:
    return default_cache_dir() / "linux"


def _run(argv: Sequence[str], what: str, cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise GuestBuildError(f"{argv[0]} not found: building the Linux bench guest needs it "
                              f"({what})")
    done = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, check=False)
    if done.returncode != 0:
        raise GuestBuildError(f"{what}: {' '.join(argv)} failed: "
                              f"{(done.stderr or done.stdout).strip()[-800:]}")
    return done.stdout


def kernel_package() -> str:
    """The versioned kernel package linux-image-amd64 depends on (apt-cache depends)."""
    out = _run(["apt-cache", "depends", KERNEL_META], f"resolving {KERNEL_META}")
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match[1]
    raise GuestBuildError(f"apt-cache depends {KERNEL_META} names no linux-image package: "
                          f"run apt-get update, or check that Debian's archive is configured")


def download(package: str, debs: Path) -> Path:
    """`package`'s .deb in `debs` (apt-get download, once)."""
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        _run(["apt-get", "download", package], f"downloading {package} from Debian's mirror",
             cwd=Path(tmp))
        got = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not got:
            raise GuestBuildError(f"apt-get download {package} left no .deb")
        target = debs / got[-1].name
        os.replace(got[-1], target)
    return target


def unpack(deb: Path, into: Path) -> Path:
    """`deb`'s files under `into` (dpkg-deb -x, once)."""
    if not into.is_dir():
        into.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=into.parent, prefix=".unpack-"))
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
        os.replace(tmp, into)
    return into


def compile_workload(out: Path) -> Path:
    """workload.c compiled static (it runs as the guest's only program, and on the host)."""
    if not out.is_file():
        tmp = out.with_suffix(".tmp")
        _run(["gcc", "-O2", "-static", "-Wall", "-o", str(tmp), str(WORKLOAD_SOURCE)],
             "compiling the workload (gcc and libc6-dev)")
        os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------- cpio newc

def _cpio_entry(out: io.BufferedIOBase, name: str, mode: int, data: bytes = b"",
                rdev: tuple[int, int] = (0, 0), ino: int = 0) -> None:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    out.write(b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + encoded)
    out.write(b"\0" * (-(110 + len(encoded)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def write_initramfs(path: Path, files: dict[str, bytes], dirs: Sequence[str]) -> None:
    """A gzip'd cpio (newc) archive: `dirs`, /dev/console, and `files` (executable)."""
    raw = io.BytesIO()
    ino = 1
    for name in dirs:
        _cpio_entry(raw, name, stat.S_IFDIR | 0o755, ino=ino)
        ino += 1
    # The kernel opens /dev/console for init before anything is mounted.
    _cpio_entry(raw, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1), ino=ino)
    ino += 1
    for name, data in files.items():
        _cpio_entry(raw, name, stat.S_IFREG | 0o755, data, ino=ino)
        ino += 1
    _cpio_entry(raw, "TRAILER!!!", 0)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(raw.getvalue(), compresslevel=6, mtime=0))
    os.replace(tmp, path)


def build(cache: Path | None = None) -> LinuxGuest:
    """The guest, built once into the cache (downloads the two packages the first time)."""
    root = cache or cache_dir()
    debs = root / "debs"
    package = kernel_package()
    kernel_deb = download(package, debs)
    busybox_deb = download(BUSYBOX_PACKAGE, debs)
    kernel_tree = unpack(kernel_deb, root / "pkg" / kernel_deb.stem)
    busybox_tree = unpack(busybox_deb, root / "pkg" / busybox_deb.stem)
    kernels = sorted((kernel_tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise GuestBuildError(f"{kernel_deb.name} holds no boot/vmlinuz-*")
    modules = {}
    for name in DISK_MODULES:
        found = sorted(kernel_tree.glob(f"lib/modules/*/kernel/drivers/**/{name}.ko"))
        if not found:
            raise GuestBuildError(f"{kernel_deb.name} holds no {name}.ko (the disk scenario "
                                  f"loads it)")
        modules[f"lib/modules/{name}.ko"] = found[0].read_bytes()
    busybox = busybox_tree / "bin" / "busybox"
    if not busybox.is_file():
        raise GuestBuildError(f"{busybox_deb.name} holds no bin/busybox")
    key = hashlib.sha256()
    for part in (WORKLOAD_SOURCE.read_bytes(), INIT_SCRIPT.read_bytes(),
                 kernel_deb.name.encode(), busybox_deb.name.encode()):
        key.update(hashlib.sha256(part).digest())
    out = root / "build" / key.hexdigest()[:KEY_CHARS]
    out.mkdir(parents=True, exist_ok=True)
    initrd = out / "initrd.gz"
    if not initrd.is_file():
        workload = compile_workload(out / "workload")
        write_initramfs(initrd, {"init": INIT_SCRIPT.read_bytes(),
                                 "bin/busybox": busybox.read_bytes(),
                                 "workload": workload.read_bytes(), **modules},
                        dirs=("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"))
    version = kernel_deb.stem.split("_")[1] if "_" in kernel_deb.stem else package
    return LinuxGuest(kernel=kernels[-1], initrd=initrd, version=version)


def workload_binary(guest: LinuxGuest) -> Path:
    """The host copy of the workload the guest's initramfs holds."""
    return compile_workload(guest.initrd.with_name("workload"))


def mix_ratio(guest: LinuxGuest, pages: int = MIX_PAGES) -> dict[str, float]:
    """What zstd (level 3) makes of the workload's page mix: whole stream and page by page
    (as a migration sends it), and the share of zero and of duplicate pages."""
    import zstandard

    data = subprocess.run([str(workload_binary(guest)), "--dump", str(pages)],
                          capture_output=True, check=True).stdout
    if len(data) != pages * PAGE_SIZE:
        raise GuestBuildError(f"workload --dump {pages} wrote {len(data)} bytes")
    chunks = [data[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
    zero = bytes(PAGE_SIZE)
    nonzero = [c for c in chunks if c != zero]
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    per_page = sum(len(compressor.compress(c)) for c in nonzero)
    return {"zstd_ratio_stream": round(len(data) / len(compressor.compress(data)), 2),
            "zstd_ratio_nonzero_pages": round(len(nonzero) * PAGE_SIZE / max(1, per_page), 2),
            "zero_share": round(1 - len(nonzero) / len(chunks), 3),
            "duplicate_share": round((len(nonzero) - len(set(nonzero))) / len(chunks), 3)}


# ---------------------------------------------------------------------------- the console

@dataclass(frozen=True, slots=True)
class Status:
    """One status line of the workload."""

    t: int
    passes: int
    checked: int
    written: int
    errors: int
    disk_passes: int | None = None       # with a disk only
    disk_written: int | None = None
    disk_errors: int | None = None

    @property
    def bad(self) -> int:
        """Pages and blocks found wrong so far."""
        return self.errors + (self.disk_errors or 0)


def statuses(text: str) -> list[Status]:
    return [Status(*(None if g is None else int(g) for g in m.groups()))  # type: ignore[arg-type]
            for m in STATUS.finditer(text)]


def error_lines(text: str) -> list[str]:
    return ERROR_LINE.findall(text)


def probe_address(text: str) -> int | None:
    """Guest-physical address of working-set page 0, as the workload printed it."""
    match = PROBE.search(text)
    return int(match[1], 16) if match else None


def read_console(path: Path | str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_console(path: Path | str, done: Callable[[str], bool], timeout: float,
                 alive: Callable[[], bool] | None = None, poll: float = 0.1) -> str:
    """The console text once `done(text)` holds; TimeoutError (with the console's tail)
    after `timeout` s, RuntimeError when `alive()` turns False or the workload exits first."""
    deadline = time.monotonic() + timeout
    while True:
        text = read_console(path)
        if done(text):
            return text
        if EXITED in text:
            raise RuntimeError(f"the guest's workload exited; console ends: {text[-600:]!r}")
        if alive is not None and not alive():
            raise RuntimeError(f"QEMU exited; console ends: {text[-600:]!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout:.0f} s; console ends: {text[-600:]!r}")
        time.sleep(poll)

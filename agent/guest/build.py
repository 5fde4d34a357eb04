"""Assembling the test guest with binutils into a cache keyed by its source and config."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from agent.errors import GuestBuildError
from agent.guest.mailbox import GuestConfig

SOURCE = Path(__file__).with_name("guest.S")
LINKER_SCRIPT = Path(__file__).with_name("guest.ld")
CACHE_ENV = "FERRY_CACHE_DIR"
ELF_NAME = "guest.elf"
KEY_CHARS = 16


def default_cache_dir() -> Path:
    """$FERRY_CACHE_DIR, else $XDG_CACHE_HOME/ferry, else ~/.cache/ferry."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ferry"


def _cache_key(config: GuestConfig) -> str:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(LINKER_SCRIPT.read_bytes())
    digest.update(repr(sorted(config.defsyms().items())).encode())
    return digest.hexdigest()[:KEY_CHARS]


def _run(argv: list[str]) -> None:
    tool = shutil.which(argv[0])
    if tool is None:
        raise GuestBuildError(f"{argv[0]} not found: the test guest needs binutils "
                              f"(apt-get install binutils)")
    result = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv[:2])} failed: {result.stderr.strip()}")


def build_guest(config: GuestConfig | None = None, *, cache_dir: Path | None = None) -> Path:
    """The multiboot ELF of the test guest with `config` built in (built once, then cached)."""
    config = config or GuestConfig()
    try:
        config.check()
    except ValueError as exc:
        raise GuestBuildError(f"bad test guest config: {exc}") from exc
    out_dir = (cache_dir or default_cache_dir()) / "guest" / _cache_key(config)
    elf = out_dir / ELF_NAME
    if elf.is_file():
        return elf
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a concurrent build never sees half a file.
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        obj, tmp_elf = Path(tmp) / "guest.o", Path(tmp) / ELF_NAME
        defsyms = [arg for name, value in sorted(config.defsyms().items())
                   for arg in ("--defsym", f"{name}={value}")]
        _run(["as", "--32", *defsyms, "-o", str(obj), str(SOURCE)])
        _run(["ld", "-m", "elf_i386", "-n", "-T", str(LINKER_SCRIPT), "-o", str(tmp_elf),
              str(obj)])
        os.replace(tmp_elf, elf)
    return elf

"""glibc malloc settings that keep freed memory for reuse: the agent's own (mallopt when it
starts) and those of the QEMUs it starts (GLIBC_TUNABLES in their environment).

By default glibc gives freed heap back to the kernel and maps large blocks afresh, so a
buffer allocated per request or per batch is faulted in anew every time. Kept up to
TRIM_THRESHOLD (blocks below MMAP_THRESHOLD from the heap):
- a source QEMU's NBD bounce buffers (3.5 MiB per request): 0.65-0.68 CPU s per GB on the
  disk bench, against 1.0 with faults;
- the agent's zstd buffers (compressed output, the split and joined batch, decompressed
  DATA: about 1 MiB each, per batch): the first zstd windows of a migration on 1 Gbit/s
  read 148-159 MB/s of pages, against 103-110 with glibc's defaults, and auto no longer
  took plain for slower.
Guest RAM is mapped by QEMU itself, not allocated, and is unaffected. A tunable the
operator names in GLIBC_TUNABLES wins over ours, for the agent and its QEMUs alike.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

TRIM_THRESHOLD = 64 << 20
MMAP_THRESHOLD = 8 << 20
TUNABLES = {"glibc.malloc.trim_threshold": TRIM_THRESHOLD,
            "glibc.malloc.mmap_threshold": MMAP_THRESHOLD}
# mallopt's parameter numbers (glibc's malloc.h).
_MALLOPT_PARAMS = {"glibc.malloc.trim_threshold": -1, "glibc.malloc.mmap_threshold": -3}


def _settings(env: Mapping[str, str]) -> list[str]:
    """The NAME=VALUE settings of a GLIBC_TUNABLES in env."""
    return [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]


def _names(settings: list[str]) -> set[str]:
    return {t.split("=", 1)[0] for t in settings}


def environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for a child process: base (or ours) with TUNABLES added to its
    GLIBC_TUNABLES, those it names left as they are."""
    env = dict(os.environ if base is None else base)
    own = _settings(env)
    named = _names(own)
    env["GLIBC_TUNABLES"] = ":".join(
        own + [f"{name}={value}" for name, value in TUNABLES.items() if name not in named])
    return env


def tune_this_process(env: Mapping[str, str] | None = None) -> list[str]:
    """Set TUNABLES in this process by mallopt (glibc only), except those GLIBC_TUNABLES
    names; the names set."""
    if platform.libc_ver()[0] != "glibc":
        return []
    libc = ctypes.CDLL(None)   # this process's own symbols: glibc's mallopt among them
    named = _names(_settings(os.environ if env is None else env))
    done = []
    for name, value in TUNABLES.items():
        if name not in named and libc.mallopt(_MALLOPT_PARAMS[name], value) == 1:
            done.append(name)
    return done

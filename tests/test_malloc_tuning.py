"""glibc malloc settings: the agent's own (mallopt) and its QEMUs' (GLIBC_TUNABLES)."""

from __future__ import annotations

import subprocess
import sys

from agent import malloc_tuning

OURS = "glibc.malloc.trim_threshold=67108864:glibc.malloc.mmap_threshold=8388608"


def test_environment_adds_the_tunables_unless_already_named():
    env = malloc_tuning.environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": OURS}
    own = malloc_tuning.environment(
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.cpu.x=y"})
    assert own["GLIBC_TUNABLES"] == ("glibc.malloc.trim_threshold=1:glibc.cpu.x=y:"
                                     "glibc.malloc.mmap_threshold=8388608")


# A fresh process's first 4 MiB block: mapped afresh under glibc's defaults (threshold
# 128 KiB), from the heap once the agent's threshold (8 MiB) is set.
FIRST_BLOCK = """
import ctypes, json, sys
from agent.malloc_tuning import tune_this_process
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
done = tune_this_process(json.loads(sys.argv[1])) if sys.argv[2] == "tune" else []
before = libc.mallinfo2().hblks
block = bytearray(4 << 20)
print(libc.mallinfo2().hblks - before, ",".join(done))
"""


def first_block(env: str, tune: bool) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", FIRST_BLOCK, env, "tune" if tune else "-"],
                         capture_output=True, text=True, check=True).stdout.split(" ")
    return out[0], out[1].strip()


def test_the_agent_takes_large_blocks_from_its_heap():
    assert first_block("{}", tune=False) == ("1", "")
    assert first_block("{}", tune=True) == (
        "0", "glibc.malloc.trim_threshold,glibc.malloc.mmap_threshold")
    # A threshold the operator set by GLIBC_TUNABLES is left alone.
    named = '{"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}'
    assert first_block(named, tune=True) == ("1", "glibc.malloc.trim_threshold")

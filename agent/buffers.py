"""Reusable buffers: a buffer goes back into use once nothing views it any more.

Encoders write batches into pooled bytearrays and hand out views of them; the channel
seals a payload and drops its view before `send` returns, so a buffer whose views are all
gone may be filled again. Fresh memory costs page faults (about 1 s of CPU per GB on the
VMs measured here), which reuse avoids.
"""

from __future__ import annotations

# New buffers are rounded up to this, so that slightly different sizes share buffers.
GRAIN = 256 << 10


class BufferPool:
    """At most `capacity` buffers kept; beyond that, take() allocates one for the caller."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buffers: list[bytearray] = []

    def take(self, size: int) -> bytearray:
        """A buffer of at least `size` bytes that nothing views, else a new one."""
        for buffer in self._buffers:
            if len(buffer) >= size and not has_views(buffer):
                return buffer
        buffer = bytearray(-(-size // GRAIN) * GRAIN)
        if len(self._buffers) < self.capacity:
            self._buffers.append(buffer)
        return buffer


def has_views(buffer: bytearray) -> bool:
    """True while any buffer export (a memoryview, C code holding it) of `buffer` exists.

    CPython refuses to resize a bytearray with exports; shrinking by one byte and growing
    back stays inside the allocation, so the probe neither copies nor changes the contents
    that matter (the buffer is about to be overwritten anyway).
    """
    try:
        last = buffer.pop()
    except BufferError:
        return True
    buffer.append(last)
    return False

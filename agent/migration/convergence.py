"""What ferry decides around QEMU's own convergence: the downtime budget, compression, the ETA.

QEMU decides when to stop the guest, from its dirty log and the bandwidth it measures on
the socket ferry reads (DESIGN §2). ferry sets the limit it decides against (minus what
the disks' final round will cost), picks per batch whether zstd pays on this link, and
turns QEMU's figures into a progress estimate that never goes up.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass

# Before the disks' rate is known, a final round is assumed to take a second: the
# budget then holds QEMU in pre-copy until a disk round has been measured.
UNKNOWN_DISK_FINAL_S = 1.0
# QEMU must leave this share of the requested downtime to RAM, or it keeps iterating
# (downtime-limit held at its minimum) until the disks have converged further.
MIN_RAM_SHARE = 0.25
# zstd level 1 on guest-like pages, per core, before a batch has been timed (DESIGN §8).
ZSTD_RATE_GUESS = 500e6
RATIO_GUESS = 0.5
# Compress only when it wins by this much: a tie costs CPU the guest could use.
COMPRESS_GAIN = 1.2
# Weight of the newest observation in the moving averages.
EWMA = 0.2
# The link's rate is bytes over seconds of sending across about the last LINK_WINDOW_BYTES
# (several times the 8 MiB a channel buffers before sending waits), judged once
# LINK_SAMPLE_BYTES have gone.
LINK_WINDOW_BYTES = 32 << 20
LINK_SAMPLE_BYTES = 12 << 20
# --bandwidth: bursts of at most this much time's worth, or one batch.
BURST_S = 0.05
MIN_BURST_BYTES = 1 << 20
# Below this the countdown has run out before the work did; progress shows no ETA then.
ETA_FLOOR_S = 0.05


class TimeoutAction(enum.Enum):
    """What to do when pre-copy runs out of time without converging."""

    ABORT = "abort"    # roll back: migrate_cancel, the source keeps running
    FORCE = "force"    # switch over anyway: QEMU's downtime limit is lifted


def ram_downtime_s(requested_s: float, disk_dirty_bytes: int, disk_rate: float) -> float:
    """The pause QEMU may plan for RAM and devices: the requested one less the disks' final
    round (dirty bytes at the measured rate); 0 while the disks would take most of it."""
    if disk_dirty_bytes <= 0:
        return requested_s
    disk_s = disk_dirty_bytes / disk_rate if disk_rate > 0 else UNKNOWN_DISK_FINAL_S
    left = requested_s - disk_s
    return left if left >= MIN_RAM_SHARE * requested_s else 0.0


class Compression(enum.Enum):
    OFF = "off"
    FIXED = "fixed"    # every batch, at the given level
    AUTO = "auto"      # per batch, when the link and not the CPU is the bottleneck


@dataclass(frozen=True, slots=True)
class CompressSetting:
    """--compress: off, zstd:N, or auto (zstd:1 whenever it pays)."""

    mode: Compression
    level: int | None

    @classmethod
    def parse(cls, text: str) -> CompressSetting:
        if text == "off":
            return cls(Compression.OFF, None)
        if text == "auto":
            return cls(Compression.AUTO, 1)
        if text.startswith("zstd:"):
            try:
                level = int(text[5:])
            except ValueError:
                level = 0
            if -7 <= level <= 19 and level != 0:
                return cls(Compression.FIXED, level)
        raise ValueError(f"bad --compress {text!r}: use auto, off or zstd:N (N from -7 to 19)")

    def __str__(self) -> str:
        return {Compression.OFF: "off", Compression.AUTO: "auto"}.get(
            self.mode, f"zstd:{self.level}")


class CompressionPolicy:
    """Decides per batch whether to compress, from what the last batches showed.

    Batches are encoded (and compressed) in a worker thread while the previous ones are
    sealed and sent, so compressing pays when zstd outruns the link and shrinks the data:
    then the pipeline moves min(zstd rate, link rate / ratio) instead of the link rate.
    The link's rate is what sending took, waits for the socket and --bandwidth included;
    on a link faster than the CPU sending never waits, and nothing is compressed.
    """

    def __init__(self, setting: CompressSetting) -> None:
        self.setting = setting
        self.link_rate: float | None = None     # wire bytes per second of sending
        self._bytes = 0.0                       # decaying sums behind link_rate
        self._seconds = 0.0
        self.zstd_rate = ZSTD_RATE_GUESS        # raw bytes per second of encoding
        self.ratio = RATIO_GUESS                # compressed / raw

    def compress_next(self) -> bool:
        mode = self.setting.mode
        if mode is not Compression.AUTO:
            return mode is Compression.FIXED
        if self.link_rate is None:
            return False
        pipeline = min(self.zstd_rate, self.link_rate / max(self.ratio, 1e-3))
        return pipeline > COMPRESS_GAIN * self.link_rate

    def sent(self, wire_bytes: int, seconds: float) -> None:
        """One batch took `seconds` to send (sealing, socket waits, pacing).

        Sends return at once while the socket's buffer has room and wait for it to drain
        past its high-water mark, so one batch says little: the rate is bytes over time
        summed over the last batches (older ones decaying)."""
        keep = math.exp(-wire_bytes / LINK_WINDOW_BYTES)
        self._bytes = self._bytes * keep + wire_bytes
        self._seconds = self._seconds * keep + max(seconds, 0.0)
        if self._bytes >= LINK_SAMPLE_BYTES and self._seconds > 0:
            self.link_rate = self._bytes / self._seconds

    def encoded(self, raw_bytes: int, wire_data_bytes: int, seconds: float,
                compressed: bool) -> None:
        """One batch's DATA was encoded in `seconds`, compressed or not."""
        if not compressed or raw_bytes < 64 << 10 or seconds <= 0:
            return
        self.zstd_rate = _ewma(self.zstd_rate, raw_bytes / seconds)
        self.ratio = _ewma(self.ratio, wire_data_bytes / raw_bytes)


def _ewma(old: float, new: float) -> float:
    return (1 - EWMA) * old + EWMA * new


class Pacer:
    """--bandwidth as a token bucket: a steady rate with bursts of at most BURST_S of it.

    Steady matters: QEMU measures its bandwidth on the socket the agent reads at this
    pace, and plans the switchover with it; credit saved while the job was preparing
    would let a burst through that QEMU takes for the link's rate.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.burst = max(rate * BURST_S, MIN_BURST_BYTES)
        self._tokens = self.burst
        self._at = time.monotonic()

    def take(self, nbytes: int) -> float:
        """Spend nbytes; the seconds to wait before sending more."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= nbytes
        return -self._tokens / self.rate if self._tokens < 0 else 0.0


class Eta:
    """Seconds left, from bytes left and the rate they go at; it never goes up."""

    def __init__(self) -> None:
        self._eta: float | None = None
        self._at = 0.0

    def update(self, remaining_bytes: int, rate: float, dirty_rate: float) -> float | None:
        """The estimate, or None when there is none worth showing. Later iterations resend
        what the guest dirties meanwhile: with dirty rate d and send rate r they add up to
        remaining / r / (1 - d / r)."""
        if rate <= 0:
            return None
        now = time.monotonic()
        dirtying = min(dirty_rate / rate, 0.9)
        estimate = remaining_bytes / rate / (1 - dirtying)
        if self._eta is not None:
            estimate = min(estimate, max(0.0, self._eta - (now - self._at)))
        self._eta, self._at = estimate, now
        return estimate if estimate >= ETA_FLOOR_S else None

"""ferry's decisions around QEMU's convergence: the downtime budget, compression, the ETA."""

from __future__ import annotations

import time

import pytest

from agent.migration.convergence import (
    COMPRESS_GAIN,
    MIN_RAM_SHARE,
    UNKNOWN_DISK_FINAL_S,
    Compression,
    CompressionPolicy,
    CompressSetting,
    Eta,
    Pacer,
    ram_downtime_s,
)

MB = 1_000_000


def test_compress_setting_parses_and_names_itself():
    assert CompressSetting.parse("off") == CompressSetting(Compression.OFF, None)
    assert CompressSetting.parse("auto") == CompressSetting(Compression.AUTO, 1)
    assert CompressSetting.parse("zstd:3") == CompressSetting(Compression.FIXED, 3)
    for text in ("auto", "off", "zstd:-5", "zstd:19"):
        assert str(CompressSetting.parse(text)) == text
    for bad in ("zstd", "zstd:0", "zstd:20", "zstd:x", "lz4", ""):
        with pytest.raises(ValueError, match="bad --compress"):
            CompressSetting.parse(bad)


def test_fixed_and_off_settings_ignore_what_they_see():
    fixed = CompressionPolicy(CompressSetting.parse("zstd:1"))
    off = CompressionPolicy(CompressSetting.parse("off"))
    for policy in (fixed, off):
        policy.sent(10 * MB, 10.0)          # a 1 MB/s link
    assert fixed.compress_next() and not off.compress_next()


def slow_link(policy: CompressionPolicy, rate: float, batches: int = 40) -> None:
    """Batches of 1 MB over a link of `rate`: most return at once (the socket buffers 8
    MB), every eighth waits for the buffer to drain."""
    for n in range(batches):
        policy.sent(MB, 8 * MB / rate if n % 8 == 7 else 1e-4)


def test_auto_compresses_on_a_slow_link_only():
    policy = CompressionPolicy(CompressSetting.parse("auto"))
    assert not policy.compress_next()       # nothing measured yet
    slow_link(policy, 125 * MB)             # 1 Gbit/s: zstd (~500 MB/s) outruns it
    assert policy.link_rate == pytest.approx(125 * MB, rel=0.5)
    assert policy.compress_next()
    fast = CompressionPolicy(CompressSetting.parse("auto"))
    for _ in range(40):
        fast.sent(MB, MB / (2000 * MB))     # never waits: the CPU is the bottleneck
    assert not fast.compress_next()


def test_auto_stops_compressing_what_does_not_shrink():
    policy = CompressionPolicy(CompressSetting.parse("auto"))
    slow_link(policy, 125 * MB)
    assert policy.compress_next()
    for _ in range(30):                     # random pages: compressed == raw
        policy.encoded(1 << 20, (1 << 20) - 100, 0.002, compressed=True)
    assert policy.ratio > 1 / COMPRESS_GAIN
    assert not policy.compress_next()


def test_auto_stops_when_zstd_is_slower_than_the_link():
    policy = CompressionPolicy(CompressSetting.parse("auto"))
    slow_link(policy, 300 * MB)
    for _ in range(30):                     # well compressible, but only 200 MB/s of zstd
        policy.encoded(1 << 20, 1 << 18, (1 << 20) / (200 * MB), compressed=True)
    assert not policy.compress_next()


def test_small_batches_say_nothing():
    policy = CompressionPolicy(CompressSetting.parse("auto"))
    policy.sent(1000, 1.0)
    assert policy.link_rate is None
    policy.encoded(1000, 10, 1.0, compressed=True)
    assert policy.ratio == 0.5


def test_ram_downtime_leaves_room_for_the_disks_final_round():
    assert ram_downtime_s(0.3, 0, 0.0) == 0.3
    assert ram_downtime_s(0.3, 10 * MB, 100 * MB) == pytest.approx(0.2)
    # Unknown disk rate: a second is assumed, which leaves nothing: QEMU keeps iterating.
    assert UNKNOWN_DISK_FINAL_S >= 0.3 and ram_downtime_s(0.3, 1, 0.0) == 0.0
    # Less than MIN_RAM_SHARE of the pause would be left for RAM: hold QEMU.
    almost = (1 - MIN_RAM_SHARE / 2) * 0.3 * 100 * MB
    assert ram_downtime_s(0.3, int(almost), 100 * MB) == 0.0


def test_eta_never_goes_up():
    eta = Eta()
    first = eta.update(100 * MB, 10 * MB, 0.0)
    assert first == pytest.approx(10.0)
    worse = eta.update(500 * MB, 10 * MB, 5 * MB)   # more dirty, slower: still not up
    assert worse is not None and worse <= first
    time.sleep(0.01)
    assert eta.update(1, 10 * MB, 0.0) is None        # under the floor: no ETA shown
    assert eta.update(100 * MB, 0.0, 0.0) is None     # no rate yet


def test_pacer_keeps_a_steady_rate_with_small_bursts():
    pacer = Pacer(10 * MB)
    assert pacer.burst == pytest.approx(1 << 20)       # 50 ms of 10 MB/s is less than 1 MiB
    time.sleep(0.2)                                     # idle time saves no more than a burst
    assert pacer.take(1 << 20) == 0.0
    wait = pacer.take(MB)
    assert wait == pytest.approx(0.1, abs=0.01)         # then 1 MB costs 0.1 s at 10 MB/s

"""ferry's decisions around QEMU's convergence: the downtime budget, compression, the ETA."""

from __future__ import annotations

import time

import pytest

from agent.migration.convergence import (
    COMPRESS_GAIN,
    EXPLOIT_WINDOWS,
    FAST_LEVEL,
    FIRST_HELD,
    FIRST_RETRY_WINDOWS,
    MAX_SETTLE_BYTES,
    MIN_RAM_SHARE,
    PLAIN_CHECK_WINDOWS,
    PROBE_BYTES,
    RATIO_LEVEL,
    SECOND_LOOK_GAIN,
    SETTLE_BYTES,
    UNKNOWN_DISK_FINAL_S,
    Compression,
    CompressionPolicy,
    CompressSetting,
    Eta,
    Pacer,
    downtime_target_s,
    ram_downtime_s,
)

MB = 1_000_000
MIB = 1 << 20
WINDOW = PROBE_BYTES // MIB
PROBE = (SETTLE_BYTES + PROBE_BYTES) // MIB   # a window after a switch: settle, then time
# A plain window whose sends never waited as on a full queue settles longest.
UNQUEUED_PROBE = (MAX_SETTLE_BYTES + PROBE_BYTES) // MIB


def test_compress_setting_parses_and_names_itself():
    assert CompressSetting.parse("off") == CompressSetting(Compression.OFF, None)
    assert CompressSetting.parse("auto") == CompressSetting(Compression.AUTO, FAST_LEVEL)
    assert CompressSetting.parse("zstd:3") == CompressSetting(Compression.FIXED, 3)
    for text in ("auto", "off", "zstd:-5", "zstd:19"):
        assert str(CompressSetting.parse(text)) == text
    for bad in ("zstd", "zstd:0", "zstd:20", "zstd:x", "lz4", ""):
        with pytest.raises(ValueError, match="bad --compress"):
            CompressSetting.parse(bad)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(policy: CompressionPolicy, clock: Clock, mib: int, plain_s: float, zstd_s: float,
        ratio: float = 0.5, link_s: float = 0.0) -> list[bool]:
    """Feed `mib` MiB of page data in 1 MiB batches, each taking plain_s or zstd_s of
    wall time as the policy chose, of which the send waited on the link for what the
    link needs beyond the CPU's time (a link of `link_s` per MiB); the choices."""
    choices = []
    for _ in range(mib):
        on = policy.compress_next()
        choices.append(on)
        spent = zstd_s if on else plain_s
        clock.now += spent
        policy.waited(max(0.0, min(spent, link_s * (ratio if on else 1.0))))
        policy.encoded(1 << 20, int((1 << 20) * (ratio if on else 1.0)), compressed=on)
    return choices


def test_fixed_and_off_settings_ignore_what_they_see():
    clock = Clock()
    fixed = CompressionPolicy(CompressSetting.parse("zstd:1"), clock)
    off = CompressionPolicy(CompressSetting.parse("off"), clock)
    assert all(run(fixed, clock, 64, 0.001, 1.0))
    assert not any(run(off, clock, 64, 1.0, 0.001))


def test_auto_compresses_when_that_moves_pages_faster():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # A slow link: a MiB takes 8 ms plain, 5 ms compressed (half the bytes, zstd's cost),
    # the sends waiting on the link for most of it.
    choices = run(policy, clock, 2 * PROBE + 40, 0.008, 0.005, link_s=0.008)
    assert not any(choices[:PROBE]) and all(choices[PROBE:2 * PROBE])
    assert all(choices[2 * PROBE:])
    assert policy.rates[True] > policy.rates[False]
    assert policy.seen()["ratio"] < 0.6


def test_auto_picks_the_faster_level_while_the_cpu_sets_zstds_pace():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    assert policy.level == FAST_LEVEL
    # A slow link: zstd's sends wait on it for most of their time, so the denser level.
    run(policy, clock, 2 * PROBE + 2 * WINDOW, 0.008, 0.005, link_s=0.016)
    assert policy.compress_next() and policy.level == RATIO_LEVEL
    assert policy.windows[-1][3] == RATIO_LEVEL and policy.seen()["level"] == RATIO_LEVEL
    # The link got faster than zstd: its sends hardly wait, the faster level again.
    run(policy, clock, 2 * WINDOW, 0.008, 0.005, link_s=0.001)
    assert policy.level == FAST_LEVEL and policy.windows[-1][3] == FAST_LEVEL
    fixed = CompressionPolicy(CompressSetting.parse("zstd:3"), clock)
    run(fixed, clock, 2 * WINDOW, 0.008, 0.005, link_s=0.016)
    assert fixed.level == 3


def test_auto_leaves_out_the_time_qemu_sent_nothing():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    run(policy, clock, SETTLE_BYTES // MIB, 0.008, 0.005, link_s=0.008)
    for _ in range(WINDOW):
        # Each MiB took 8 ms plain, and as long again waiting for QEMU's next pages
        # with everything sent: the window reads the 8 ms.
        clock.now += 0.016
        policy.starved(0.008)
        policy.waited(0.008)
        policy.encoded(1 << 20, 1 << 20, compressed=False)
    assert policy.rates[False] == pytest.approx(MIB / 0.008)
    assert policy.link_share == pytest.approx(1.0)


def test_auto_times_no_window_across_a_switch():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # The first settle's batches are fast (empty buffers), the rest slow: not timed.
    run(policy, clock, SETTLE_BYTES // MIB, 0.0001, 0.0001, link_s=0.0001)
    run(policy, clock, WINDOW, 0.008, 0.005, link_s=0.008)
    assert policy.rates[False] == pytest.approx(MIB / 0.008)


def test_auto_keeps_pages_plain_when_the_cpu_is_the_bottleneck():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # Loopback, the link idle half the time: a MiB takes 1 ms plain (0.5 ms of it waiting
    # on the link); zstd's 2 ms of CPU would only slow it down.
    choices = run(policy, clock, 200, 0.001, 0.002, link_s=0.0005)
    # zstd loses its first probe, and the one FIRST_RETRY_WINDOWS later: plain from then on.
    retried = (UNQUEUED_PROBE + PROBE + MAX_SETTLE_BYTES // MIB
               + (FIRST_RETRY_WINDOWS + 1) * WINDOW + PROBE)
    assert sum(choices) == 2 * PROBE and all(choices[retried - PROBE:retried])
    assert not any(choices[retried:])


def test_auto_does_not_even_try_zstd_while_the_link_keeps_up():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # The sends never wait: the CPU sets the pace, and a zstd window would cost CPU.
    assert not any(run(policy, clock, 400, 0.001, 0.0005))
    assert policy.seen()["skipped_probes"] >= 2 and policy.seen()["link_share"] == 0.0


def test_auto_probes_a_link_that_holds_the_sends_back():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # Sends wait on the link for 40% of the time: zstd is tried, and here it loses.
    choices = run(policy, clock, 2 * PROBE, 0.005, 0.008, link_s=0.002)
    assert any(choices) and not policy.compress_next()
    assert policy.seen()["skipped_probes"] == 0


def test_auto_tries_both_again_after_a_while():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # Plain wins the first probe (zstd tried on a link busy half the time) and the retry
    # soon after; the next comes after twice the usual windows.
    probed = (UNQUEUED_PROBE + PROBE + MAX_SETTLE_BYTES // MIB
              + (FIRST_RETRY_WINDOWS + 1) * WINDOW + PROBE)
    choices = run(policy, clock, probed + MAX_SETTLE_BYTES // MIB
                  + 2 * EXPLOIT_WINDOWS * WINDOW, 0.001, 0.002, link_s=0.0005)
    assert all(choices[probed - PROBE:probed]) and not any(choices[probed:])
    # The link got slow: the next probe finds zstd faster, and it is kept.
    run(policy, clock, 2 * PROBE, 0.010, 0.004, link_s=0.010)
    assert policy.compress_next()


def test_plain_is_timed_only_once_its_sends_wait_on_a_full_queue():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # The queues are empty at first: plain's first 8 MiB go at the CPU's pace (1 ms a MiB),
    # then the link holds each MiB back 8 ms. Timing from the start would read plain fast.
    run(policy, clock, 8, 0.001, 0.001)
    run(policy, clock, WINDOW + 1, 0.008, 0.005, link_s=0.008)
    assert policy.rates[False] == pytest.approx(MIB / 0.008)
    # Sends that never wait that long leave plain untimed for MAX_SETTLE_BYTES at most.
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    run(policy, clock, UNQUEUED_PROBE - 1, 0.001, 0.001, link_s=0.0005)
    assert policy.rates[False] is None
    run(policy, clock, 1, 0.001, 0.001, link_s=0.0005)
    assert policy.rates[False] == pytest.approx(MIB / 0.001)


def test_auto_holds_zstd_while_compressed_sends_still_wait_on_the_link():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # A slow link even for half the bytes: no window after the probes is plain.
    choices = run(policy, clock, 2 * PROBE + 4 * EXPLOIT_WINDOWS * WINDOW, 0.008, 0.005,
                  link_s=0.008)
    assert all(choices[PROBE:])
    assert policy.seen()["held_windows"] >= 3 * EXPLOIT_WINDOWS
    # The link got fast: compressed sends stop waiting, and plain is measured again.
    choices = run(policy, clock, (EXPLOIT_WINDOWS + 2) * WINDOW + SETTLE_BYTES // MIB,
                  0.001, 0.002, link_s=0.0)
    assert not all(choices) and not policy.compress_next()


def test_auto_holds_zstd_while_it_stays_faster_than_plain_was():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # zstd packs so well that its sends hardly wait any more, and it is twice as fast.
    choices = run(policy, clock, 2 * PROBE + 3 * EXPLOIT_WINDOWS * WINDOW, 0.008, 0.004,
                  ratio=0.1, link_s=0.008)
    assert policy.windows[-1][2] < 0.3   # the link no longer held zstd's sends back
    assert all(choices[PROBE:]) and policy.seen()["held_windows"] >= 2 * EXPLOIT_WINDOWS


def zstd_won_its_probe(plain_s: float, zstd_s: float) -> tuple[CompressionPolicy, Clock]:
    """auto after a plain probe of plain_s per MiB and a zstd one of zstd_s that won it,
    every send held back (by a link, or a busy receiver)."""
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    run(policy, clock, PROBE, plain_s, zstd_s, link_s=plain_s)
    run(policy, clock, PROBE, plain_s, zstd_s, ratio=0.7, link_s=plain_s)
    assert policy.compress_next()
    return policy, clock


def test_one_slow_plain_window_does_not_keep_zstd_for_good():
    # The first plain window was timed slow and zstd won its probe; plain is twice as
    # fast from then on, both held back by a busy receiver as a link would hold them.
    policy, clock = zstd_won_its_probe(0.006, 0.004)
    # zstd's windows no longer beat that probe by the margin: held on waiting alone.
    choices = run(policy, clock, (FIRST_HELD + 1) * WINDOW + PROBE
                  + 2 * EXPLOIT_WINDOWS * WINDOW, 0.003, 0.0058, ratio=0.7, link_s=0.004)
    assert all(choices[:(FIRST_HELD + 1) * WINDOW])
    # One plain window challenges zstd's verdict (its windows' rate) and wins; plain
    # holds twice the usual windows.
    assert not any(choices[(FIRST_HELD + 1) * WINDOW:]) and not policy.compress_next()
    assert policy.rates[True] == pytest.approx(MIB / 0.0058)


def test_a_plain_verdict_slower_than_zstd_was_ends_with_zstd_back():
    policy, clock = zstd_won_its_probe(0.006, 0.004)
    # zstd holds on waiting, then one plain window, timed fast (the queues zstd left
    # empty take it at the CPU's pace), challenges its verdict and wins.
    held = (FIRST_HELD + 1) * WINDOW
    choices = run(policy, clock, held + PROBE, 0.004, 0.0058, ratio=0.7, link_s=0.008)
    assert all(choices[:held]) and not any(choices[held:])
    assert not policy.compress_next()
    # Plain's own windows, held back by the link, are slower than zstd's were by more
    # than the margin: after PLAIN_CHECK_WINDOWS of them zstd is back.
    choices = run(policy, clock, PLAIN_CHECK_WINDOWS * WINDOW + 2 * WINDOW, 0.008, 0.0058,
                  ratio=0.7, link_s=0.008)
    assert not any(choices[:PLAIN_CHECK_WINDOWS * WINDOW])
    assert all(choices[PLAIN_CHECK_WINDOWS * WINDOW:]) and policy.compress_next()
    assert policy.seen()["reversals"] == 1
    assert policy.rates[False] == pytest.approx(MIB / 0.008)


def test_a_plain_verdict_as_fast_as_zstd_was_stays():
    policy, clock = zstd_won_its_probe(0.006, 0.004)
    held = (FIRST_HELD + 1) * WINDOW
    run(policy, clock, held + PROBE, 0.004, 0.0058, ratio=0.7, link_s=0.008)
    # Plain's windows a little slower than zstd's (within the margin): plain stays.
    choices = run(policy, clock, 2 * EXPLOIT_WINDOWS * WINDOW, 0.0058 * (COMPRESS_GAIN - 0.05),
                  0.0058, ratio=0.7, link_s=0.008)
    assert not any(choices) and policy.seen()["reversals"] == 0


def test_zstd_keeps_its_verdict_when_one_plain_window_does_not_beat_it():
    policy, clock = zstd_won_its_probe(0.008, 0.005)
    # zstd no longer beats the first probe by the margin, still holds on waiting; the
    # challenge by plain, at the link's rate, loses to zstd's windows.
    choices = run(policy, clock, (FIRST_HELD + 1) * WINDOW + PROBE
                  + SETTLE_BYTES // MIB + (2 * FIRST_HELD + 1) * WINDOW,
                  0.008, 0.0075, ratio=0.7, link_s=0.008)
    assert all(choices[:(FIRST_HELD + 1) * WINDOW])
    assert not any(choices[(FIRST_HELD + 1) * WINDOW:(FIRST_HELD + 1) * WINDOW + PROBE])
    # Confirmed: held twice as long before plain challenges it again.
    assert all(choices[(FIRST_HELD + 1) * WINDOW + PROBE + SETTLE_BYTES // MIB:])


def test_a_zstd_verdict_slower_than_plain_ends_as_a_lost_probe():
    # A busy receiver holds every send back; zstd's probe is timed fast (it drains what
    # plain queued) and its later windows are slower than plain's probe.
    policy, clock = zstd_won_its_probe(0.004, 0.002)
    choices = run(policy, clock, EXPLOIT_WINDOWS * WINDOW + 2 * EXPLOIT_WINDOWS * WINDOW,
                  0.004, 0.006, ratio=0.7, link_s=0.006)
    assert all(choices[:EXPLOIT_WINDOWS * WINDOW])
    assert not any(choices[EXPLOIT_WINDOWS * WINDOW:])
    assert policy.seen()["demotions"] == 1


def test_a_zstd_probe_lost_at_the_start_is_tried_again_soon():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # The first zstd window, timed while the migration starts up, is slow.
    run(policy, clock, 2 * PROBE, 0.008, 0.011, link_s=0.008)
    assert not policy.compress_next()
    # FIRST_RETRY_WINDOWS plain windows later zstd is probed again, at its own pace: it wins.
    choices = run(policy, clock, SETTLE_BYTES // MIB + (FIRST_RETRY_WINDOWS + 1) * WINDOW
                  + PROBE, 0.008, 0.005, link_s=0.008)
    assert sum(choices) == PROBE and policy.compress_next()


def test_auto_probes_again_soon_after_meeting_incompressible_pages():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # The probe met pages that do not compress (stored raw): a tie at the link's rate.
    run(policy, clock, 2 * PROBE, 0.008, 0.0082, ratio=1.0, link_s=0.008)
    assert not policy.compress_next() and policy.seen()["inconclusive_probes"] == 1
    # Compressible pages follow: one window later both are measured again, zstd wins.
    choices = run(policy, clock, PROBE + WINDOW + PROBE, 0.008, 0.005, link_s=0.008)
    assert not any(choices[:PROBE + WINDOW]) and policy.compress_next()
    assert policy.seen()["inconclusive_probes"] == 1


def test_the_final_round_keeps_zstd_only_where_it_proved_faster_over_a_link():
    clock = Clock()
    auto = CompressionPolicy(CompressSetting.parse("auto"), clock)
    fixed = CompressionPolicy(CompressSetting.parse("zstd:1"), clock)
    # zstd won its probe on a link that held plain back, and its windows since beat plain.
    run(auto, clock, 2 * PROBE + 2 * WINDOW, 0.008, 0.005, link_s=0.008)
    assert auto.compress_next()
    auto.pause()
    fixed.pause()
    assert auto.compress_next() and fixed.compress_next()
    assert auto.seen()["final_round"] == "zstd"
    # The final round's own timings (here plain ten times faster) decide nothing more.
    windows = auto.seen()["windows"]
    run(auto, clock, 3 * PROBE, 0.002, 0.02, link_s=0.0)
    assert auto.compress_next() and auto.seen()["windows"] == windows


def test_the_final_round_goes_plain_when_zstd_was_not_proven_faster():
    # zstd won its probe, but its windows since moved pages slower than plain's probe
    # (not yet demoted): the pause is not the place to find out.
    policy, clock = zstd_won_its_probe(0.006, 0.004)
    run(policy, clock, 2 * WINDOW, 0.003, 0.007, ratio=0.7, link_s=0.004)
    assert policy.compress_next()
    assert policy.seen()["final_round"] is None
    policy.pause()
    assert not policy.compress_next() and policy.seen()["final_round"] == "plain"
    # Plain's verdict stays plain.
    clock = Clock()
    plain = CompressionPolicy(CompressSetting.parse("auto"), clock)
    run(plain, clock, 2 * PROBE, 0.004, 0.008, link_s=0.004)
    assert not plain.compress_next()
    plain.pause()
    assert not plain.compress_next()


def test_a_tie_on_a_link_that_holds_plain_back_goes_to_zstd():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # The plain sends waited on the link; zstd, its pace set by the CPU, moved pages as
    # fast (a hair faster) with half the bytes: it wins.
    run(policy, clock, 2 * PROBE, 0.005, 0.00499, link_s=0.0025)
    assert policy.compress_next()
    # A little slower (within the margin) does not win a probe, on a second look either:
    # plain.
    slower = CompressionPolicy(CompressSetting.parse("auto"), clock)
    run(slower, clock, 2 * PROBE + WINDOW, 0.005, 0.005 * (COMPRESS_GAIN - 0.05),
        link_s=0.0025)
    assert not slower.compress_next() and slower.seen()["second_looks"] == 1


def test_a_close_zstd_probe_is_decided_on_two_windows():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # zstd's first window a little slower than plain's: one more.
    run(policy, clock, 2 * PROBE, 0.005, 0.006, link_s=0.005)
    assert policy.compress_next() and policy.seen()["second_looks"] == 1
    # The second is fast: both together beat plain, zstd is the verdict.
    run(policy, clock, WINDOW, 0.005, 0.0035, link_s=0.005)
    assert policy.compress_next()
    assert policy.rates[True] == pytest.approx(2 * MIB / (0.006 + 0.0035))
    choices = run(policy, clock, 2 * WINDOW, 0.005, 0.0035, link_s=0.005)
    assert all(choices)
    # Slower by more than that: decided at once, plain.
    slow = CompressionPolicy(CompressSetting.parse("auto"), clock)
    run(slow, clock, 2 * PROBE, 0.005, 0.005 * (SECOND_LOOK_GAIN + 0.05), link_s=0.005)
    assert not slow.compress_next() and slow.seen()["second_looks"] == 0


def test_the_final_round_goes_plain_when_the_guest_stops_during_a_zstd_probe():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    # zstd lost its probe by moving pages slower, and again FIRST_RETRY_WINDOWS later:
    # plain for twice the usual windows.
    run(policy, clock, 2 * PROBE + SETTLE_BYTES // MIB + (FIRST_RETRY_WINDOWS + 1) * WINDOW
        + PROBE, 0.008, 0.011, link_s=0.008)
    assert not policy.compress_next()
    # Then plain's next probe is slow, so zstd is probed again; the guest stops during
    # that probe. zstd's rate on record is its old probe's, faster than plain's now.
    run(policy, clock, SETTLE_BYTES // MIB + 2 * EXPLOIT_WINDOWS * WINDOW, 0.008, 0.011,
        link_s=0.008)
    run(policy, clock, WINDOW + 1, 0.02, 0.011, link_s=0.02)
    assert policy.compress_next() and policy.rates[True] == pytest.approx(MIB / 0.011)
    policy.pause()
    assert not policy.compress_next() and policy.seen()["final_round"] == "plain"


def test_a_zstd_verdict_ends_only_when_clearly_slower_than_plain():
    clock = Clock()
    policy = CompressionPolicy(CompressSetting.parse("auto"), clock)
    run(policy, clock, 2 * PROBE, 0.008, 0.005, link_s=0.008)
    assert policy.compress_next()
    # zstd's windows get a little slower than plain's probe (within the margin): held,
    # plain only in the windows that challenge it (and lose).
    choices = run(policy, clock, 4 * EXPLOIT_WINDOWS * WINDOW, 0.008,
                  0.008 * (COMPRESS_GAIN - 0.05), link_s=0.008)
    assert policy.seen()["demotions"] == 0 and policy.compress_next()
    assert sum(choices) >= 0.8 * len(choices)


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


def test_pacer_without_a_cap_never_waits():
    pacer = Pacer(None)
    assert pacer.take(1 << 30) == 0.0


def test_pacer_rate_changes_while_in_debt():
    pacer = Pacer(10 * MB)
    pacer.take(1 << 20)
    assert pacer.take(10 * MB) == pytest.approx(1.0, abs=0.02)     # 10 MB owed at 10 MB/s
    pacer.set_rate(100 * MB)                                        # raised: repaid 10x faster
    assert pacer.take(0) == pytest.approx(0.1, abs=0.02)
    pacer.set_rate(None)                                            # lifted: no wait at all
    assert pacer.take(100 * MB) == 0.0
    pacer.set_rate(10 * MB)                                         # capped again: a fresh burst
    assert pacer.take(1 << 20) == 0.0
    assert pacer.take(MB) == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError, match="positive"):
        pacer.set_rate(0)


def test_jobs_sharing_a_pacer_share_its_rate():
    agent_cap = Pacer(10 * MB)
    agent_cap.take(1 << 20)                  # the burst is spent
    first = agent_cap.take(MB)               # one job's megabyte...
    second = agent_cap.take(MB)              # ...and another's queue behind it
    assert first == pytest.approx(0.1, abs=0.01)
    assert second == pytest.approx(0.2, abs=0.01)


def test_downtime_target_starts_low_and_reaches_the_limit():
    assert downtime_target_s(0.3, 0) == pytest.approx(0.03)
    assert downtime_target_s(0.3, 1) == pytest.approx(0.03)
    assert downtime_target_s(0.3, 2) == pytest.approx(0.06)
    assert downtime_target_s(0.3, 4) == pytest.approx(0.24)
    assert downtime_target_s(0.3, 5) == downtime_target_s(0.3, 50) == pytest.approx(0.3)

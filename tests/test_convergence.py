"""The convergence model: switchover when it fits, throttle on stalls, timeout actions."""

from agent.migration.convergence import (THROTTLE_STEPS, ConvergencePolicy, Decision,
                                         RoundStats, TimeoutAction)


def stats(i, dirty, send_s=0.1):
    return RoundStats(index=i, dirty_pages=dirty, scan_s=0.05, send_s=send_s,
                      elapsed_s=send_s + 0.05)


def test_switches_over_when_prediction_fits():
    policy = ConvergencePolicy(downtime_limit_s=0.3)
    # 100k pages in 0.1 s -> 1M pages/s; 10k pages predicted at 10 ms + scan + overhead
    assert policy.observe(stats(0, 100_000), 1.0, 10_000, 0.05) is Decision.SWITCHOVER
    assert policy.predicted_downtime_s(10_000, 0.05) < 0.3


def test_continues_while_shrinking():
    policy = ConvergencePolicy(downtime_limit_s=0.01)
    assert policy.observe(stats(0, 100_000), 1.0, 80_000, 0.05) is Decision.CONTINUE
    assert policy.observe(stats(1, 80_000), 2.0, 40_000, 0.05) is Decision.CONTINUE


def test_stalled_dirty_set_throttles_step_by_step():
    policy = ConvergencePolicy(downtime_limit_s=0.01)
    decisions = [policy.observe(stats(i, 50_000), float(i), 50_000, 0.05) for i in range(20)]
    assert decisions.count(Decision.THROTTLE) == len(THROTTLE_STEPS)
    assert policy.throttle_share == THROTTLE_STEPS[-1]


def test_timeout_aborts_or_forces():
    abort = ConvergencePolicy(downtime_limit_s=0.01, timeout_s=5)
    assert abort.observe(stats(0, 50_000), 6.0, 50_000, 0.05) is Decision.ABORT
    force = ConvergencePolicy(downtime_limit_s=0.01, timeout_s=5,
                              timeout_action=TimeoutAction.FORCE)
    assert force.observe(stats(0, 50_000), 6.0, 50_000, 0.05) is Decision.SWITCHOVER


def test_no_rate_yet_means_no_switchover_unless_nothing_dirty():
    policy = ConvergencePolicy()
    assert policy.predicted_downtime_s(1, 0.0) == float("inf")
    assert policy.predicted_downtime_s(0, 0.0) == policy.overhead_s


def test_dirty_rate_far_above_link_throttles_hard_at_once():
    policy = ConvergencePolicy(downtime_limit_s=0.01)
    # link: 10k pages/s; the guest dirtied 20k pages in a 2 s round -> 10k pages/s, twice
    # what LINK_SHARE allows: half the time stopped at least.
    policy.observe(stats(0, 20_000, send_s=2.0), 2.0, 20_000, 0.05)
    decision = policy.observe(RoundStats(1, 20_000, 0.05, 2.0, 2.0), 4.0, 20_000, 0.05)
    assert decision is Decision.THROTTLE
    assert policy.throttle_share >= 0.5


def test_needed_share_accounts_for_current_throttle():
    policy = ConvergencePolicy(max_page_rate=10_000, throttle_step=1)  # 50% stopped
    # 2.5k pages/s while half stopped is 5k pages/s unthrottled: exactly LINK_SHARE.
    assert policy.needed_share(5_000, 2.0) == 0.0
    assert policy.needed_share(10_000, 2.0) == 0.5  # 10k/s unthrottled: stop half the time

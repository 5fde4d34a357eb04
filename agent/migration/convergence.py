"""Deciding when pre-copy has converged: predicted stop-and-copy time against the limit.

Each round reports how many pages were dirty and how fast pages went out. The model
predicts the downtime of switching over now as: one final scan of RAM, plus sending the
pages dirtied since the last round at the measured page rate, plus a fixed cost for the
device state and resuming the destination. When the dirty set stops shrinking the guest
is throttled: at once to the share its dirty rate calls for against the link's rate, and
a step harder after every STALL_ROUNDS rounds without progress. When pre-copy still
exceeds its time budget the timeout action (abort or force) applies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Device state (~200 KB), QMP round trips and the destination's `cont`: measured ~20-40 ms
# here; the prediction adds this to the RAM part.
DEFAULT_SWITCHOVER_OVERHEAD_S = 0.035
# Switch over only when the prediction fits this share of the limit: the guest keeps
# dirtying pages between the decision and the stop, so the real stop-and-copy is longer.
PREDICTION_MARGIN = 0.8
# A round "did not shrink" the dirty set when it kept more than this share of the best.
NO_PROGRESS_SHARE = 0.9
# Rounds in a row without progress before throttling harder.
STALL_ROUNDS = 2
# Throttle so the guest dirties at most this share of what the link carries.
LINK_SHARE = 0.5
# Share of wall time the guest is stopped, step by step, while throttling.
THROTTLE_STEPS = (0.3, 0.5, 0.7, 0.85, 0.95)


class TimeoutAction(enum.Enum):
    """What to do when pre-copy runs out of time without converging."""

    ABORT = "abort"    # roll back: the source keeps running
    FORCE = "force"    # switch over anyway, accepting a longer downtime


class Decision(enum.Enum):
    """The outcome of looking at one round."""

    CONTINUE = "continue"
    THROTTLE = "throttle"
    SWITCHOVER = "switchover"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class RoundStats:
    """What one pre-copy round measured."""

    index: int
    dirty_pages: int        # pages found dirty at the start of the round (and sent in it)
    scan_s: float           # time the dirty scan took
    send_s: float           # time to encode and send those pages
    elapsed_s: float        # wall time since the previous round started

    @property
    def page_rate(self) -> float:
        """Pages per second the pipeline moved in this round (0 when nothing was sent)."""
        return self.dirty_pages / self.send_s if self.send_s > 0 and self.dirty_pages else 0.0


@dataclass(slots=True)
class ConvergencePolicy:
    """Tracks rounds and decides; one instance per migration job."""

    downtime_limit_s: float = 0.3
    timeout_s: float = 120.0
    timeout_action: TimeoutAction = TimeoutAction.ABORT
    overhead_s: float = DEFAULT_SWITCHOVER_OVERHEAD_S
    max_page_rate: float = 0.0
    best_dirty: int | None = None
    stalled_rounds: int = 0
    throttle_step: int = -1
    history: list[RoundStats] = field(default_factory=list)

    @property
    def throttle_share(self) -> float:
        """Share of time the guest is currently kept stopped (0 when not throttled)."""
        return THROTTLE_STEPS[self.throttle_step] if self.throttle_step >= 0 else 0.0

    def predicted_downtime_s(self, dirty_pages: int, scan_s: float) -> float:
        """Predicted stop-and-copy time if we switched over with this many dirty pages."""
        rate = self.max_page_rate
        send_s = dirty_pages / rate if rate > 0 else (0.0 if dirty_pages == 0 else float("inf"))
        return scan_s + send_s + self.overhead_s

    def observe(self, stats: RoundStats, elapsed_total_s: float, next_dirty: int,
                next_scan_s: float) -> Decision:
        """Record a finished round and decide, given the dirty set found for the next one."""
        self.history.append(stats)
        self.max_page_rate = max(self.max_page_rate, stats.page_rate)
        if (self.predicted_downtime_s(next_dirty, next_scan_s)
                <= self.downtime_limit_s * PREDICTION_MARGIN):
            return Decision.SWITCHOVER
        if elapsed_total_s >= self.timeout_s:
            return (Decision.SWITCHOVER if self.timeout_action is TimeoutAction.FORCE
                    else Decision.ABORT)
        if self.best_dirty is None or next_dirty < self.best_dirty * NO_PROGRESS_SHARE:
            self.best_dirty = next_dirty if self.best_dirty is None else min(
                self.best_dirty, next_dirty)
            self.stalled_rounds = 0
            return Decision.CONTINUE
        self.stalled_rounds += 1
        needed = self._step_for(self.needed_share(next_dirty, stats.elapsed_s))
        if self.stalled_rounds >= STALL_ROUNDS:
            needed = max(needed, self.throttle_step + 1)
        needed = min(needed, len(THROTTLE_STEPS) - 1)
        if needed > self.throttle_step:
            self.throttle_step = needed
            self.stalled_rounds = 0
            self.best_dirty = next_dirty
            return Decision.THROTTLE
        return Decision.CONTINUE

    def needed_share(self, dirtied: int, over_s: float) -> float:
        """The stopped share that brings the guest's dirty rate under LINK_SHARE of the
        link's page rate, from the pages it dirtied in the last round."""
        if over_s <= 0 or self.max_page_rate <= 0:
            return 0.0
        running = 1.0 - self.throttle_share
        raw_rate = dirtied / over_s / max(running, 0.01)  # what it would dirty unthrottled
        allowed = LINK_SHARE * self.max_page_rate
        return 0.0 if raw_rate <= allowed else 1.0 - allowed / raw_rate

    @staticmethod
    def _step_for(share: float) -> int:
        """Index of the smallest throttle step at least `share` (-1 for none)."""
        if share <= 0:
            return -1
        for index, step in enumerate(THROTTLE_STEPS):
            if step >= share:
                return index
        return len(THROTTLE_STEPS) - 1

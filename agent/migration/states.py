"""Every state of a migration job and every allowed transition, in one table.

This table is the single source of truth: code moves a job only through `Job.advance`,
which refuses any transition not listed, and docs/architecture.md draws its diagram from
it. The safety invariant hangs on it: before COMMITTING, every failure path leads to
ROLLING_BACK (the source resumes, the destination is removed); from COMMITTING on, the
source never resumes on its own.
"""

from __future__ import annotations

import enum
import time

from agent.errors import LocalError


class Phase(enum.Enum):
    """Where a migration job is."""

    PREPARING = "preparing"        # checking the VM, handshake, destination starting QEMU
    PRECOPY = "precopy"            # rounds of dirty pages while the guest runs
    THROTTLING = "throttling"      # pre-copy with the guest slowed to converge
    STOP_AND_COPY = "stop-and-copy"  # source stopped; last pages and device state
    COMMITTING = "committing"      # COMMIT sent; destination takes over
    ROLLING_BACK = "rolling-back"  # undoing: source resumes, destination removed
    COMPLETED = "completed"        # destination runs, source QEMU has quit
    FAILED = "failed"              # rolled back after an error; source runs
    CANCELLED = "cancelled"        # rolled back at the user's request; source runs
    UNKNOWN = "unknown"            # commit outcome unknown; source stays stopped


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PREPARING: frozenset({Phase.PRECOPY, Phase.ROLLING_BACK}),
    Phase.PRECOPY: frozenset({Phase.THROTTLING, Phase.STOP_AND_COPY, Phase.ROLLING_BACK}),
    Phase.THROTTLING: frozenset({Phase.STOP_AND_COPY, Phase.ROLLING_BACK}),
    Phase.STOP_AND_COPY: frozenset({Phase.COMMITTING, Phase.ROLLING_BACK}),
    Phase.COMMITTING: frozenset({Phase.COMPLETED, Phase.UNKNOWN}),
    Phase.ROLLING_BACK: frozenset({Phase.FAILED, Phase.CANCELLED}),
    Phase.UNKNOWN: frozenset({Phase.COMPLETED, Phase.ROLLING_BACK}),
    Phase.COMPLETED: frozenset(),
    Phase.FAILED: frozenset(),
    Phase.CANCELLED: frozenset(),
}

FINAL = frozenset(p for p, nexts in TRANSITIONS.items() if not nexts)
# Before COMMITTING the source may always be resumed; these phases allow rollback.
ROLLBACK_SAFE = frozenset({Phase.PREPARING, Phase.PRECOPY, Phase.THROTTLING,
                           Phase.STOP_AND_COPY})


class IllegalTransition(LocalError):
    """Code tried to move a job along an edge that TRANSITIONS does not have (a bug)."""


class PhaseTracker:
    """The current phase of one job, with the time each phase was entered."""

    def __init__(self) -> None:
        self.phase = Phase.PREPARING
        self.history: list[tuple[Phase, float]] = [(Phase.PREPARING, time.monotonic())]

    def advance(self, new: Phase) -> None:
        """Move to `new`, or raise IllegalTransition if the table forbids it."""
        if new not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"migration cannot go from {self.phase.value} to {new.value}")
        self.phase = new
        self.history.append((new, time.monotonic()))

    @property
    def final(self) -> bool:
        return self.phase in FINAL

    @property
    def may_roll_back(self) -> bool:
        return self.phase in ROLLBACK_SAFE

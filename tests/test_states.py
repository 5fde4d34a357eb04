"""The migration state table: legal paths pass, illegal ones raise, safety holds."""

import pytest

from agent.migration.states import (
    FINAL,
    ROLLBACK_SAFE,
    TRANSITIONS,
    IllegalTransition,
    Phase,
    PhaseTracker,
)


def test_happy_path():
    job = PhaseTracker()
    for phase in (Phase.PRECOPY, Phase.THROTTLING, Phase.STOP_AND_COPY, Phase.COMMITTING,
                  Phase.COMPLETED):
        job.advance(phase)
    assert job.final


def test_illegal_transition_raises():
    job = PhaseTracker()
    with pytest.raises(IllegalTransition):
        job.advance(Phase.COMPLETED)


def test_no_rollback_after_commit():
    # The safety invariant: once COMMIT is sent the source never resumes on its own.
    assert Phase.ROLLING_BACK not in TRANSITIONS[Phase.COMMITTING]
    assert Phase.COMMITTING not in ROLLBACK_SAFE


def test_every_nonfinal_phase_can_end():
    for phase in Phase:
        assert phase in TRANSITIONS
        if phase not in FINAL:
            assert TRANSITIONS[phase]

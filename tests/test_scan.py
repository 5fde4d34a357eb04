"""The native index runs (agent._native.scan) against their pure-Python twin."""

from __future__ import annotations

import itertools
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent._native import scan as native
from agent.memory import _scan_py as twin
from agent.memory import scan as selected

BACKENDS = [pytest.param(native, id="native"), pytest.param(twin, id="python")]


def test_selector_names_its_backend():
    assert selected.BACKEND in ("native", "python")
    expected = native if selected.BACKEND == "native" else twin
    assert selected.run_indices is expected.run_indices
    assert selected.runs is expected.runs


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 199), unique=True).map(sorted))
def test_runs_native_match_twin(indices):
    assert native.runs(indices) == twin.runs(indices)
    assert native.runs(array("Q", indices)) == twin.runs(indices)
    assert native.run_indices(native.runs(indices)) == array("Q", indices)
    assert twin.run_indices(twin.runs(indices)) == array("Q", indices)
    assert [p for first, n in native.runs(indices) for p in range(first, first + n)] == indices
    # Maximal: no two runs touch.
    found = native.runs(indices)
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(found))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 50)), max_size=8))
def test_run_indices_native_matches_twin(ranges):
    result = native.run_indices(ranges)
    assert result == twin.run_indices(ranges)
    assert result.typecode == "Q"
    assert list(result) == [p for first, n in ranges for p in range(first, first + n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_indices_lists_every_index_of_each_run(backend):
    assert backend.run_indices([(3, 2), (10, 0), (7, 3)]) == array("Q", [3, 4, 7, 8, 9])
    assert backend.run_indices(iter([])) == array("Q")
    assert len(backend.run_indices([(1 << 40, 100_000)])) == 100_000
    with pytest.raises(OverflowError):
        backend.run_indices([(-1, 2)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_runs_refuses_indices_not_strictly_ascending(backend):
    assert backend.runs([]) == []
    with pytest.raises(ValueError):
        backend.runs([3, 3])
    with pytest.raises(ValueError):
        backend.runs([3, 1])

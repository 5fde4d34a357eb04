"""`python -m bench fuzz` in small: a couple of thousand inputs per target (the full
1,000,000-per-target run is `python -m bench fuzz`, not part of `make test`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from agent.errors import ProtocolError
from bench import fuzz


@pytest.mark.parametrize("name", fuzz.TARGETS)
def test_every_target_runs_without_failures(name, tmp_path, monkeypatch):
    monkeypatch.setattr(fuzz, "RESULTS", tmp_path)
    target = fuzz.FACTORIES[name]()
    tally = fuzz.fuzz(target, 2000, seed=5)
    assert tally.failures == 0, tally.saved
    assert tally.inputs == tally.accepted + tally.rejected == 2000
    # Mutations must reach both outcomes, or the harness tests nothing.
    assert tally.accepted > 20 and tally.rejected > 200


def test_same_seed_same_inputs():
    target = fuzz.FACTORIES["wire"]()
    first = [target.generate(random.Random("1:wire")).data for _ in range(3)]
    again = [target.generate(random.Random("1:wire")).data for _ in range(3)]
    assert first == again


def test_a_failure_is_saved_and_replays(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fuzz, "RESULTS", tmp_path)
    target = fuzz.FACTORIES["messages"]()

    def broken(case, rng):
        raise KeyError("not the project's error")

    monkeypatch.setattr(target, "run", broken)
    tally = fuzz.fuzz(target, 3, seed=1)
    assert tally.failures == 3 and len(tally.saved) == 3
    saved = json.loads(Path(tally.saved[0]).read_text())
    assert saved["target"] == "messages" and "KeyError" in saved["failure"]
    monkeypatch.setattr(fuzz.MessagesTarget, "run", broken)
    assert fuzz.replay(tally.saved[0]) == 1
    monkeypatch.undo()
    assert fuzz.replay(tally.saved[0]) == 0     # the real decoder: accepted or rejected
    assert "no failure" in capsys.readouterr().out


def test_project_errors_count_as_rejected(monkeypatch):
    target = fuzz.FACTORIES["messages"]()

    def refuse(case, rng):
        raise ProtocolError("refused")

    monkeypatch.setattr(target, "run", refuse)
    assert fuzz.fuzz(target, 5, seed=1).rejected == 5


def test_command_line_prints_the_counts(capsys):
    assert fuzz.main(["--target", "messages", "--count", "300", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["targets"]
    assert row["target"] == "messages" and row["inputs"] == 300 and row["failures"] == 0

"""Fault points (acc_clip/runtime/faults.py): the environment `kill_at` makes, and `fault_point` doing
nothing unless that environment names its point and step. The kill itself (SIGKILL) is never sent here:
os.kill is replaced by a recorder; tests/integration kill real trainers with it."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from acc_clip.runtime import faults
from acc_clip.runtime.faults import KILL_AT_ENV, POINTS, fault_point, kill_at


@pytest.fixture
def kills(monkeypatch):
    """The signals fault_point would send, instead of sending them."""
    sent = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    monkeypatch.delenv(KILL_AT_ENV, raising=False)
    return sent


def test_kill_at_makes_the_environment_of_a_point_and_step():
    assert KILL_AT_ENV == "ACC_CLIP_KILL_AT"
    assert kill_at("before_commit", 7) == {"ACC_CLIP_KILL_AT": "before_commit:7"}
    assert kill_at("between_renames", 0) == {"ACC_CLIP_KILL_AT": "between_renames:0"}
    with pytest.raises(ValueError, match="unknown fault point 'after_lunch'; expected one of"):
        kill_at("after_lunch", 1)


def test_fault_point_does_nothing_without_the_environment(kills):
    for point in POINTS:
        for step in (0, 1, 7):
            fault_point(point, step)
    assert kills == []


@pytest.mark.parametrize(
    "value", ["before_commit:8", "between_renames:7", "before_commit", "before_commit:07", "before_commit: 7", "", "7"]
)
def test_fault_point_does_nothing_unless_the_environment_names_that_point_and_step(kills, monkeypatch, value):
    monkeypatch.setenv(KILL_AT_ENV, value)
    fault_point("before_commit", 7)
    assert kills == []


@pytest.mark.parametrize("point", POINTS)
def test_fault_point_kills_this_process_at_its_point_and_step(kills, monkeypatch, point):
    monkeypatch.setenv(*kill_at(point, 7).popitem())
    fault_point(point, 6)
    assert kills == []
    fault_point(point, 7)
    assert kills == [(os.getpid(), signal.SIGKILL)]


def test_production_code_calls_each_point():
    """Each point is placed in the code once (a renamed point would silently never fire)."""
    package = Path(faults.__file__).resolve().parents[1]
    calls = [
        m.group(1)
        for path in package.rglob("*.py")
        if path.name != "faults.py"
        for m in re.finditer(r'fault_point\("(\w+)"', path.read_text())
    ]
    assert sorted(calls) == sorted(POINTS)

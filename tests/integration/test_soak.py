"""The random-kill soak (tools/soak.py), short: 3 kills (a SIGKILL, a SIGTERM and a kill inside a save at a
fault point) over a 24-step run on 1 process, each followed by `--resume latest`, must end in the
uninterrupted run's weights, losses and sample counts. docs/reliability.md ("Random-kill soak") has the
long soaks' results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

SOAK = REPO / "tools" / "soak.py"


@pytest.fixture
def soak(monkeypatch):
    """tools/soak.py as a module, for its plan."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import soak as module

    return module


def test_the_same_seed_plans_the_same_kills_and_every_kind_and_point_takes_part(soak):
    # every point passed at each save (every 3 steps), one only at the ends of the 2 epochs
    reached = {point: list(range(3, 61, 3)) for point in soak.faults.POINTS} | {soak.faults.POINTS[-1]: [30, 60]}

    def plan(seed: int) -> list:
        return soak.plan_kills(seed, 20, 60, 2, {point: list(steps) for point, steps in reached.items()})

    assert plan(7) == plan(7) != plan(8)
    assert {kill.kind for kill in plan(7)} == set(soak.KINDS)
    faults = [kill for kill in plan(7) if kill.kind == "fault"]
    assert {kill.point for kill in faults} == set(soak.faults.POINTS)
    assert all(kill.step in reached[kill.point] for kill in faults)  # where the uninterrupted run passed it
    assert len({(kill.point, kill.step) for kill in faults}) == len(faults)
    steps = [kill.step for kill in plan(7)]
    assert steps == sorted(steps) and steps[0] <= 6 and steps[-1] >= 54  # the kills walk through the whole run


def test_a_seeded_soak_of_three_kills_passes(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(SOAK), "--kills", "3", "--steps", "24", "--processes", "1", "--data", "csv"]
        + ["--seed", "0", "--work", str(tmp_path / "work"), "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    found = json.loads(report.read_text())
    assert found["result"] == "PASS" and all(check["ok"] for check in found["checks"].values()), found["checks"]
    kills = [attempt for attempt in found["attempts"] if attempt["planned"] != "-"]
    assert sorted(kill["kind"].split()[0] for kill in kills) == ["SIGKILL", "SIGTERM", "fault"]
    # each kill stopped a start of the trainer, and the run went on from a checkpoint after it
    assert all(kill["status"] not in (None, 0) and kill["expected"] for kill in kills), kills
    assert found["attempts"][-1]["status"] == 0 and found["attempts"][-1]["resumed_from"], found["attempts"][-1]

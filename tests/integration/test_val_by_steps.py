"""--val-every-n-steps: evaluations keyed by step, on the run's schedule, and the same evaluations after a
kill -9 and `--resume latest` as in a run that never stopped (results.jsonl rewound like metrics.jsonl)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from acc_clip.runtime.faults import kill_at
from helpers import run_trainer, tiny_train_args

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # one thread: the same numbers in every run

# 160 rows at batch 16: 10 steps per epoch, 1 epoch.
EVERY = 5
SAVE_EVERY = 3


def args_for(small_csv: Path, logs: Path, name: str) -> list[str]:
    return tiny_train_args(
        small_csv,
        logs,
        name,
        "--val-data",
        str(small_csv),
        "--val-every-n-steps",
        str(EVERY),
        "--save-every-n-steps",
        str(SAVE_EVERY),
        "--epochs",
        "1",
    )


def results(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def test_evaluations_by_steps_survive_a_kill_and_resume(small_csv, tmp_path):
    straight = run_trainer(args_for(small_csv, tmp_path, "A"))
    expected = results(tmp_path / "A")
    # Before training, every 5 steps; the epoch's end (10) is a step of the schedule too: evaluated once.
    assert [(r["epoch"], r["step"]) for r in expected] == [(0, 0), (0, 5), (1, 10)]
    assert "Eval by steps (epoch 0, step 5)" in straight.stdout
    assert all("image_to_text_R@1" in r and r["num_samples"] == 160 for r in expected)

    # Killed while saving step 6, after step 5's evaluation: the resume starts at step 3's checkpoint and
    # evaluates step 5 again, on the same weights.
    args = args_for(small_csv, tmp_path, "B")
    killed = run_trainer(args, check=False, env=kill_at("before_commit", 6))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [r["step"] for r in results(tmp_path / "B")] == [0, 5]
    resumed = run_trainer([*args, "--resume", "latest"])
    assert "results.jsonl: dropped 1 record(s)" in resumed.stdout
    assert results(tmp_path / "B") == expected

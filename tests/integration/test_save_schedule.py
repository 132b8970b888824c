"""When step checkpoints are saved without being asked for: --save-every-n-minutes (default 30) at the same
step on every process, and how many are kept (--keep-checkpoints, default 3). With no save flag at all, a
kill -9 after the default interval resumes from a checkpoint inside the epoch, not from its start.

The default interval is waited for under tests/fast_clock.py (the schedule's clock runs 1800 times faster);
so is the 2-process test's, with one process's clock ahead of the other's."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from acc_clip.checkpoint.folders import complete_checkpoints
from acc_clip.io.sealed import MANIFEST
from background_trainer import Trainer, two_processes, wait_until
from helpers import REPO, run_trainer, tiny_train_args

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
FAST_CLOCK = [sys.executable, str(REPO / "tests" / "fast_clock.py")]
STEPS_PER_EPOCH = 20  # the 320-row fixture at batch 16


def saved(run_dir: Path) -> list[dict]:
    """Each complete step checkpoint's progress, oldest first."""
    return [
        json.loads(Path(folder, MANIFEST).read_text())["progress"]
        for folder in complete_checkpoints(str(run_dir / "checkpoints"))
    ]


def test_with_no_save_flags_a_kill_after_the_default_interval_resumes_inside_the_epoch(train_csv, tmp_path):
    # tiny_train_args gives --save-frequency 0 only (no epoch files): every step checkpoint here is a default's.
    args = tiny_train_args(train_csv, tmp_path, "run", "--epochs", "3")
    run_dir = tmp_path / "run"
    # About 0.2 s a step: the first half hour of the fast clock ends within the first epoch.
    trainer = Trainer(args, tmp_path / "first.log", launcher=FAST_CLOCK)
    wait_until(lambda: any(0 < p["step_in_epoch"] < STEPS_PER_EPOCH for p in saved(run_dir)), trainer)
    trainer.process.send_signal(signal.SIGKILL)
    assert trainer.wait(timeout=60) == -signal.SIGKILL
    newest, progress = complete_checkpoints(str(run_dir / "checkpoints"))[-1], saved(run_dir)[-1]
    assert progress["global_step"] > 0  # by time alone: no flag asked for a save

    run_trainer([*args, "--resume", "latest"], launcher=FAST_CLOCK)
    assert (
        f"resumed from {newest}: epoch {progress['epoch']}, step {progress['step_in_epoch']} of the epoch"
        in (run_dir / "out.log").read_text()
    )
    # The schedule went on saving, and the default --keep-checkpoints 3 pruned the older ones.
    assert 1 <= len(saved(run_dir)) <= 3
    assert saved(run_dir)[-1]["global_step"] == 3 * STEPS_PER_EPOCH


def test_save_every_n_minutes_saves_at_the_same_step_on_two_processes(train_csv, tmp_path):
    """The processes' clocks differ (here rank 1's runs 1.5 times as fast as rank 0's); without their vote each would
    save at its own step, and the save's collectives would hang or mix steps."""
    args = tiny_train_args(train_csv, tmp_path, "two", "--epochs", "3", "--keep-checkpoints", "0")
    launcher = [*two_processes(), str(REPO / "tests" / "fast_clock.py")]
    trainer = Trainer(args, tmp_path / "two.log", launcher=launcher, env={"ACC_CLIP_CLOCK_RANK_SKEW": "0.5"})
    assert trainer.wait(timeout=150) == 0, trainer.tail()
    checkpoints = [Path(c) for c in complete_checkpoints(str(tmp_path / "two" / "checkpoints"))]
    assert len(checkpoints) >= 2, "saves by time expected every ~5 steps"
    for folder in checkpoints:  # both processes' states in the one folder of that step
        assert {p.name for p in folder.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}

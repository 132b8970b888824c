"""Resume is exact: a run stopped mid-epoch (SIGUSR1, SLURM's warning signal, kill -9, kill -9 while a checkpoint
is being written) and resumed with `--resume latest` makes the same per-step losses as a run that never
stopped, and every epoch sees each sample exactly once.

Runs use 160 rows of the 320-row fixture (10 steps of 16 per epoch, 2 epochs), one CPU thread per
run so that losses are reproducible bit for bit, and the opt-in sample record (the trainer's
--log-samples) to observe which samples each step trained on.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from acc_clip.checkpoint.folders import TMP_PREFIX, complete_checkpoints
from acc_clip.io.sealed import MANIFEST, read_sealed
from acc_clip.runtime.faults import kill_at
from acc_clip.runtime.signals import PREEMPTED_EXIT_CODE
from background_trainer import Trainer, metric_rows, newest_checkpoint, saved_at_or_after, wait_until
from helpers import SMALL_CSV_ROWS, assert_same_training, flip_a_bit, run_trainer, tiny_train_args

ROWS = SMALL_CSV_ROWS
STEPS_PER_EPOCH = ROWS // 16
EPOCHS = 2
SAVE_EVERY = 4
LOSS_TOLERANCE = 1e-6
WORKERS = (2,)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # one thread: same reduction order in every run


def run_args(csv: Path, logs: Path, name: str, workers: int, *extra: str) -> list[str]:
    return tiny_train_args(
        csv, logs, name, "--workers", str(workers), "--save-every-n-steps", str(SAVE_EVERY), "--log-samples", *extra
    )


@pytest.fixture(scope="module")
def reference_runs(small_csv, tmp_path_factory):
    """Run A for each worker count, trained straight through, in the background, overlapping the
    stopped-and-resumed runs instead of adding to the test's time; `reference(w)` waits for one."""
    logs = tmp_path_factory.mktemp("reference")
    running = {
        count: Trainer(run_args(small_csv, logs, f"A{count}", count), logs / f"A{count}.log") for count in WORKERS
    }

    def reference(workers: int) -> Path:
        if running[workers].wait(timeout=600) != 0:
            raise AssertionError(f"reference run failed:\n{running[workers].tail()}")
        return logs / f"A{workers}"

    yield reference
    for trainer in running.values():
        trainer.stop()


def same_training(resumed: Path, reference: Path) -> float:
    """Same steps, same losses and learning rates, same samples per step; each epoch sees every row
    once. Returns the largest loss difference."""
    return assert_same_training(
        resumed, reference, rows=ROWS, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, loss_tolerance=LOSS_TOLERANCE
    )


# A kill -9 between steps (from outside, once a checkpoint is complete) is the resume matrix's shards
# cell (test_resume_matrix.py); here the kill comes while a checkpoint is being written, with loader
# workers running.
@pytest.mark.parametrize("workers, kill", [(2, "while saving")])
def test_sigterm_then_kill9_mid_epoch_resume_exactly(small_csv, tmp_path, reference_runs, workers, kill):
    """SIGUSR1 (SLURM's --signal=USR1@N; SIGTERM is the resume matrix's) in epoch 0, then kill -9 in epoch 1
    after a step checkpoint: either between steps
    (from outside, once the checkpoint is complete) or in the middle of writing the next checkpoint
    (the "before_commit" fault point, acc_clip/runtime/faults.py); each time `--resume latest` goes on."""
    args = run_args(small_csv, tmp_path, "B", workers)
    run_dir = tmp_path / "B"

    # 1. SIGUSR1 in epoch 0: the step finishes, a checkpoint is saved, the exit code says "preempted".
    log1 = tmp_path / "stop1.log"
    trainer = Trainer(args, log1)
    wait_until(lambda: metric_rows(run_dir) >= 2, trainer)
    trainer.process.send_signal(signal.SIGUSR1)
    assert trainer.wait(timeout=120) == PREEMPTED_EXIT_CODE, trainer.tail()
    checkpoint, progress = newest_checkpoint(run_dir)
    assert progress["epoch"] == 0 and 0 < progress["step_in_epoch"] < STEPS_PER_EPOCH, progress  # mid-epoch
    assert f"stopping on SIGUSR1 after step {progress['global_step']}" in log1.read_text()

    # 2. Resume, then kill -9 in epoch 1, after the step checkpoint of global step 12.
    log2 = tmp_path / "stop2.log"
    saved_before_kill = STEPS_PER_EPOCH + 2
    assert saved_before_kill % SAVE_EVERY == 0
    if kill == "between steps":
        trainer = Trainer([*args, "--resume", "latest"], log2)
        wait_until(lambda: saved_at_or_after(run_dir, saved_before_kill), trainer)
        trainer.process.kill()
    else:
        trainer = Trainer(
            [*args, "--resume", "latest"], log2, env=kill_at("before_commit", saved_before_kill + SAVE_EVERY)
        )
    assert trainer.wait(timeout=240) == -signal.SIGKILL, trainer.tail()
    assert f"resumed from {checkpoint}:" in log2.read_text()
    partial = run_dir / "checkpoints" / f"{TMP_PREFIX}step_{saved_before_kill + SAVE_EVERY:08d}"
    if kill == "while saving":  # state written, manifest not: the save at step 16 is incomplete
        assert (partial / "model.safetensors").is_file() and not (partial / MANIFEST).exists()
        assert newest_checkpoint(run_dir)[0].name == f"step_{saved_before_kill:08d}"
    checkpoint, progress = newest_checkpoint(run_dir)
    assert progress["epoch"] == 1 and 0 < progress["step_in_epoch"] < STEPS_PER_EPOCH, progress  # mid-epoch

    # 3. Resume to the end: the same training as run A, step for step.
    result = run_trainer([*args, "--resume", "latest"])
    assert f"resumed from {checkpoint}:" in result.stdout
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]  # cleaned up
    worst = same_training(run_dir, reference_runs(workers))
    print(f"\nworkers={workers}, kill -9 {kill}: max |loss(B) - loss(A)| over the resumed run = {worst:.3g}")


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_and_resumes_exactly(
    small_csv, tmp_path, reference_runs
):
    """One bit flipped in the newest checkpoint's weights: `--resume latest` names it, resumes from the
    checkpoint before, trains the steps after that again, and ends as the run that never stopped."""
    workers = WORKERS[0]
    args = run_args(small_csv, tmp_path, "D", workers)
    run_dir = tmp_path / "D"
    killed = run_trainer(args, check=False, env=kill_at("before_commit", 3 * SAVE_EVERY))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    newest, _ = newest_checkpoint(run_dir)
    assert newest.name == f"step_{2 * SAVE_EVERY:08d}"
    flip_a_bit(newest / "model.safetensors", offset_from_end=8)  # tensor data, size unchanged

    result = run_trainer([*args, "--resume", "latest"])
    assert f"{newest}: damaged checkpoint, model.safetensors differs from what was saved" in result.stdout
    assert (
        f"resuming from {run_dir / 'checkpoints' / f'step_{SAVE_EVERY:08d}'}, the newest checkpoint that "
        "passes its check (1 newer one(s) failed"
    ) in result.stdout
    same_training(run_dir, reference_runs(workers))


@pytest.mark.parametrize("kill", ["as the save starts", "before_background_write"])
def test_a_kill_during_an_asynchronous_save_leaves_a_complete_checkpoint_and_resumes_exactly(
    small_csv, tmp_path, reference_runs, kill
):
    """--async-save: the step copies the state and training goes on while it is written. A kill -9 at once
    (from outside, as soon as the save's partial folder appears) or inside the background write (the fault
    point) leaves the previous checkpoint or the new complete one, never a partial one read as complete;
    resuming from it ends as the run that never stopped (saving in the background changes no step)."""
    workers = WORKERS[0]
    args = run_args(small_csv, tmp_path, "E", workers, "--async-save")
    run_dir, target = tmp_path / "E", 2 * SAVE_EVERY
    partial = run_dir / "checkpoints" / f"{TMP_PREFIX}step_{target:08d}"
    if kill == "as the save starts":
        trainer = Trainer(args, tmp_path / "kill.log")
        wait_until(lambda: partial.exists() or saved_at_or_after(run_dir, target), trainer)
        trainer.process.kill()
    else:
        trainer = Trainer(args, tmp_path / "kill.log", env=kill_at(kill, target))
    assert trainer.wait(timeout=240) == -signal.SIGKILL, trainer.tail()
    checkpoints = complete_checkpoints(str(run_dir / "checkpoints"))
    assert [Path(c).name for c in checkpoints][-1] in (f"step_{SAVE_EVERY:08d}", f"step_{target:08d}")
    for checkpoint in checkpoints:
        read_sealed(checkpoint, "test")  # complete: every file listed, and its hash holds
    if kill != "as the save starts":
        assert Path(checkpoints[-1]).name == f"step_{SAVE_EVERY:08d}" and partial.exists()

    result = run_trainer([*args, "--resume", "latest"])
    assert f"resumed from {checkpoints[-1]}:" in result.stdout
    assert not partial.exists()
    same_training(run_dir, reference_runs(workers))

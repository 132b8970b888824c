"""Resume is exact: a run stopped mid-epoch (SIGTERM, kill -9, kill -9 while a checkpoint is being
written) and resumed with `--resume latest` makes the same per-step losses as a run that never
stopped, and every epoch sees each sample exactly once.

Runs use 160 rows of the 320-row fixture (10 steps of 16 per epoch, 2 epochs), one CPU thread per
run so that losses are reproducible bit for bit, and the opt-in sample record
(ACC_CLIP_DEBUG_SAMPLES=1) to observe which samples each step trained on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import SMALL_CSV_ROWS, REPO, read_metrics, run_trainer, tiny_train_args

from acc_clip.checkpoint.debug import KILL_BEFORE_COMMIT_ENV, SAMPLES_ENV
from acc_clip.checkpoint.format import MANIFEST, TMP_PREFIX, complete_checkpoints
from acc_clip.runtime.run_dir import SAMPLES_FILE
from acc_clip.runtime.signals import PREEMPTED_EXIT_CODE

ROWS = SMALL_CSV_ROWS
STEPS_PER_EPOCH = ROWS // 16
EPOCHS = 2
SAVE_EVERY = 4
LOSS_TOLERANCE = 1e-6


@pytest.fixture(scope="module", autouse=True)
def reproducible_env():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # one thread: same reduction order in every run
        patch.setenv(SAMPLES_ENV, "1")
        yield


def run_args(csv: Path, logs: Path, name: str, workers: int, *extra: str) -> list[str]:
    return tiny_train_args(csv, logs, name, "--workers", str(workers), "--save-every-n-steps", str(SAVE_EVERY),
                           *extra)


@pytest.fixture(scope="module")
def reference_runs(small_csv, tmp_path_factory):
    """Run A for each worker count, trained straight through. Both run in the background, overlapping
    the stopped-and-resumed runs instead of adding to the test's time; `reference(w)` waits for one."""
    logs = tmp_path_factory.mktemp("reference")
    running = {count: start_trainer(run_args(small_csv, logs, f"A{count}", count), logs / f"A{count}.log")
               for count in (0, 2)}

    def reference(workers: int) -> Path:
        if running[workers].wait(timeout=600) != 0:
            raise AssertionError(f"reference run failed:\n{(logs / f'A{workers}.log').read_text()[-3000:]}")
        return logs / f"A{workers}"

    yield reference
    for process in running.values():
        process.kill()
        process.wait(timeout=60)


def start_trainer(args: list[str], log_file: Path) -> subprocess.Popen:
    with open(log_file, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "acc_clip.train", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_until(condition, process: subprocess.Popen, log_file: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"trainer exited {process.returncode} before the test could stop it:\n"
                                 f"{log_file.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting on the trainer:\n{log_file.read_text()[-3000:]}")
        time.sleep(0.02)


def metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def newest_checkpoint(run_dir: Path) -> tuple[str, dict]:
    found = complete_checkpoints(str(run_dir / "checkpoints"))
    assert found, f"no complete checkpoint in {run_dir}"
    return os.path.basename(found[-1]), json.loads(Path(found[-1], MANIFEST).read_text())["progress"]


def has_checkpoint_at_or_after(run_dir: Path, global_step: int) -> bool:
    found = complete_checkpoints(str(run_dir / "checkpoints"))
    return bool(found) and int(os.path.basename(found[-1]).split("_")[1]) >= global_step


def read_samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / SAMPLES_FILE).read_text().splitlines()]


def assert_same_training(resumed: Path, reference: Path) -> float:
    """Same steps, same losses and learning rates, same samples per step; each epoch sees every row
    once. Returns the largest loss difference."""
    got, want = read_metrics(resumed), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(EPOCHS * STEPS_PER_EPOCH))  # each step once, none missing
    assert [r["step"] for r in want] == [r["step"] for r in got]
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want))
    assert worst <= LOSS_TOLERANCE, f"losses differ by up to {worst}"
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    assert [r["samples_seen"] for r in got] == [r["samples_seen"] for r in want]

    got_samples, want_samples = read_samples(resumed), read_samples(reference)
    assert [(s["step"], s["epoch"]) for s in got_samples] == [(s["step"], s["epoch"]) for s in want_samples]
    for epoch in range(EPOCHS):
        seen = Counter(i for s in got_samples if s["epoch"] == epoch for i in s["indices"])
        assert max(seen.values()) == 1, f"epoch {epoch}: samples seen twice: {[i for i, n in seen.items() if n > 1]}"
        assert set(seen) == set(range(ROWS)), f"epoch {epoch}: samples skipped: {set(range(ROWS)) - set(seen)}"
    assert [s["indices"] for s in got_samples] == [s["indices"] for s in want_samples]  # and in the same order
    return worst


@pytest.mark.parametrize("workers, kill", [(0, "between steps"), (2, "while saving")])
def test_sigterm_then_kill9_mid_epoch_resume_exactly(small_csv, tmp_path, reference_runs, workers, kill):
    """SIGTERM in epoch 0, then kill -9 in epoch 1 after a step checkpoint: either between steps
    (from outside, once the checkpoint is complete) or in the middle of writing the next checkpoint
    (the ACC_CLIP_TEST_KILL_BEFORE_COMMIT hook); each time `--resume latest` goes on."""
    args = run_args(small_csv, tmp_path, "B", workers)
    run_dir = tmp_path / "B"

    # 1. SIGTERM in epoch 0: the step finishes, a checkpoint is saved, the exit code says "preempted".
    log1 = tmp_path / "stop1.log"
    trainer = start_trainer(args, log1)
    wait_until(lambda: metric_rows(run_dir) >= 2, trainer, log1)
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=120) == PREEMPTED_EXIT_CODE, log1.read_text()[-3000:]
    name, progress = newest_checkpoint(run_dir)
    assert progress["epoch"] == 0 and 0 < progress["step_in_epoch"] < STEPS_PER_EPOCH, progress  # mid-epoch
    assert f"stopping on SIGTERM after step {progress['global_step']}" in log1.read_text()

    # 2. Resume, then kill -9 in epoch 1, after the step checkpoint of global step 12.
    log2 = tmp_path / "stop2.log"
    saved_before_kill = STEPS_PER_EPOCH + 2
    assert saved_before_kill % SAVE_EVERY == 0
    if kill == "between steps":
        trainer = start_trainer([*args, "--resume", "latest"], log2)
        wait_until(lambda: has_checkpoint_at_or_after(run_dir, saved_before_kill), trainer, log2)
        trainer.kill()
    else:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(KILL_BEFORE_COMMIT_ENV, str(saved_before_kill + SAVE_EVERY))
            trainer = start_trainer([*args, "--resume", "latest"], log2)
    assert trainer.wait(timeout=240) == -signal.SIGKILL, log2.read_text()[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / name}:" in log2.read_text()
    partial = run_dir / "checkpoints" / f"{TMP_PREFIX}step_{saved_before_kill + SAVE_EVERY:08d}"
    if kill == "while saving":  # state written, manifest not: the save at step 16 is incomplete
        assert (partial / "model.safetensors").is_file() and not (partial / MANIFEST).exists()
        assert newest_checkpoint(run_dir)[0] == f"step_{saved_before_kill:08d}"
    name, progress = newest_checkpoint(run_dir)
    assert progress["epoch"] == 1 and 0 < progress["step_in_epoch"] < STEPS_PER_EPOCH, progress  # mid-epoch

    # 3. Resume to the end: the same training as run A, step for step.
    result = run_trainer([*args, "--resume", "latest"])
    assert f"resumed from {run_dir / 'checkpoints' / name}:" in result.stdout
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]  # cleaned up
    worst = assert_same_training(run_dir, reference_runs(workers))
    print(f"\nworkers={workers}, kill -9 {kill}: max |loss(B) - loss(A)| over the resumed run = {worst:.3g}")

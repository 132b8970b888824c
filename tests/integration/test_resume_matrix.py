"""Resume with accumulation, from shards, with several processes, across a kill between the two
renames of a commit; the fp16 grad scaler's state; the warning when resume settings changed.

The matrix: `--accum-freq 2` x {CSV, shards} x {1 process, 2 processes under `accelerate launch
--config_file launch/cpu_2proc.yaml`}. In each cell a run is stopped mid-epoch with SIGTERM and
resumed with `--resume latest`; it must make exactly the per-step losses of the same run left alone
(max |difference| 0: the CPU, one thread per process), train on the same samples at every step and
process, and see each sample of an epoch exactly once (the opt-in record, the trainer's --log-samples).
Two cells go on after the SIGTERM:
- CSV, 1 process: the resume is killed between the two renames of the epoch-end commit that replaces
  step_6 (the "between_renames" fault point, acc_clip/runtime/faults.py); the next start must put
  the complete step_6 that was moved aside back and resume from it.
- shards, 1 process: the resume is killed with SIGKILL in epoch 1, after the step-9 checkpoint.
Each cell has one uninterrupted reference run, started in the background while the cell's stopped
and resumed runs go on. 48 rows, 6 steps of 8 samples per epoch (batch 4 x 2 micro-batches, or
2 x 2 micro-batches x 2 processes), 2 epochs, no loader workers; step checkpoints only where a
cell needs one (each costs a 55 MB write) besides those of SIGTERM and of the last epoch's end.

The CheckpointManager's side of these (the grad scaler's state through a checkpoint, the warning on
changed data settings, putting back a checkpoint moved aside) is tested in the test process, in
tests/unit/checkpoint/test_manager.py.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from acc_clip.checkpoint.folders import OLD_PREFIX, TMP_PREFIX
from acc_clip.io.sealed import MANIFEST
from acc_clip.prep.shards.convert import convert_csv_to_shards
from acc_clip.runtime.faults import kill_at
from acc_clip.runtime.run_dir import LOG_FILE
from acc_clip.runtime.signals import PREEMPTED_EXIT_CODE
from background_trainer import Trainer, metric_rows, newest_checkpoint, saved_at_or_after, wait_until
from helpers import assert_same_training, tiny_train_args, without_csv_separator

ROWS = 48
ACCUM = 2
STEPS_PER_EPOCH = 6
EPOCHS = 2
KILL_AFTER = STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2  # shards, 1 process: the step saved before the kill -9


@dataclass(frozen=True)
class Cell:
    data: str  # "csv" or "shards"
    processes: int

    def __str__(self) -> str:
        return f"{self.data}-{self.processes}proc"

    @property
    def batch(self) -> int:  # per process
        return ROWS // (STEPS_PER_EPOCH * ACCUM * self.processes)


CSV_1, SHARDS_1, CSV_2, SHARDS_2 = Cell("csv", 1), Cell("shards", 1), Cell("csv", 2), Cell("shards", 2)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # one thread per process: the same sums in every run


@pytest.fixture(scope="module")
def train_data(small_csv, tmp_path_factory) -> dict[str, str]:
    """The first 48 rows of the fixture CSV, and the same rows as 4 shards of 12 (one shard list per
    process and loader, each holding exactly its batches)."""
    root = tmp_path_factory.mktemp("matrix")
    lines = small_csv.read_text().splitlines(keepends=True)
    (root / "train48.csv").write_text("".join(lines[: ROWS + 1]))
    convert_csv_to_shards(
        str(root / "train48.csv"), str(root / "shards"), samples_per_shard=ROWS // 4, workers=1, progress=False
    )
    return {"csv": str(root / "train48.csv"), "shards": str(root / "shards" / "{00000..00003}.tar")}


def cell_args(cell: Cell, train_data: dict[str, str], logs: Path, name: str) -> list[str]:
    args = tiny_train_args(
        Path(train_data[cell.data]),
        logs,
        name,
        "--batch-size",
        str(cell.batch),
        "--accum-freq",
        str(ACCUM),
        "--epochs",
        str(EPOCHS),
        "--workers",
        "0",
        "--log-samples",
    )
    if cell == CSV_1:  # a step save at each epoch's end, then the epoch-end save replacing it
        args += ["--save-every-n-steps", str(STEPS_PER_EPOCH), "--save-frequency", "1"]
    if cell == SHARDS_1:
        args += ["--save-every-n-steps", str(KILL_AFTER)]
    return without_csv_separator(args) if cell.data == "shards" else args


def start(cell: Cell, args: list[str], log_file: Path, env: dict[str, str] | None = None) -> Trainer:
    return Trainer(args, log_file, processes=cell.processes, env=env)


def resume_lines(trainer: Trainer) -> list[str]:
    """What a start said about its checkpoints: restored, removed, resumed from."""
    return [
        line.split(" | ")[-1]
        for line in trainer.log_file.read_text().splitlines()
        if any(word in line for word in ("restored ", "removing ", "resumed from ", "--resume latest:"))
    ]


def same_training(resumed: Path, reference: Path) -> None:
    """Each epoch saw every row once; every process trained on the reference's samples at every step;
    every step once, with the reference's loss to the last bit, its learning rate and sample count."""
    assert_same_training(
        resumed, reference, rows=ROWS, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, loss_tolerance=0
    )


@pytest.mark.parametrize("cell", [CSV_1, SHARDS_1, CSV_2, SHARDS_2], ids=str)
def test_an_accumulated_run_stopped_mid_epoch_resumes_exactly(cell, train_data, tmp_path):
    args = cell_args(cell, train_data, tmp_path, "B")
    run_dir, checkpoints = tmp_path / "B", tmp_path / "B" / "checkpoints"
    started = [start(cell, cell_args(cell, train_data, tmp_path, "A"), tmp_path / "A.log")]  # reference
    try:
        # 1. SIGTERM in epoch 0 (to the launcher with 2 processes: torchrun passes it on to the ranks):
        # the step finishes on every process, a checkpoint is saved, the exit code says "preempted".
        started.append(start(cell, args, tmp_path / "B1.log"))
        wait_until(lambda: metric_rows(run_dir) >= 1, started[-1])
        started[-1].process.send_signal(signal.SIGTERM)
        code = started[-1].wait(timeout=120)
        if cell.processes == 1:
            assert code == PREEMPTED_EXIT_CODE, started[-1].tail()
        resume_from, progress = newest_checkpoint(run_dir)
        assert progress["epoch"] == 0 and 0 < progress["step_in_epoch"] < STEPS_PER_EPOCH, progress  # mid-epoch
        assert f"stopping on SIGTERM after step {progress['global_step']}" in (run_dir / LOG_FILE).read_text()
        if cell.processes == 2:
            assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in resume_from.iterdir()}

        if cell == CSV_1:
            # 2. Resume; the epoch-end save of step 6 replaces the step save of step 6 and is killed
            # after moving that one aside, before renaming itself into place.
            step6 = checkpoints / f"step_{STEPS_PER_EPOCH:08d}"
            started.append(
                start(
                    cell,
                    [*args, "--resume", "latest"],
                    tmp_path / "B2.log",
                    env=kill_at("between_renames", STEPS_PER_EPOCH),
                )
            )
            assert started[-1].wait() == -signal.SIGKILL, started[-1].tail()
            assert f"resumed from {resume_from}:" in started[-1].log_file.read_text(), resume_lines(started[-1])
            moved_aside = checkpoints / f"{OLD_PREFIX}{step6.name}"
            assert (moved_aside / MANIFEST).is_file() and not step6.exists(), sorted(os.listdir(checkpoints))
            assert (checkpoints / "epoch_1.pt").is_file()  # exported before the step save
            # The next start must put it back, complete, and go on from the end of epoch 0.
            resume_from, expected = step6, f"epoch 0, step {STEPS_PER_EPOCH} of the epoch"
        elif cell == SHARDS_1:
            # 2. Resume, then kill -9 in epoch 1 once the step-9 checkpoint is complete.
            started.append(start(cell, [*args, "--resume", "latest"], tmp_path / "B2.log"))
            wait_until(lambda: saved_at_or_after(run_dir, KILL_AFTER), started[-1])
            started[-1].process.kill()
            assert started[-1].wait() == -signal.SIGKILL, started[-1].tail()
            assert f"resumed from {resume_from}:" in started[-1].log_file.read_text(), resume_lines(started[-1])
            resume_from, progress = newest_checkpoint(run_dir)
            assert progress["epoch"] == 1 and 0 < progress["step_in_epoch"] < STEPS_PER_EPOCH, progress
            expected = f"epoch 1, step {progress['step_in_epoch']} of the epoch"
        else:
            expected = f"epoch 0, step {progress['step_in_epoch']} of the epoch"

        # 3. Resume to the end: the same training as the reference, step for step.
        started.append(start(cell, [*args, "--resume", "latest"], tmp_path / "B3.log"))
        assert started[-1].wait() == 0, started[-1].tail()
        assert f"resumed from {resume_from}: {expected}" in started[-1].log_file.read_text(), resume_lines(started[-1])
        assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(TMP_PREFIX)]  # cleaned up
        assert started[0].wait() == 0, started[0].tail()
        same_training(run_dir, tmp_path / "A")
    finally:
        for trainer in started:
            trainer.stop()

"""Elastic resume: a run of 2 processes x batch 8 stopped in the middle of an epoch and resumed on 1 process x 8,
on 4 processes x 4 and with another --workers trains every sample of that epoch exactly once (the samples of the
steps before the save, from the first run's --log-samples records, and those of the resumed run, together), and
the next epoch is a whole epoch of the new layout: for CSV rows and for shards. A resume whose data changed is
still refused."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from acc_clip.prep.shards.convert import convert_csv_to_shards
from background_trainer import launch_with, two_processes
from helpers import SMALL_CSV_ROWS, read_samples, run_trainer, tiny_train_args, without_csv_separator

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
SAVED_AT = 4  # steps of 2 x 8 before the save: 64 samples of the epoch's 160
EPOCHS = 2

# (processes, per-process batch, --workers) of the resumed runs
RESUMES = {"1x8": (1, 8, 2), "4x4": (4, 4, 1), "2x8-other-workers": (2, 8, 1)}


def launcher(processes: int) -> list[str] | None:
    return {1: None, 2: two_processes(), 4: launch_with("cpu_2proc.yaml", "--num_processes", "4")}[processes]


def train_args(data: Path, logs: Path, name: str, batch: int, workers: int) -> list[str]:
    args = tiny_train_args(data, logs, name, "--batch-size", str(batch), "--workers", str(workers))
    args += ["--epochs", str(EPOCHS), "--log-samples", "--save-every-n-steps", str(SAVED_AT)]
    return args if data.suffix == ".csv" else without_csv_separator(args)


def stopped_run(data: Path, logs: Path, workers: int) -> tuple[Path, list[dict]]:
    """A 2 x 8 run stopped after its save at step 4 of epoch 0: its checkpoint and its samples records."""
    run_trainer([*train_args(data, logs, "first", 8, workers), "--max-steps", str(SAVED_AT)], launcher=launcher(2))
    return logs / "first" / "checkpoints" / f"step_{SAVED_AT:08d}", read_samples(logs / "first")


def indices_by_epoch(records: list[dict]) -> dict[int, Counter]:
    counts: dict[int, Counter] = {}
    for record in records:
        counts.setdefault(record["epoch"], Counter()).update(record["indices"])
    return counts


def check_resumes(data: Path, tmp_path: Path, first_workers: int) -> None:
    checkpoint, before = stopped_run(data, tmp_path, first_workers)
    assert {record["step"] for record in before} == set(range(SAVED_AT))
    for name, (processes, batch, workers) in RESUMES.items():
        args = [*train_args(data, tmp_path, name, batch, workers), "--resume", str(checkpoint)]
        result = run_trainer(args, launcher=launcher(processes))
        if (processes, batch) != (2, 8) or data.suffix != ".csv":
            assert "the layout changed since the save" in result.stdout + result.stderr, name
        after = read_samples(tmp_path / name)
        epochs = indices_by_epoch(before + after)
        for epoch in range(EPOCHS):
            assert epochs[epoch] == Counter(range(SMALL_CSV_ROWS)), f"{name}: epoch {epoch} not every sample once"
        resumed_steps = {record["step"] for record in after if record["epoch"] == 0}
        remaining = (SMALL_CSV_ROWS - SAVED_AT * 16) // (processes * batch)
        assert resumed_steps == set(range(SAVED_AT, SAVED_AT + remaining)), name
        assert {len(record["indices"]) for record in after} == {batch}, name


def test_a_csv_run_resumes_exactly_once_on_other_processes_batches_and_workers(small_csv, tmp_path):
    check_resumes(small_csv, tmp_path, first_workers=0)


@pytest.fixture(scope="module")
def shards(small_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("elastic") / "set"
    convert_csv_to_shards(str(small_csv), str(out), samples_per_shard=20, workers=1, progress=False)
    return out


def test_a_shards_run_resumes_exactly_once_on_other_processes_batches_and_workers(shards, tmp_path):
    check_resumes(shards, tmp_path, first_workers=2)


def test_a_shards_resume_on_another_layout_and_another_epoch_length_is_refused(shards, tmp_path):
    checkpoint, _ = stopped_run(shards, tmp_path, workers=2)
    args = [*train_args(shards, tmp_path, "other", 8, 1), "--train-num-samples", "120", "--resume", str(checkpoint)]
    result = run_trainer(args, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert "order.samples 160 -> 120" in line and "--resume-changed-data" in line, line

"""A resume in the middle of an epoch continues that epoch's sample order, or is refused in one line naming what
changed: the data (another path, the same rows shuffled), and for resampled shards the processes and --workers
that each process's draws depend on. `--resume-changed-data` goes on with a warning. At an epoch's end a change
is only noted: nothing of the epoch remains. Before checkpoints recorded the order, each of these resumes trained
some samples twice and others never, silently. (Another layout of CSV rows or shards without resampling resumes
exactly: tests/integration/test_elastic_resume.py.)"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from acc_clip.prep.shards.convert import convert_csv_to_shards
from background_trainer import two_processes
from helpers import read_samples, run_trainer, tiny_train_args

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
STEPS_PER_EPOCH = 10  # 160 rows, batch 16


def stopped_mid_epoch(csv: Path, logs: Path, name: str, *extra: str, launcher=None) -> list[str]:
    """A run that saved at step 4 of epoch 0 and stopped there; returns its arguments (without --max-steps)."""
    args = tiny_train_args(csv, logs, name, "--save-every-n-steps", "4", "--log-samples", *extra)
    run_trainer([*args, "--max-steps", "4"], launcher=launcher)
    return args


def refusal(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(set(lines)) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def shards(small_csv, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards") / "set"
    convert_csv_to_shards(str(small_csv), str(out), samples_per_shard=20, workers=1, progress=False)
    return str(out)


def other_rows(train_csv: Path, out: Path) -> Path:
    """160 other rows of the fixture data: the same shape as small_csv (10 steps per epoch), other samples."""
    header, *rows = train_csv.read_text().splitlines(keepends=True)
    out.write_text(header + "".join(rows[160:320]))
    return out


def test_a_resume_with_the_same_rows_shuffled_or_other_rows_is_refused(small_csv, train_csv, tmp_path):
    args = stopped_mid_epoch(small_csv, tmp_path, "run")
    header, *rows = small_csv.read_text().splitlines(keepends=True)
    random.Random(0).shuffle(rows)
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text(header + "".join(rows))
    for other in (shuffled, other_rows(train_csv, tmp_path / "other.csv")):
        changed = [str(other) if a == str(small_csv) else a for a in args]
        line = refusal(run_trainer([*changed, "--resume", "latest"], check=False))
        assert "order.data.ends_sha256" in line and "the rest of epoch 0 would train some samples twice" in line, line
        assert "--resume-changed-data" in line


def test_the_same_data_at_another_path_resumes(small_csv, tmp_path):
    """The file's fingerprint, not its path, is its identity: moved, it resumes (exactly: the order is the same)."""
    args = stopped_mid_epoch(small_csv, tmp_path, "run")
    moved = tmp_path / "moved" / "small.csv"
    moved.parent.mkdir()
    shutil.copy(small_csv, moved)
    changed = [str(moved) if a == str(small_csv) else a for a in args]
    result = run_trainer([*changed, "--resume", "latest", "--max-steps", "6"])
    assert "since the save" not in result.stdout


def test_resume_changed_data_goes_on_with_a_warning(small_csv, train_csv, tmp_path):
    args = stopped_mid_epoch(small_csv, tmp_path, "run")
    other = other_rows(train_csv, tmp_path / "other.csv")
    changed = [str(other) if a == str(small_csv) else a for a in args]
    result = run_trainer([*changed, "--resume", "latest", "--resume-changed-data", "--max-steps", "6"])
    assert "(--resume-changed-data)" in result.stdout and "order.data.ends_sha256" in result.stdout


def test_a_csv_resume_on_another_process_split_of_the_same_global_batch_is_exact_and_allowed(small_csv, tmp_path):
    """2 x 8 and 1 x 16 read the same global micro-batches from a CSV: nothing to refuse."""
    args = stopped_mid_epoch(small_csv, tmp_path, "run", "--batch-size", "8", launcher=two_processes())
    resumed = [a if a != "8" else "16" for a in args]
    run_trainer([*resumed, "--resume", "latest", "--max-steps", "6"])


def test_a_resampled_shards_resume_with_other_workers_is_refused(shards, tmp_path):
    args = stopped_mid_epoch(Path(shards), tmp_path, "run", "--workers", "2", "--dataset-resampled")
    line = refusal(run_trainer([*args, "--workers", "1", "--resume", "latest"], check=False))
    assert "order.workers 2 -> 1" in line, line


def test_a_resampled_shards_resume_on_another_number_of_processes_is_refused(shards, tmp_path):
    args = stopped_mid_epoch(
        Path(shards), tmp_path, "run", "--batch-size", "8", "--dataset-resampled", launcher=two_processes()
    )
    resumed = [a if a != "8" else "16" for a in args]
    line = refusal(run_trainer([*resumed, "--resume", "latest"], check=False))
    assert "order.batch_size 8 -> 16" in line and "order.world_size 2 -> 1" in line, line


def test_at_an_epoch_end_a_change_is_only_noted(small_csv, train_csv, tmp_path):
    args = tiny_train_args(small_csv, tmp_path, "run", "--save-every-n-steps", str(STEPS_PER_EPOCH))
    run_trainer([*args, "--max-steps", str(STEPS_PER_EPOCH)])
    other = other_rows(train_csv, tmp_path / "other.csv")
    changed = [str(other) if a == str(small_csv) else a for a in args]
    result = run_trainer([*changed, "--resume", "latest"])
    assert "the next epochs follow the new settings" in result.stdout


def test_after_an_epochs_last_step_another_batch_size_goes_on_with_the_next_epoch(small_csv, tmp_path):
    """Saved after the last step of epoch 0 (no epoch save): the position is kept in samples, so at 8 per batch
    nothing of epoch 0 remains (it once counted that checkpoint as half of a 20-step epoch and trained its second
    half again), and epoch 1 is a whole epoch of 20 steps."""
    args = tiny_train_args(small_csv, tmp_path, "run", "--save-every-n-steps", str(STEPS_PER_EPOCH), "--log-samples")
    run_trainer([*args, "--max-steps", str(STEPS_PER_EPOCH)])
    run_trainer([*args, "--batch-size", "8", "--resume", "latest"])
    records = read_samples(tmp_path / "run")
    assert [r["step"] for r in records if r["epoch"] == 0] == list(range(STEPS_PER_EPOCH))
    assert [r["step"] for r in records if r["epoch"] == 1] == list(range(STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH))
    assert sorted(i for r in records if r["epoch"] == 1 for i in r["indices"]) == list(range(160))

"""Training from parquet files and `datasets` folders written by the real `datasets` library (image bytes
in a datasets Image column), from plain pyarrow parquet (raw bytes, paths): each trains and validates
(--val-data the same set); the datasets-written ones, one with several captions per image, stopped
mid-epoch by a kill -9 and resumed, train exactly as an uninterrupted run (per-step losses, samples of
each step, every sample once per epoch) and validate to the same figures."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from acc_clip.runtime.faults import kill_at
from helpers import assert_same_training, run_trainer, tiny_train_args, without_csv_separator

datasets = pytest.importorskip("datasets")

ROWS, BATCH, EPOCHS = 64, 16, 2
STEPS_PER_EPOCH = ROWS // BATCH
SAVE_EVERY, KILL_AT = 3, 6  # killed while saving step 6: resumed from step 3, in the middle of epoch 0

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # one thread: same reduction order in every run


@pytest.fixture(scope="module")
def images_and_captions(train_csv) -> list[tuple[str, list[str]]]:
    """The demo set's 64 images, each with its 5 captions."""
    by_image: dict[str, list[str]] = {}
    with open(train_csv, newline="") as file:
        for row in csv.DictReader(file):
            by_image.setdefault(row["filepath"], []).append(row["title"])
    return list(by_image.items())[:ROWS]


@pytest.fixture(scope="module")
def sets(images_and_captions, tmp_path_factory) -> dict[str, tuple[str, list[str]]]:
    """name -> (path, column flags)."""
    root = tmp_path_factory.mktemp("parquet")
    image_bytes = [Path(path).read_bytes() for path, _ in images_and_captions]
    several = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": data, "path": None} for data in image_bytes],
            "text": [captions for _, captions in images_and_captions],  # a list<string> column
        },
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))}),
    )
    several.to_parquet(str(root / "several.parquet"))
    one = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": data, "path": None} for data in image_bytes],
            "text": [captions[0] for _, captions in images_and_captions],
        },
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    one.save_to_disk(str(root / "saved"))
    pq.write_table(
        pa.table(
            {
                "jpg": pa.array(image_bytes, pa.binary()),
                "txt": [json.dumps(captions) for _, captions in images_and_captions],  # JSON-list text cells
            }
        ),
        root / "raw.parquet",
    )
    pq.write_table(
        pa.table({"filepath": [p for p, _ in images_and_captions], "title": [c[1] for _, c in images_and_captions]}),
        root / "paths.parquet",
    )
    hf = ["--csv-img-key", "image", "--csv-caption-key", "text"]
    return {
        "datasets to_parquet, several captions": (str(root / "several.parquet"), hf),
        "datasets save_to_disk": (str(root / "saved"), hf),
        "pyarrow raw bytes": (str(root / "raw.parquet"), ["--csv-img-key", "jpg", "--csv-caption-key", "txt"]),
        "pyarrow paths": (str(root / "paths.parquet"), []),
    }


def args_for(path: str, columns: list[str], logs: Path, name: str, *extra: str) -> list[str]:
    return without_csv_separator(
        tiny_train_args(Path(path), logs, name, "--val-data", path, "--log-samples", *columns, *extra)
    )


def results(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["pyarrow raw bytes", "pyarrow paths"])
def test_plain_parquet_trains_and_validates(sets, tmp_path, name):
    path, columns = sets[name]
    run_trainer(args_for(path, columns, tmp_path, "A", "--epochs", "1"))
    before, after = results(tmp_path / "A")  # validated before training and after the epoch
    assert after["num_samples"] == ROWS and after["num_bad"] == 0 and "image_to_text_R@1" in after
    assert after["val_loss"] != before["val_loss"]


@pytest.mark.parametrize("name", ["datasets to_parquet, several captions", "datasets save_to_disk"])
def test_datasets_files_train_resume_exactly_and_validate(sets, tmp_path, name):
    path, columns = sets[name]
    extra = ("--save-every-n-steps", str(SAVE_EVERY))
    run_trainer(args_for(path, columns, tmp_path, "A", *extra))
    stopped = args_for(path, columns, tmp_path, "B", *extra)
    killed = run_trainer(stopped, check=False, env=kill_at("before_commit", KILL_AT))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_trainer([*stopped, "--resume", "latest"])
    assert "resumed from" in resumed.stdout and "step_00000003" in resumed.stdout
    assert_same_training(
        tmp_path / "B", tmp_path / "A", rows=ROWS, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, loss_tolerance=0
    )
    validated = results(tmp_path / "A")
    assert [r["num_samples"] for r in validated] == [ROWS] * (EPOCHS + 1)  # before training, after each epoch
    assert results(tmp_path / "B") == validated

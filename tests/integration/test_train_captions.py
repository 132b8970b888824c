"""Training on shards whose .json holds several captions per image (--json-text-key, --json-text-key-probs):
the captions drawn reach the loss, and a run stopped mid-epoch and resumed trains on exactly the samples and
captions of the uninterrupted run (losses equal to the last bit on one CPU thread, which differ when the
captions do)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

from helpers import read_metrics, read_samples, run_trainer, tiny_train_args, without_csv_separator

BATCH = 8
IMAGES = 64  # the demo set's training images, one sample each
STEPS_PER_EPOCH = IMAGES // BATCH
EPOCHS = 2
LOSS_TOLERANCE = 1e-6

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # one thread: the same reduction order in every run


@pytest.fixture(scope="module")
def caption_shards(train_csv, tmp_path_factory) -> Path:
    """One sample per demo image, 4 shards of 16: the .jpg, and a .json with the image's first caption under
    "first" and all five under "all"."""
    by_image: dict[str, list[str]] = defaultdict(list)
    with open(train_csv, newline="") as file:
        for row in csv.DictReader(file):
            by_image[row["filepath"]].append(row["title"])
    out = tmp_path_factory.mktemp("captions")
    sizes = {}
    images = list(by_image.items())
    for shard in range(4):
        name = f"{shard:05d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for key, (path, captions) in enumerate(images[shard * 16 : (shard + 1) * 16], shard * 16):
                members = {
                    "jpg": Path(path).read_bytes(),
                    "json": json.dumps({"first": captions[0], "all": captions}).encode(),
                }
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key:09d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = 16
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


def caption_args(shards: Path, logs: Path, name: str, *extra: str) -> list[str]:
    return without_csv_separator(
        tiny_train_args(
            shards / "{00000..00003}.tar",
            logs,
            name,
            "--batch-size",
            str(BATCH),
            "--epochs",
            str(EPOCHS),
            "--workers",
            "2",
            "--log-samples",
            "--json-text-key",
            "first;all",
            *extra,
        )
    )


WEIGHTS = ("--json-text-key-probs", "1", "3")


@pytest.fixture(scope="module")
def reference_run(caption_shards, tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("reference")
    run_trainer(caption_args(caption_shards, logs, "A", *WEIGHTS))
    return logs / "A"


def test_a_resumed_run_trains_on_the_captions_of_the_uninterrupted_one(caption_shards, reference_run, tmp_path):
    args = caption_args(caption_shards, tmp_path, "B", *WEIGHTS, "--save-every-n-steps", "5")
    run_trainer(args + ["--max-steps", "5"])  # step 5 of 8: an odd count over 2 workers, then into epoch 1
    run_trainer(args + ["--resume", "latest"])
    got, want = read_metrics(tmp_path / "B"), read_metrics(reference_run)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(EPOCHS * STEPS_PER_EPOCH))
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want))
    assert worst <= LOSS_TOLERANCE, f"resumed losses differ from the uninterrupted run's by up to {worst}"
    assert [r["indices"] for r in read_samples(tmp_path / "B")] == [r["indices"] for r in read_samples(reference_run)]
    for epoch in range(EPOCHS):
        trained = [i for r in read_samples(reference_run) if r["epoch"] == epoch for i in r["indices"]]
        assert sorted(trained) == list(range(IMAGES))


def test_the_drawn_captions_reach_the_loss(caption_shards, reference_run, tmp_path):
    # The same samples in the same order with other key weights: only the captions differ, and so does the loss
    # (what makes the equal losses above a statement about the captions).
    run_trainer(caption_args(caption_shards, tmp_path, "C", "--json-text-key-probs", "3", "1", "--max-steps", "2"))
    other, reference = read_metrics(tmp_path / "C"), read_metrics(reference_run)
    assert [r["indices"] for r in read_samples(tmp_path / "C")] == [r["indices"] for r in read_samples(reference_run)][
        :2
    ]
    assert all(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(other, reference[:2]))

"""Reading a real open_clip out.log (acc_clip.reports.curves): open_clip's own trainer (`python -m
open_clip_train.main`, a subprocess) trains 2 short epochs, and its TensorBoard record is the reference.
Moved from tests/unit/test_curves.py (unit/ holds in-process tests only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from acc_clip.reports.curves import FORMAT_OPEN_CLIP, read_loss_curve

OPEN_CLIP_TIMEOUT_S = 90  # the run takes ~10 s on an idle core; this only stops a hung trainer


MODEL_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {},
}
NUM_IMAGES, BATCH_SIZE, EPOCHS = 64, 8, 2
BATCHES_PER_EPOCH = NUM_IMAGES // BATCH_SIZE


@pytest.fixture(scope="module")
def open_clip_run(tmp_path_factory) -> Path:
    """Train open_clip's own trainer for 2 short epochs on 64 tiny images; returns its run folder.

    TensorBoard logging is on so the test has open_clip's own record of (step, loss) to check against.
    """
    root = tmp_path_factory.mktemp("open_clip_run")
    model_dir = root / "tiny_model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps(MODEL_CONFIG))
    rows = ["filepath,title"]
    for i in range(NUM_IMAGES):
        image_path = root / f"image_{i}.jpg"
        Image.new("RGB", (32, 32), (i * 4 % 256, i * 7 % 256, i * 11 % 256)).save(image_path)
        rows.append(f"{image_path},a picture number {i}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")

    command = [
        sys.executable, "-m", "open_clip_train.main",
        "--train-data", str(root / "train.csv"), "--csv-separator", ",",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--model", f"local-dir:{model_dir}", "--pretrained", "",
        "--batch-size", str(BATCH_SIZE), "--epochs", str(EPOCHS), "--workers", "0",
        "--log-every-n-steps", "1", "--precision", "fp32", "--device", "cpu",
        "--lr", "1e-3", "--warmup", "2", "--save-frequency", "0",
        "--logs", str(root / "logs"), "--name", "run", "--report-to", "tensorboard",
    ]  # fmt: skip
    # One thread: open_clip_train leaves torch at all cores, whose spinning threads crawl under load.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=OPEN_CLIP_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "logs" / "run"


def tensorboard_losses(run: Path) -> dict[int, float]:
    """open_clip's own (step -> loss) record, written next to out.log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars("train/loss")}


def test_open_clip_out_log_gives_global_steps_and_the_current_step_loss(open_clip_run):
    expected = tensorboard_losses(open_clip_run)
    assert sorted(expected) == list(range(EPOCHS * BATCHES_PER_EPOCH))  # one logged line per step

    for given in (open_clip_run, open_clip_run / "out.log"):
        curve = read_loss_curve(given)
        assert curve.source_format == FORMAT_OPEN_CLIP
        assert curve.steps == list(range(EPOCHS * BATCHES_PER_EPOCH))
        # out.log prints 5 significant digits of the value TensorBoard stores in full.
        assert curve.losses == pytest.approx([expected[s] for s in curve.steps], rel=1e-4)


def test_open_clip_out_log_logged_every_third_step(open_clip_run, tmp_path):
    """Keep only the lines open_clip writes with --log-every-n-steps 3 (batch 1, 4, 7 and an epoch's last)."""
    kept = []
    batch_in_epoch = 0
    for line in (open_clip_run / "out.log").read_text().splitlines():
        if "Train Epoch:" not in line:
            kept.append(line)
            continue
        batch_in_epoch = batch_in_epoch % BATCHES_PER_EPOCH + 1
        if (batch_in_epoch - 1) % 3 == 0 or batch_in_epoch == BATCHES_PER_EPOCH:
            kept.append(line)
    sparse_log = tmp_path / "out.log"
    sparse_log.write_text("\n".join(kept) + "\n")

    expected = tensorboard_losses(open_clip_run)
    curve = read_loss_curve(sparse_log)
    assert curve.steps == [0, 3, 6, 7, 8, 11, 14, 15]
    assert curve.losses == pytest.approx([expected[s] for s in curve.steps], rel=1e-4)


def test_open_clip_out_log_repeated_epoch_after_resume_keeps_the_last(open_clip_run, tmp_path):
    lines = (open_clip_run / "out.log").read_text().splitlines()
    epoch_1 = [line for line in lines if "Train Epoch: 1 " in line]
    # The resumed run logged epoch 1 again with different losses: change " Loss: X (" to " Loss: 0.5 (".
    rerun = [line.split(" Loss: ")[0] + " Loss: 0.5 (0.5)" for line in epoch_1]
    resumed_log = tmp_path / "out.log"
    resumed_log.write_text("\n".join(lines + rerun) + "\n")

    curve = read_loss_curve(resumed_log)
    assert curve.steps == list(range(EPOCHS * BATCHES_PER_EPOCH))
    assert curve.losses[BATCHES_PER_EPOCH:] == [0.5] * BATCHES_PER_EPOCH
    assert 0.5 not in curve.losses[:BATCHES_PER_EPOCH]

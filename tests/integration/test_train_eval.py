"""Evaluation inside the training loop, the trackers, results.jsonl, and `acc-clip eval` of the
checkpoints the trainer writes."""

import json
import subprocess
import sys

import pytest

from acc_clip.runtime.run_dir import WANDB_ID_FILE
from conftest import TINY_RN, read_metrics, run_trainer, tiny_train_args


@pytest.fixture(scope="module")
def evaluated_run(train_csv, val_csv, demo_dataset, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    zeroshot = demo_dataset / "zeroshot"
    result = run_trainer(tiny_train_args(
        train_csv, logs, "ev", "--epochs", "2", "--max-steps", "24", "--val-data", str(val_csv),
        "--zeroshot-data", str(zeroshot), "--zeroshot-classnames", str(zeroshot / "classnames.txt"),
        "--zeroshot-templates", str(zeroshot / "templates.txt"), "--zeroshot-frequency", "1", "--report-to", "tensorboard",
        "--save-frequency", "1"))
    return logs / "ev", result


def test_results_jsonl_has_before_and_after_epoch_records(evaluated_run):
    run_dir, result = evaluated_run
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 0), (1, 20)]
    for record in records:
        assert record["num_samples"] == 21 * 5 and 0 <= record["image_to_text_R@1"] <= 1
        assert "coco_image_to_text_R@1" in record and "zeroshot_top1" in record
    assert "Eval before training" in result.stdout and "Eval after epoch 0" in result.stdout


def test_tensorboard_events_hold_train_and_val_scalars(evaluated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = evaluated_run
    event_dirs = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    assert event_dirs, "no TensorBoard event file"
    scalars = {}
    for directory in event_dirs:
        events = EventAccumulator(str(directory))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    assert [step for step, _ in scalars["train/loss"]] == sorted(losses)
    assert all(abs(value - losses[step]) < 1e-5 for step, value in scalars["train/loss"])
    assert [step for step, _ in scalars["val/image_to_text_R@1"]] == [0, 20]


def test_wandb_offline_run_folder(train_csv, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (pip install -e '.[wandb]'); not installed here")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: wandb writes the run folder locally
    args = tiny_train_args(train_csv, tmp_path, "wb", "--epochs", "1", "--report-to", "wandb",
                           "--save-every-n-steps", "2")
    run_trainer([*args, "--max-steps", "2"])
    run_trainer([*args, "--max-steps", "3", "--resume", "latest"])
    # Both starts wrote under the one id of the run folder (offline-run-<time>-<id>): one wandb run, continued.
    run_id = (tmp_path / "wb" / WANDB_ID_FILE).read_text().strip()
    runs = list((tmp_path / "wb").rglob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs), runs


def test_acc_clip_eval_reads_step_checkpoints_and_epoch_files(evaluated_run, val_csv):
    run_dir, _ = evaluated_run
    outputs = []
    for checkpoint in (run_dir / "checkpoints" / "step_00000020", run_dir / "checkpoints" / "epoch_1.pt"):
        result = subprocess.run([sys.executable, "-m", "acc_clip.cli", "eval", "--model", TINY_RN, "--checkpoint",
                                 str(checkpoint), "--val-data", str(val_csv), "--csv-separator", ",",
                                 "--device", "cpu", "--workers", "0"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(json.loads(result.stdout.strip().splitlines()[0]))
    # Same weights in both files, and the same numbers as the trainer's own evaluation after epoch 1.
    trainer = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
    for key in ("image_to_text_R@1", "text_to_image_R@5", "coco_image_to_text_R@1"):
        assert outputs[0][key] == outputs[1][key] == pytest.approx(trainer[key])
    assert outputs[0]["val_loss"] == pytest.approx(trainer["val_loss"], rel=1e-5)


def test_unknown_tracker_is_an_error(train_csv, tmp_path, train_in_process):
    status, errors = train_in_process(tiny_train_args(train_csv, tmp_path, "x", "--report-to", "tensorbord"))
    assert status == 2 and len(errors) == 1 and "unknown tracker 'tensorbord'" in errors[0], errors


def test_an_imagenet_v2_folder_without_its_layout_stops_the_run_at_start(train_csv, tmp_path, train_in_process):
    (tmp_path / "v2" / "n01440764").mkdir(parents=True)  # ImageNet val's layout, not ImageNetV2's
    status, errors = train_in_process(tiny_train_args(train_csv, tmp_path, "x", "--imagenet-v2", str(tmp_path / "v2")))
    assert status == 2 and len(errors) == 1, errors
    assert f"--imagenet-v2 {tmp_path / 'v2'}: not ImageNetV2's layout (sub-folders 0..999" in errors[0]
    assert not (tmp_path / "x" / "metrics.jsonl").exists()  # refused before the first step

"""Evaluation inside the training loop, the trackers, results.jsonl, and `acc-clip eval` of the
checkpoints the trainer writes."""

import json

import pytest

from acc_clip.errors import DataError, UsageError
from acc_clip.runtime.run_dir import WANDB_ID_FILE
from helpers import TINY_RN, acc_clip_eval, read_metrics, run_trainer, tiny_train_args, zeroshot_flags


@pytest.fixture(scope="module")
def evaluated_run(train_csv, val_csv, demo_dataset, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    result = run_trainer(
        tiny_train_args(
            train_csv,
            logs,
            "ev",
            "--epochs",
            "2",
            "--max-steps",
            "24",
            "--val-data",
            str(val_csv),
            *zeroshot_flags(demo_dataset),
            "--report-to",
            "tensorboard",
            "--save-frequency",
            "1",
        )
    )
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
    args = tiny_train_args(
        train_csv, tmp_path, "wb", "--epochs", "1", "--report-to", "wandb", "--save-every-n-steps", "2"
    )
    run_trainer([*args, "--max-steps", "2"])
    run_trainer([*args, "--max-steps", "3", "--resume", "latest"])
    # Both starts wrote under the one id of the run folder (offline-run-<time>-<id>): one wandb run, continued.
    run_id = (tmp_path / "wb" / WANDB_ID_FILE).read_text().strip()
    runs = list((tmp_path / "wb").rglob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs), runs


def test_acc_clip_eval_reads_step_checkpoints_and_epoch_files(evaluated_run, val_csv):
    run_dir, _ = evaluated_run
    # --precision fp32: the training run's (eval's default is amp)
    outputs = [
        acc_clip_eval(
            "--model",
            TINY_RN,
            "--checkpoint",
            str(checkpoint),
            "--val-data",
            str(val_csv),
            "--csv-separator",
            ",",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--precision",
            "fp32",
        )
        for checkpoint in (run_dir / "checkpoints" / "step_00000020", run_dir / "checkpoints" / "epoch_1.pt")
    ]
    # Same weights in both files, and the same numbers as the trainer's own evaluation after epoch 1.
    trainer = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
    for key in ("image_to_text_R@1", "text_to_image_R@5", "coco_image_to_text_R@1"):
        assert outputs[0][key] == outputs[1][key] == pytest.approx(trainer[key])
    assert outputs[0]["val_loss"] == pytest.approx(trainer["val_loss"], rel=1e-5)


# Bit-equal numbers need the same summation order: one compute thread in the trainer and in `acc-clip eval`
# (measured: an eval on 2 threads gave the 1-thread val_loss 4.671459674835205 as 4.671460151672363).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MODEL_OPTIONS = ["--force-quick-gelu", "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.25", "0.25", "0.25"]
RETRIEVAL = {
    f"{prefix}{direction}_{metric}"
    for direction in ("image_to_text", "text_to_image")
    for prefix, metrics in (("", ("mean_rank", "median_rank", "R@1", "R@5", "R@10")), ("coco_", ("R@1", "R@5", "R@10")))
    for metric in metrics
}


@pytest.fixture(scope="module")
def run_with_model_options(small_csv, val_csv, tmp_path_factory):
    """One epoch (10 steps) of tiny-rn with QuickGELU and another normalisation than its config's, evaluated
    on the validation set at the epoch's end, which saves epoch_1.pt and the step checkpoint of the same
    weights. One compute thread, as in the evaluations below."""
    logs = tmp_path_factory.mktemp("logs")
    run_trainer(
        tiny_train_args(
            small_csv,
            logs,
            "opts",
            "--epochs",
            "1",
            "--val-data",
            str(val_csv),
            "--save-frequency",
            "1",
            *MODEL_OPTIONS,
        ),
        env=ONE_THREAD,
    )
    return logs / "opts"


def test_acc_clip_eval_of_a_step_checkpoint_builds_the_model_its_manifest_records(run_with_model_options, val_csv):
    """A step folder brings its model name and model options (--force-quick-gelu, --image-mean, --image-std):
    `acc-clip eval` with neither --model nor those flags gives the trainer's own numbers for those weights, to
    the last bit (the same model, preprocessing, batches and fp32 arithmetic on the CPU). The same weights
    built as the plain model (the epoch file, which records no options, with --model alone) give other
    numbers; with the run's flags given, the epoch file gives the trainer's numbers again. (Exactly equal:
    one compute thread on both sides, see ONE_THREAD.)"""
    run_dir = run_with_model_options
    trainer = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
    assert (trainer["epoch"], trainer["step"]) == (1, 10)
    data = [
        "--val-data",
        str(val_csv),
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--precision",
        "fp32",
    ]  # the run's batch (the loss is averaged per batch) and precision

    recorded = acc_clip_eval("--checkpoint", str(run_dir / "checkpoints" / "step_00000010"), *data, env=ONE_THREAD)
    metrics = set(recorded) - {"eval"}
    assert RETRIEVAL | {"val_loss", "num_samples"} <= metrics <= set(trainer), (sorted(recorded), sorted(trainer))
    assert {key: recorded[key] for key in metrics} == {key: trainer[key] for key in metrics}

    epoch_file = str(run_dir / "checkpoints" / "epoch_1.pt")
    plain = acc_clip_eval("--checkpoint", epoch_file, "--model", TINY_RN, *data, env=ONE_THREAD)
    assert plain["val_loss"] != trainer["val_loss"], "the model options made no difference: the test shows nothing"
    assert (
        acc_clip_eval("--checkpoint", epoch_file, "--model", TINY_RN, *MODEL_OPTIONS, *data, env=ONE_THREAD)["val_loss"]
        == trainer["val_loss"]
    )


def test_unknown_tracker_is_an_error(train_csv, tmp_path, train_in_process):
    status, errors = train_in_process(tiny_train_args(train_csv, tmp_path, "x", "--report-to", "tensorbord"))
    assert status == UsageError.exit_status and len(errors) == 1 and "unknown tracker 'tensorbord'" in errors[0], errors


def test_an_imagenet_v2_folder_without_its_layout_stops_the_run_at_start(train_csv, tmp_path, train_in_process):
    (tmp_path / "v2" / "n01440764").mkdir(parents=True)  # ImageNet val's layout, not ImageNetV2's
    status, errors = train_in_process(tiny_train_args(train_csv, tmp_path, "x", "--imagenet-v2", str(tmp_path / "v2")))
    assert status == DataError.exit_status and len(errors) == 1, errors
    assert f"--imagenet-v2 {tmp_path / 'v2'}: not ImageNetV2's layout (sub-folders 0..999" in errors[0]
    assert not (tmp_path / "x" / "metrics.jsonl").exists()  # refused before the first step

"""The training loop (acc_clip/train/loop.py), run in-process on synthetic batches: how many optimizer
steps it makes under --accum-freq and the learning rate of each; the trackers it starts (a stand-in
Accelerator, since wandb is an optional extra that may be missing)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import open_clip
import pytest

from acc_clip.model.flops import count_train_flops
from acc_clip.runtime.run_dir import WANDB_ID_FILE
from acc_clip.train.config import parse_train_config as parse_config
from acc_clip.train.loop import train
from acc_clip.train.metrics import start_trackers, wandb_init_kwargs
from helpers import TINY_VIT, open_clip_cosine_lr, read_metrics

MICRO_BATCHES_PER_EPOCH = 10  # --train-num-samples 40 at --batch-size 4, one process


@pytest.mark.parametrize("accum_freq", [2, 4])
def test_steps_and_learning_rate_under_accumulation(in_process, tmp_path, accum_freq):
    """10 micro-batches per epoch make 10 // accum_freq optimizer steps (5 or 2; 4 leaves 2 unused),
    so 3 epochs make 15 or 6 steps, and the cosine runs over those steps, not over micro-batches:
    the lr at warm-up end, mid-way and the last step is open_clip_train's formula for that total."""
    epochs, warmup, lr = 3, 2, 1e-3
    config, _ = parse_config(
        [
            "--dataset-type",
            "synthetic",
            "--train-num-samples",
            str(4 * MICRO_BATCHES_PER_EPOCH),
            "--batch-size",
            "4",
            "--accum-freq",
            str(accum_freq),
            "--epochs",
            str(epochs),
            "--warmup",
            str(warmup),
            "--lr",
            str(lr),
            "--model",
            TINY_VIT,
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--log-every-n-steps",
            "1",
            "--save-frequency",
            "0",
            "--logs",
            str(tmp_path),
            "--name",
            "run",
        ]
    )
    assert train(config) == 0
    total = epochs * (MICRO_BATCHES_PER_EPOCH // accum_freq)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(total))
    assert [r["samples_seen"] for r in records] == [4 * accum_freq * (s + 1) for s in range(total)]
    lrs = [r["lr"] for r in records]
    mid = warmup + (total - warmup) // 2
    for step in (warmup - 1, warmup, mid, total - 1):  # last warm-up step, warm-up end, mid-way, last
        assert lrs[step] == pytest.approx(open_clip_cosine_lr(step, lr, warmup, total), rel=1e-12, abs=0), step
    assert lrs == pytest.approx([open_clip_cosine_lr(s, lr, warmup, total) for s in range(total)], rel=1e-12, abs=0)


def wandb_config(tmp_path, *extra: str):
    config, _ = parse_config(
        [
            "--train-data",
            "x.csv",
            "--report-to",
            "wandb",
            "--name",
            "run",
            "--logs",
            str(tmp_path),
            "--wandb-notes",
            "note",
            *extra,
        ]
    )
    return config


def test_wandb_continues_the_run_folders_wandb_run_on_resume(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    first = wandb_init_kwargs(wandb_config(tmp_path).logging, run_dir)
    resumed = wandb_init_kwargs(wandb_config(tmp_path, "--resume", "latest").logging, run_dir)
    assert first == resumed == {"name": "run", "notes": "note", "dir": run_dir, "id": first["id"], "resume": "allow"}
    os.makedirs(tmp_path / "other")
    assert wandb_init_kwargs(wandb_config(tmp_path).logging, str(tmp_path / "other"))["id"] != first["id"]


class RecordingAccelerator:
    """What start_trackers asks of the Accelerator: its project configuration and init_trackers."""

    def __init__(self, is_main_process: bool):
        self.is_main_process = is_main_process
        self.project_configuration = SimpleNamespace(project_dir=None, logging_dir=None)
        self.calls = []

    def init_trackers(self, project_name, config=None, init_kwargs=None):
        self.calls.append((project_name, init_kwargs))


@pytest.mark.parametrize(
    "report_to, is_main_process, id_file",
    [("wandb", True, True), ("all", True, True), ("wandb", False, False), ("tensorboard", True, False)],
)
def test_start_trackers_hands_wandb_its_id_on_the_main_process_only(tmp_path, report_to, is_main_process, id_file):
    accelerator = RecordingAccelerator(is_main_process)
    config = wandb_config(tmp_path, "--report-to", report_to)
    start_trackers(accelerator, config.logging, str(tmp_path), config.flat())
    [(project, init_kwargs)] = accelerator.calls
    assert project == "open-clip"
    assert (tmp_path / WANDB_ID_FILE).exists() == id_file
    if id_file:
        assert init_kwargs["wandb"]["id"] == (tmp_path / WANDB_ID_FILE).read_text().strip()
        assert init_kwargs["wandb"]["resume"] == "allow"
    else:
        assert "wandb" not in init_kwargs


def test_each_record_holds_the_models_flops_and_mfu_against_peak_tflops(in_process, tmp_path):
    """The loop counts the run's model (tiny ViT: 32 px images, 32 tokens) and turns each step's time into
    TFLOP/s per device and MFU against --peak-tflops."""
    config, _ = parse_config(
        [
            *("--dataset-type", "synthetic", "--train-num-samples", "16", "--batch-size", "4", "--max-steps", "3"),
            *("--model", TINY_VIT, "--device", "cpu", "--precision", "fp32", "--workers", "0"),
            *("--log-every-n-steps", "1", "--save-frequency", "0", "--logs", str(tmp_path), "--name", "run"),
            *("--peak-tflops", "0.5"),
        ]
    )
    assert train(config) == 0
    expected = count_train_flops(open_clip.create_model(TINY_VIT), image_size=32, context_length=32).total
    records = read_metrics(tmp_path / "run")
    assert len(records) == 3
    for record in records:
        assert record["flops_per_sample"] == pytest.approx(expected, rel=1e-9)
        assert record["tflops_per_device"] == pytest.approx(expected * 4 / record["batch_time"] / 1e12)
        assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 0.5)
        assert record["host_resident_gib"] > 0


def test_a_model_the_flop_counter_cannot_run_trains_without_the_figures(in_process, tmp_path, monkeypatch):
    """The count is telemetry: a model that fails on the meta device (say a Hugging Face text tower) is said in
    one warning, and the run trains and records everything else."""

    def cannot_count(*args, **kwargs):
        raise RuntimeError("cannot count FLOPs of this model on the meta device: aten::foo")

    monkeypatch.setattr("acc_clip.train.loop.count_train_flops", cannot_count)
    config, _ = parse_config(
        [
            *("--dataset-type", "synthetic", "--train-num-samples", "8", "--batch-size", "4", "--max-steps", "1"),
            *("--model", TINY_VIT, "--device", "cpu", "--precision", "fp32", "--workers", "0"),
            *("--save-frequency", "0", "--logs", str(tmp_path), "--name", "run"),
        ]
    )
    assert train(config) == 0
    [record] = read_metrics(tmp_path / "run")
    assert "loss" in record and "flops_per_sample" not in record and "mfu" not in record
    log = (tmp_path / "run" / "out.log").read_text()
    assert "no FLOP count, so no TFLOP/s or MFU in the metrics: cannot count FLOPs" in log

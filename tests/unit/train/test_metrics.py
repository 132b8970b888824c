"""What a run reports per step (acc_clip/train/metrics.py): the telemetry fields, their cadence in
metrics.jsonl, the trackers and the log line, the loss average in parentheses and open_clip's meaning of
"Logit Scale"."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from acc_clip.train.metrics import LossAverage, MetricsLogger, StepRecord, Throughput


class RecordingAccelerator:
    """Accelerate's tracker interface as the logger uses it (trackers, log): records what it is given."""

    def __init__(self):
        self.trackers = ["recording"]
        self.logged: list[tuple[int, dict]] = []

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))


def record(step: int, loss: float = 2.0, batch_time: float = 0.5, data_time: float = 0.1) -> StepRecord:
    return StepRecord(
        step=step,
        epoch=0,
        step_in_epoch=step + 1,
        losses={"loss": torch.tensor(loss)},
        logit_scale=torch.tensor(math.log(1 / 0.07)),
        lr=1e-3,
        data_time=data_time,
        batch_time=batch_time,
        samples_seen=(step + 1) * 64,
        memory={"host_resident_gib": 1.5},
    )


def logger(tmp_path, **kwargs) -> MetricsLogger:
    defaults = dict(
        run_dir=str(tmp_path),
        log_every_n_steps=4,
        steps_per_epoch=10,
        global_batch_size=64,
        samples_per_epoch=640,
        world_size=2,
    )
    return MetricsLogger(**{**defaults, **kwargs})


def rows(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_tflops_and_mfu_follow_from_the_flop_count_the_step_time_and_the_peak(tmp_path):
    metrics = logger(tmp_path, throughput=Throughput(flops_per_sample=3e9, peak_tflops=0.25))
    metrics.record(record(0, batch_time=0.5))
    row = rows(tmp_path)[0]
    # 32 samples per device (64 over 2 processes) x 3 GFLOP in 0.5 s: 0.192 TFLOP/s, 76.8% of 0.25
    assert row["flops_per_sample"] == 3e9
    assert row["tflops_per_device"] == pytest.approx(32 * 3e9 / 0.5 / 1e12)
    assert row["mfu"] == pytest.approx(row["tflops_per_device"] / 0.25)
    assert row["data_share"] == pytest.approx(0.2) and row["host_resident_gib"] == 1.5


def test_without_a_known_peak_there_is_no_mfu(tmp_path):
    metrics = logger(tmp_path, throughput=Throughput(flops_per_sample=3e9, peak_tflops=None))
    metrics.record(record(0))
    assert "tflops_per_device" in rows(tmp_path)[0] and "mfu" not in rows(tmp_path)[0]


def test_logit_scale_is_open_clips_exponentiated_factor(tmp_path, caplog):
    metrics = logger(tmp_path)
    with caplog.at_level(logging.INFO):
        metrics.record(record(0))
    assert rows(tmp_path)[0]["logit_scale"] == pytest.approx(1 / 0.07)
    assert "Logit Scale: 14.286 " in caplog.text


def test_every_step_goes_to_metrics_jsonl_and_every_nth_to_the_trackers(tmp_path, caplog):
    accelerator = RecordingAccelerator()
    metrics = logger(tmp_path, accelerator=accelerator, metric_every_n_steps=3)
    metrics.start_epoch(0, 0)
    with caplog.at_level(logging.INFO):
        for step in range(10):
            metrics.record(record(step))
    metrics.end_epoch()
    assert [r["step"] for r in rows(tmp_path)] == list(range(10))
    # steps 1, 4, 7 of the epoch (every 3rd), the log lines' steps 1, 5, 9 and the epoch's last step 10
    assert [step for step, _ in accelerator.logged] == [0, 3, 4, 6, 8, 9]
    assert {"train/mfu", "train/data_share", "train/host_resident_gib", "train/logit_scale"} - set(
        accelerator.logged[0][1]
    ) == {"train/mfu"}  # no flop count given: no mfu
    assert caplog.text.count("Train Epoch:") == 4


def test_the_loss_average_is_a_moving_average_over_a_horizon_of_samples():
    average = LossAverage(horizon_samples=1000)
    average.update(4.0, 64)
    assert average.value == 4.0  # seeded by the first loss
    average.update(2.0, 64)
    assert average.value == pytest.approx(4.0 + (1 - math.exp(-64 / 1000)) * (2.0 - 4.0))
    average.start_epoch()
    average.update(2.0, 64)
    assert average.value < 4.0 - (1 - math.exp(-64 / 1000)) * 2.0  # kept across epochs


def test_a_horizon_of_zero_is_the_mean_of_the_epoch():
    average = LossAverage(horizon_samples=0)
    for loss in (4.0, 2.0, 3.0):
        average.update(loss, 64)
    assert average.value == pytest.approx(3.0)
    average.start_epoch()
    average.update(1.0, 64)
    assert average.value == 1.0

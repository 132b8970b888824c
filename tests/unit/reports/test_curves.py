"""Reading loss curves (acc_clip.reports.curves): acc_clip metrics.jsonl, open_clip out.log, vendor logs, plain
floats. A real open_clip run's out.log: tests/integration/test_open_clip_out_log.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acc_clip.errors import AccClipError
from acc_clip.reports.curves import (
    FORMAT_METRICS,
    FORMAT_PLAIN,
    FORMAT_VENDOR,
    ema_smooth,
    read_loss_curve,
    read_metrics,
)


def train_record(step: int, loss: float, **extra) -> dict:
    record = {
        "step": step,
        "epoch": 0,
        "loss": loss,
        "lr": 1e-3,
        "logit_scale": 14.3,
        "samples_per_second": 100.0,
        "data_time": 0.01,
        "batch_time": 0.1,
        "samples_seen": 8 * (step + 1),
    }
    record.update(extra)
    return record


def write_jsonl(path: Path, records: list[dict], trailing: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + trailing)
    return path


# ---------------------------------------------------------------- metrics.jsonl


def test_metrics_jsonl_last_record_of_a_resumed_step_wins_and_eval_is_dropped(tmp_path):
    records = [
        train_record(0, 4.0),
        train_record(1, 3.9),
        train_record(2, 3.8),  # the run crashed after logging step 2 ...
        {"kind": "eval", "step": 2, "epoch": 0, "loss": 9.9},
        train_record(2, 3.7, kind="train"),  # ... and the resumed run logged step 2 again
        train_record(3, 3.5),
    ]
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", records)

    for given in (run, run / "metrics.jsonl"):
        curve = read_loss_curve(given)
        assert curve.source_format == FORMAT_METRICS
        assert curve.steps == [0, 1, 2, 3]
        assert curve.losses == [4.0, 3.9, 3.7, 3.5]
    assert [r["loss"] for r in read_metrics(run)] == [4.0, 3.9, 3.7, 3.5]


def test_metrics_jsonl_steps_come_back_ascending_whatever_the_file_order(tmp_path):
    path = write_jsonl(tmp_path / "metrics.jsonl", [train_record(5, 2.0), train_record(1, 3.0)])
    curve = read_loss_curve(path)
    assert (curve.steps, curve.losses) == ([1, 5], [3.0, 2.0])


def test_metrics_jsonl_torn_final_line_is_skipped(tmp_path):
    path = write_jsonl(tmp_path / "metrics.jsonl", [train_record(0, 4.0)], trailing='{"step": 1, "lo')
    assert read_loss_curve(path).steps == [0]


def test_metrics_jsonl_broken_line_in_the_middle_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(train_record(0, 4.0)) + '\n{"step": 1, "lo\n' + json.dumps(train_record(2, 3.0)) + "\n")
    with pytest.raises(AccClipError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_loss_curve(path)


def test_metrics_jsonl_record_without_loss_is_an_error_naming_the_key(tmp_path):
    record = train_record(0, 4.0)
    del record["loss"]
    path = write_jsonl(tmp_path / "metrics.jsonl", [record])
    with pytest.raises(AccClipError, match=r"metrics\.jsonl:1: .*'loss'"):
        read_loss_curve(path)


def test_metrics_jsonl_with_only_eval_records_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "metrics.jsonl", [{"kind": "eval", "step": 0, "loss": 1.0}])
    with pytest.raises(AccClipError, match="no train records"):
        read_loss_curve(path)


# ---------------------------------------------------------------- open_clip out.log
# (read from a real open_clip run: tests/integration/test_open_clip_out_log.py)


def test_open_clip_out_log_with_a_later_epoch_but_no_completed_one_is_an_error(tmp_path):
    log = tmp_path / "out.log"
    log.write_text(
        "2026-11-26,12:00:00 | INFO | Train Epoch: 3 [ 8/64 (12%)] Data (t): 0.1 Batch (t): 0.4, 20.0/s, "
        "20.0/s/gpu LR: 0.000050 Logit Scale: 14.286 Contrastive_loss: 4.1589 (4.1589) Loss: 4.1589 (4.1589)\n"
    )
    with pytest.raises(AccClipError, match="no completed epoch"):
        read_loss_curve(log)


# ---------------------------------------------------------------- vendor and plain logs


def test_vendor_log_with_per_epoch_iterations_is_compared_by_line_order(tmp_path):
    log = tmp_path / "sdaa.log"
    log.write_text(
        "INFO starting\n"
        "TCAPPDLL 2025-01-01 10:00:00.1 - Epoch: 0 Iteration: 0 rank : 0 train.loss : 5.5 train.ips : 10.0 imgs/s\n"
        "TCAPPDLL 2025-01-01 10:00:00.2 - Epoch: 0 Iteration: 1 rank : 0 train.loss_avg : 9.0\n"
        "TCAPPDLL 2025-01-01 10:00:00.3 - Epoch: 0 Iteration: 1 rank : 0 train.loss : 5.25 train.ips : 10.0 imgs/s\n"
        "TCAPPDLL 2025-01-01 10:00:00.4 - Epoch: 1 Iteration: 0 rank : 0 train.loss : 4.75e0 train.ips : 10.0 imgs/s\n"
    )
    curve = read_loss_curve(log)
    assert curve.source_format == FORMAT_VENDOR
    assert curve.steps is None
    assert curve.losses == [5.5, 5.25, 4.75]


def test_vendor_log_with_global_iterations_or_steps_keeps_them(tmp_path):
    by_iteration = tmp_path / "iteration.log"
    by_iteration.write_text("".join(f"TCAPPDLL t - Epoch: 0 Iteration: {i} train.loss : {i}.5\n" for i in (10, 20, 30)))
    assert read_loss_curve(by_iteration).steps == [10, 20, 30]

    by_step = tmp_path / "step.log"
    by_step.write_text(
        "TCAPPDLL step : 4 train.loss : 2.0\nTCAPPDLL step : 2 train.loss:3.0\nstep: 4 train.loss: 1.0\n"
    )
    curve = read_loss_curve(by_step)
    assert (curve.steps, curve.losses) == ([2, 4], [3.0, 1.0])


def test_plain_float_file(tmp_path):
    path = tmp_path / "loss.txt"
    path.write_text("4.0\n3.5\n\n3.25\n")
    curve = read_loss_curve(path)
    assert (curve.steps, curve.losses, curve.source_format) == (None, [4.0, 3.5, 3.25], FORMAT_PLAIN)


@pytest.mark.parametrize("content", ["", "\n  \n", "hello world\nloss is low\n"])
def test_unrecognised_or_empty_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "mystery.log"
    path.write_text(content)
    with pytest.raises(AccClipError, match=r"mystery\.log.*expected"):
        read_loss_curve(path)


def test_run_folder_without_a_log_is_an_error_naming_it(tmp_path):
    with pytest.raises(AccClipError, match=str(tmp_path)):
        read_loss_curve(tmp_path)
    with pytest.raises(AccClipError, match="no such file"):
        read_loss_curve(tmp_path / "missing.log")


def test_ema_smooth_follows_the_recurrence():
    assert ema_smooth([1.0, 2.0, 4.0], 0.5) == [1.0, 1.5, 2.75]
    assert ema_smooth([1.0, 2.0], 0.0) == [1.0, 2.0]  # no smoothing
    assert ema_smooth([], 0.9) == []
    with pytest.raises(AccClipError, match=r"--ema 1.0"):
        ema_smooth([1.0], 1.0)

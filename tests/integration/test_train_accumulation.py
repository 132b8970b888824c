"""The trainer as a user runs it (`python -m acc_clip.train` in a subprocess) counts optimizer steps, not
micro-batches, under --accum-freq. Moved from tests/unit/test_step.py (unit/ holds in-process tests only);
the accumulation's exactness itself is tests/unit/train/test_step.py."""

from __future__ import annotations

import pytest

from helpers import TINY_VIT, read_metrics, run_trainer, tiny_train_args


def test_trainer_counts_optimizer_steps_under_accumulation(train_csv, tmp_path):
    """Three optimizer steps of 2 micro-batches of 16: three records, 32 samples each, and the
    learning rate of optimizer steps 0, 1, 2 of the warm-up (lr * (step + 1) / warmup)."""
    run_trainer(
        tiny_train_args(
            train_csv, tmp_path, "accum", "--model", TINY_VIT, "--accum-freq", "2", "--max-steps", "3", "--warmup", "10"
        )
    )
    records = read_metrics(tmp_path / "accum")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["samples_seen"] for r in records] == [32, 64, 96]
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(3)])
    for record in records:
        assert record["samples_per_second"] * record["batch_time"] == pytest.approx(32)
    log = (tmp_path / "accum" / "out.log").read_text()
    assert "[ 32/320 (10%)]" in log  # 320 rows / 32 per step = 10 steps per epoch

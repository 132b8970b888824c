"""The training loop (acc_clip/train.py), run in-process on synthetic batches: how many optimizer
steps it makes under --accum-freq and the learning rate of each."""

from __future__ import annotations


import pytest

from acc_clip.config import parse_config
from acc_clip.train import train
from conftest import TINY_VIT, open_clip_cosine_lr, read_metrics

MICRO_BATCHES_PER_EPOCH = 10  # --train-num-samples 40 at --batch-size 4, one process


@pytest.mark.parametrize("accum_freq", [2, 4])
def test_steps_and_learning_rate_under_accumulation(in_process, tmp_path, accum_freq):
    """10 micro-batches per epoch make 10 // accum_freq optimizer steps (5 or 2; 4 leaves 2 unused),
    so 3 epochs make 15 or 6 steps, and the cosine runs over those steps, not over micro-batches:
    the lr at warm-up end, mid-way and the last step is open_clip_train's formula for that total."""
    epochs, warmup, lr = 3, 2, 1e-3
    config, _ = parse_config([
        "--dataset-type", "synthetic", "--train-num-samples", str(4 * MICRO_BATCHES_PER_EPOCH), "--batch-size", "4",
        "--accum-freq", str(accum_freq), "--epochs", str(epochs), "--warmup", str(warmup), "--lr", str(lr),
        "--model", TINY_VIT, "--device", "cpu", "--precision", "fp32", "--workers", "0",
        "--log-every-n-steps", "1", "--save-frequency", "0", "--logs", str(tmp_path), "--name", "run"])
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

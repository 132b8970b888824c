"""The training loop (acc_clip/train.py), run in-process on synthetic batches: how many optimizer
steps it makes under --accum-freq and the learning rate of each."""

from __future__ import annotations

import logging
import signal

import pytest
import torch
from accelerate.state import AcceleratorState

from acc_clip.config import parse_config
from acc_clip.train import train
from conftest import TINY_VIT, read_metrics
from test_model import open_clip_cosine_lr

MICRO_BATCHES_PER_EPOCH = 10  # --train-num-samples 40 at --batch-size 4, one process


@pytest.fixture
def in_process(monkeypatch):
    """train() sets up what a process sets up once: the root logger's handlers, SIGTERM/SIGINT
    handlers, torch's thread count and Accelerate's global state. Put them back afterwards."""
    # One compute thread: the tiny model's ops are too small to share, and on a loaded 2-core machine
    # two spinning OpenMP threads made the run 9x slower (27 s against 3 s). With OMP_NUM_THREADS set,
    # train() leaves the thread count alone.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    signals = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    for signum, handler in signals.items():
        signal.signal(signum, handler)
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()  # the run's out.log
    root.handlers[:], root.level = handlers, level
    torch.set_num_threads(threads)


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

"""Parity with open_clip's own trainer: same CSV, tiny model, seed and hyperparameters (fp32, CPU,
batch 10, 2 epochs, 64 steps, 2 loader workers, one compute thread in both trainers).

Each test checks, besides the loss curve, what the curve alone cannot:
- the batches: every step's rows (image path, caption) in acc_clip's sample record
  (the trainer's --log-samples) equal open_clip_train's, in order, first batch included; open_clip_train's
  order is replayed in-process with its own `get_csv_dataset` DataLoader after its `random_seed`
  (`benchmarks/parity_open_clip.open_clip_batches`). On the flat-colour data the first losses agreeing
  to 1e-4 also ties that replay to the real open_clip_train run: other rows give another loss.
- the learning rate of every step: acc_clip's equals open_clip_train's scheduler (`cosine_lr`, in full
  precision, relative 1e-12: measured bit-equal in all 19 measurement runs below; the slack only allows a
  reordering of the same float operations) and prints as the `LR:` its out.log shows (6 decimals).

Tolerances, measured on the 2-core CPU machine (AMD EPYC, load 4-6, torch 2.14.1 CPU, open_clip_torch 3.3.0),
each run deterministic (the same seed twice gave identical figures), details in the issue's notes:
- real images (the demo data): acc_clip and open_clip_train differ only in the random-crop draws
  (per-sample seeds here, per-worker streams there). Over seeds 0-9 the two-sided EMA(0.9) mean
  relative error was 0.50%-2.13% (seed 0, the test's: 0.87%) and the largest per-step difference
  0.14-0.60. Asserted: EMA error <= 3.5% and max difference <= 1.0 (about 1.6x the worst seed).
- flat-colour images: every crop of a flat image is the same image, so both trainers get identical
  pixels (checked here). With acc_clip's arithmetic set as open_clip_train's (`--open-clip-arithmetic`:
  channels_last off, unfused AdamW) the curves agree to the 4 decimals open_clip logs: over seeds 0-2
  the largest per-step difference was 4.96e-5 (the log's rounding, 5e-5) and the EMA error 5.7e-6.
  Asserted: max difference <= 1e-4 (one unit of the logged 4th decimal, 2x the worst) and EMA error
  <= 2e-5 (3.5x). With acc_clip's defaults instead, channels_last and fused AdamW round differently and
  the curves drift apart (EMA error 1.04%, max 0.23, seed 0); and even with open_clip_train's arithmetic,
  2 threads in open_clip_train against 1 in acc_clip give 0.072% and 0.013: hence one thread in both.
The speed ratio is printed, never asserted (timings are not tests)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from benchmarks.parity_open_clip import build_parser
from parity_checks import FLAT_EMA_TOLERANCE, STEPS, assert_same_batches_and_learning_rates, parity

# Real images: crop draws differ (measured 0.50%-2.13% EMA error, 0.14-0.60 max difference, seeds 0-9).
DEMO_EMA_TOLERANCE = 0.035
DEMO_MAX_DIFFERENCE = 1.0
# Flat-colour images, open_clip_train's arithmetic (measured 5.7e-6 and 4.96e-5 at most, seeds 0-2).
FLAT_MAX_DIFFERENCE = 1e-4


def test_loss_curve_matches_open_clip_train(train_csv, tmp_path):
    report = parity(train_csv, tmp_path)
    result = report["result"]
    assert result.num_points == STEPS and result.aligned_by == "step"
    assert_same_batches_and_learning_rates(report)
    assert result.vendor_passed
    assert result.ema_mean_abs_relative_error <= DEMO_EMA_TOLERANCE
    assert result.max_abs_difference <= DEMO_MAX_DIFFERENCE


def test_flat_colour_images_give_identical_pixels_whatever_the_crop(flat_csv):
    """The premise of the tight test below: open_clip's PIL transform and acc_clip's uint8 path give
    the same tensor for a flat image, bit for bit, under different crop draws."""
    import open_clip

    from acc_clip.data.pixels import load_pixels, split_transform
    from helpers import TINY_RN

    _, preprocess, _ = open_clip.create_model_and_transforms(TINY_RN)
    split = split_transform(preprocess)
    paths = sorted({line.split(",")[0] for line in flat_csv.read_text().splitlines()[1:]})
    for k, path in enumerate(paths[:8]):
        data = Path(path).read_bytes()
        torch.manual_seed(k)
        ref = preprocess(Image.open(io.BytesIO(data)))
        new = split.to_model_input(load_pixels(data, split, seed=1000 + k)[None], "cpu")[0]
        assert torch.equal(ref, new), path


def test_flat_colour_curve_matches_open_clip_train_to_log_precision(flat_csv, tmp_path):
    report = parity(flat_csv, tmp_path, "--open-clip-arithmetic")
    result = report["result"]
    assert result.num_points == STEPS and result.aligned_by == "step"
    assert_same_batches_and_learning_rates(report)
    assert result.vendor_passed
    assert abs(result.new_losses[0] - result.ref_losses[0]) <= FLAT_MAX_DIFFERENCE
    assert result.max_abs_difference <= FLAT_MAX_DIFFERENCE
    assert result.ema_mean_abs_relative_error <= FLAT_EMA_TOLERANCE


def test_replayed_first_batch_needs_no_workers(train_csv):
    """With workers 0 open_clip_train's crops draw from the main generator, so only its first batch
    can be replayed; it is the same first batch as with workers."""
    from benchmarks.parity_open_clip import open_clip_batches

    args = build_parser().parse_args(["--train-data", str(train_csv), "--batch-size", "10", "--workers", "2"])
    with_workers, per_epoch = open_clip_batches(args)
    args.workers = 0
    without, _ = open_clip_batches(args)
    assert per_epoch == 32 and len(with_workers) == STEPS and len(without) == 1
    assert without[0] == with_workers[0]
    assert len(set(with_workers[0])) == 10

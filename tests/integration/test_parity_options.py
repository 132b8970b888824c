"""Parity with open_clip_train for the options that change training without changing the objective:
a ViT with no optimizer flags (AdamW beta2 0.98 and eps 1e-6, derived from the model's name as open_clip
derives them), a locked image tower with its last group trainable, and ViT patch dropout. The setting of
test_parity.py's flat-colour test (same batches, same learning rates, one thread, open_clip's arithmetic).

Measured (seed 0, 64 steps, this CPU): ViT defaults EMA error 4.8e-6; lock-image 5.2e-6, both with the
largest step difference 4.9e-5 (the log's rounding). Patch dropout draws its masks from each trainer's own
generator stream (open_clip's main-process RNG, also drawn by its DataLoader; acc_clip's seeded per run),
so the masks differ and the curves agree only statistically: EMA error 2.67%, largest step difference 1.01;
held to the foundation issue's parity rule (the seed's rule, and EMA error <= 5%)."""

from __future__ import annotations

import pytest

from helpers import TINY_VIT
from parity_checks import FLAT_EMA_TOLERANCE, STEPS, assert_same_batches_and_learning_rates, parity

FOUNDATION_EMA_TOLERANCE = 0.05


@pytest.mark.parametrize(
    "trainer_args", ["", "--lock-image --lock-image-unlocked-groups 1"], ids=["vit-defaults", "lock-image"]
)
def test_vit_options_follow_open_clip_train_to_log_precision(trainer_args, flat_csv, tmp_path):
    report = parity(flat_csv, tmp_path, "--open-clip-arithmetic", "--model", TINY_VIT, "--trainer-args", trainer_args)
    result = report["result"]
    assert result.num_points == STEPS and result.aligned_by == "step"
    assert_same_batches_and_learning_rates(report)
    assert result.vendor_passed and result.ema_mean_abs_relative_error <= FLAT_EMA_TOLERANCE
    worst = max(abs(new - ref) / abs(ref) for ref, new in zip(result.ref_losses, result.new_losses))
    assert worst <= 1e-4, f"a step's loss differs from open_clip_train's by {worst:.3g} of it"


def test_patch_dropout_follows_open_clip_train_by_the_parity_rule(flat_csv, tmp_path):
    report = parity(
        flat_csv, tmp_path, "--open-clip-arithmetic", "--model", TINY_VIT, "--trainer-args", "--force-patch-dropout 0.5"
    )
    result = report["result"]
    assert result.num_points == STEPS
    assert_same_batches_and_learning_rates(report)
    assert result.vendor_passed and result.ema_mean_abs_relative_error <= FOUNDATION_EMA_TOLERANCE


def test_patch_dropout_trains_with_dropout_and_evaluates_without():
    import torch

    from acc_clip.loss import model_overrides
    from acc_clip.model.build import create_model
    from acc_clip.train.config import parse_train_config

    config, _ = parse_train_config(["--train-data", "x.csv", "--model", TINY_VIT, "--force-patch-dropout", "0.5"])
    model = create_model(
        config.model, precision=config.runtime.precision, seed=config.runtime.seed, **model_overrides(config)
    ).model
    assert model.visual.patch_dropout.prob == 0.5
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.encode_image(images), model.encode_image(images))
        model.train()
        assert not torch.equal(model.encode_image(images), model.encode_image(images))

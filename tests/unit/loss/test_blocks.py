"""The whole-set validation losses computed a block of rows at a time (loss/blocks.py, Objective.whole_set)
against open_clip's own loss classes on the whole set as one batch."""

from __future__ import annotations

import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss

from acc_clip.loss.blocks import sigmoid_loss_in_blocks, softmax_loss_in_blocks
from acc_clip.loss.clip import ClipObjective
from acc_clip.loss.coca import CoCaObjective
from acc_clip.loss.siglip import SigLipObjective
from acc_clip.train.config import parse_train_config

CHUNKS = [1, 2, 7, 16, 36, 37]


def features(rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(rows, 12, generator=generator), dim=1)
    texts = torch.nn.functional.normalize(images + 0.7 * torch.randn(rows, 12, generator=generator), dim=1)
    return images, texts


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("bias", [None, torch.tensor(-1.5)])
def test_softmax_loss_in_blocks_is_open_clip_s_clip_loss(chunk_size, bias):
    images, texts = features(37, 0)
    scale = torch.tensor(9.0)
    expected = ClipLoss()(images, texts, scale, logit_bias=bias)
    assert softmax_loss_in_blocks(images, texts, scale, bias, chunk_size).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_sigmoid_loss_in_blocks_is_open_clip_s_siglip_loss(chunk_size):
    images, texts = features(37, 1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    expected = SigLipLoss()(images, texts, scale, bias)
    assert sigmoid_loss_in_blocks(images, texts, scale, bias, chunk_size).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_a_block_loss_is_not_the_mean_of_per_block_losses():
    # Guards the tests above: a loss taken within each block alone (open_clip's per-batch validation
    # mean) differs from the whole set's, so an implementation that only saw its block would fail them.
    images, texts = features(37, 0)
    scale = torch.tensor(9.0)
    per_block = (
        sum(ClipLoss()(images[s : s + 7], texts[s : s + 7], scale) * len(images[s : s + 7]) for s in range(0, 37, 7))
        / 37
    )
    assert per_block.item() != pytest.approx(ClipLoss()(images, texts, scale).item(), rel=1e-3)


@pytest.mark.parametrize(
    "objective, flags",
    [(ClipObjective, []), (SigLipObjective, ["--siglip"]), (CoCaObjective, ["--model", "coca_ViT-B-32"])],
)
def test_each_objective_s_whole_set_is_its_one_batch_loss(objective, flags):
    config = parse_train_config(["--train-data", "x.csv", *flags])[0]
    images, texts = features(23, 2)
    rows = {"image_features": images, "text_features": texts, "logit_scale": torch.tensor(7.0)}
    if objective is SigLipObjective:
        rows["logit_bias"] = torch.tensor(-4.0)
    if objective is CoCaObjective:
        rows["caption_loss_sum"] = torch.arange(23.0)
        rows["caption_tokens"] = torch.full((23,), 5)
    loss = objective(config, 0, 1)
    one_batch = loss(rows)
    for chunk_size in (0, 23, 100):  # one block: the one-batch value itself
        assert {k: v.item() for k, v in loss.whole_set(rows, chunk_size).items()} == {
            k: v.item() for k, v in one_batch.items()
        }
    in_blocks = loss.whole_set(rows, 5)
    assert in_blocks.keys() == one_batch.keys()
    for name, value in one_batch.items():
        assert in_blocks[name].item() == pytest.approx(value.item(), rel=1e-6), name

"""Contrastive losses of a whole validation set, a block of rows at a time: memory chunk x rows instead of
rows x rows, the value that of the one-batch loss up to the order of float sums (tests/unit/loss/test_blocks.py
checks them against open_clip's ClipLoss and SigLipLoss). Used by `Objective.whole_set`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(images, texts, logit_scale, logit_bias) -> torch.Tensor:
    logits = logit_scale * images @ texts.t()
    return logits if logit_bias is None else logits + logit_bias


def softmax_loss_in_blocks(
    images: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """ClipLoss on one process: the mean of the image-to-text and text-to-image cross-entropies of
    L = scale * images @ texts.T (+ bias) with the pairs on the diagonal, row blocks then column blocks."""
    rows = len(images)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, rows, chunk_size):
        block = slice(start, start + chunk_size)
        logits = _logits(images[block], texts, logit_scale, logit_bias)  # image queries
        total += (logits.logsumexp(dim=1) - logits.diagonal(offset=start)).sum().double()
        logits = _logits(images, texts[block], logit_scale, logit_bias)  # text queries, as columns
        total += (logits.logsumexp(dim=0) - logits.diagonal(offset=-start)).sum().double()
    return (total / (2 * rows)).to(images.dtype)


def sigmoid_loss_in_blocks(
    images: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """SigLipLoss on one process: -sum of log sigmoid(+logit) over the pairs and log sigmoid(-logit) over
    the other entries of L, divided by the images, in row blocks."""
    rows = len(images)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, rows, chunk_size):
        logits = _logits(images[start : start + chunk_size], texts, logit_scale, logit_bias)
        signs = -torch.ones_like(logits)
        signs.diagonal(offset=start).fill_(1.0)
        total -= F.logsigmoid(signs * logits).sum().double()
    return (total / rows).to(images.dtype)

"""The contrastive loss over all processes: open_clip's own `ClipLoss`, bound to the process group
Accelerate created (features gathered with gradient under --gather-with-grad, labels offset by rank
under --local-loss)."""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss

from acc_clip.config import TrainConfig


def create_loss(config: TrainConfig, rank: int, world_size: int) -> ClipLoss:
    return ClipLoss(local_loss=config.local_loss, gather_with_grad=config.gather_with_grad,
                    cache_labels=True, rank=rank, world_size=world_size)


def contrastive_loss(loss_fn: ClipLoss, image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    # Features arrive in fp32 (Accelerate casts model outputs back), so the logits and the softmax
    # run in full precision whatever the autocast dtype.
    return loss_fn(image_features.float(), text_features.float(), logit_scale)

"""The CoCa objective: open_clip's own `CoCaLoss`, the contrastive loss of the two towers
(weighted by --coca-contrastive-loss-weight) plus the caption loss, a token-level cross-entropy of
the multimodal decoder's logits against the caption shifted by one (weighted by
--coca-caption-loss-weight). Both are logged by name beside their sum."""

from __future__ import annotations

import torch
from open_clip.loss import CoCaLoss

from acc_clip.config import TrainConfig


class CoCaObjective:
    def __init__(self, config: TrainConfig, rank: int, world_size: int):
        self.loss = CoCaLoss(caption_loss_weight=config.coca_caption_loss_weight,
                             clip_loss_weight=config.coca_contrastive_loss_weight, local_loss=config.local_loss,
                             gather_with_grad=config.gather_with_grad, cache_labels=True, rank=rank,
                             world_size=world_size)
        # The caption loss is each process's mean over its own tokens.
        self.mean_over_processes = world_size > 1

    def __call__(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.loss(outputs["image_features"].float(), outputs["text_features"].float(),
                         outputs["logits"].float(), outputs["labels"], outputs["logit_scale"], output_dict=True)

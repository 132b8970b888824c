"""The CLIP objective: open_clip's own `ClipLoss` (softmax cross-entropy both ways), bound to the
process group Accelerate created (features gathered with gradient under --gather-with-grad, labels
offset by rank under --local-loss)."""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss

from acc_clip.config import TrainConfig
from acc_clip.loss import Objective


class ClipObjective(Objective):
    def __init__(self, config: TrainConfig, rank: int, world_size: int, *placement):
        super().__init__(config, rank, world_size, *placement)
        self.loss = ClipLoss(local_loss=config.local_loss, gather_with_grad=config.gather_with_grad,
                             cache_labels=True, rank=rank, world_size=world_size)
        # Under --local-loss each process's loss covers its own rows only.
        self.mean_over_processes = config.local_loss and world_size > 1

    def __call__(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Features arrive in fp32 (Accelerate casts model outputs back), so the logits and the softmax
        # run in full precision whatever the autocast dtype.
        # A model with a logit_bias (a SigLIP architecture trained with this loss) adds it to the logits,
        # as open_clip's ClipLoss does since its issue #1076: left out, it would get no gradient.
        return {"contrastive_loss": self.loss(rows["image_features"].float(), rows["text_features"].float(),
                                              rows["logit_scale"], logit_bias=rows.get("logit_bias"))}

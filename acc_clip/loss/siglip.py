"""The SigLIP objective: open_clip's own `SigLipLoss` (a sigmoid per image-text pair, summed over
the pairs, divided by the images), with its exchange of text features across processes chosen by
--loss-dist-impl: bidir, shift, reduce or gather are different communication patterns for the same
value and gradient. Each process's loss covers its own images against every text, so the mean over
processes is the one-process loss of the whole global batch."""

from __future__ import annotations

import torch
from open_clip.loss import SigLipLoss

from acc_clip.config import TrainConfig
from acc_clip.loss import Objective


class SigLipObjective(Objective):
    def __init__(self, config: TrainConfig, rank: int, world_size: int, *placement):
        super().__init__(config, rank, world_size, *placement)
        self.loss = SigLipLoss(rank=rank, world_size=world_size, dist_impl=config.loss_dist_impl)
        self.mean_over_processes = world_size > 1

    def __call__(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"contrastive_loss": self.loss(rows["image_features"].float(), rows["text_features"].float(),
                                              rows["logit_scale"], rows.get("logit_bias"))}

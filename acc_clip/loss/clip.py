"""The CLIP objective: open_clip's own `ClipLoss` (softmax cross-entropy both ways), bound to the
process group Accelerate created (features gathered with gradient under --gather-with-grad, labels
offset by rank under --local-loss). Selected when no other objective is."""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss

from acc_clip.config.parsing import Config
from acc_clip.loss.blocks import softmax_loss_in_blocks
from acc_clip.loss.objective import Objective, ObjectiveOptions, in_one_block


class ClipObjective(Objective):
    name = "clip"

    def __init__(self, config: Config, rank: int, world_size: int, *placement):
        super().__init__(config, rank, world_size, *placement)
        options = config[ObjectiveOptions]
        self.loss = ClipLoss(
            local_loss=options.local_loss,
            gather_with_grad=options.gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )
        # Under --local-loss each process's loss covers its own rows only.
        self.mean_over_processes = options.local_loss and world_size > 1

    @classmethod
    def selected(cls, config: Config) -> bool:
        return True

    def __call__(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Features arrive in fp32 (Accelerate casts model outputs back), so the logits and the softmax
        # run in full precision whatever the autocast dtype.
        # A model with a logit_bias (a SigLIP architecture trained with this loss) adds it to the logits,
        # as open_clip's ClipLoss does since its issue #1076: left out, it would get no gradient.
        return {
            "contrastive_loss": self.loss(
                rows["image_features"].float(),
                rows["text_features"].float(),
                rows["logit_scale"],
                logit_bias=rows.get("logit_bias"),
            )
        }

    def whole_set(self, rows: dict[str, torch.Tensor], chunk_size: int) -> dict[str, torch.Tensor]:
        if in_one_block(rows, chunk_size):
            return self(rows)
        image, text = rows["image_features"].float(), rows["text_features"].float()
        bias = rows.get("logit_bias")
        return {"contrastive_loss": softmax_loss_in_blocks(image, text, rows["logit_scale"], bias, chunk_size)}

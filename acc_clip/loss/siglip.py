"""The SigLIP objective (--siglip): open_clip's own `SigLipLoss` (a sigmoid per image-text pair, summed
over the pairs, divided by the images), with its exchange of text features across processes chosen by
--loss-dist-impl: bidir, shift, reduce or gather are different communication patterns for the same
value and gradient. Each process's loss covers its own images against every text, so the mean over
processes is the one-process loss of the whole global batch. --siglip also starts the model at logit
scale ln 10 and bias -10, as open_clip_train does, whichever objective trains."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from open_clip.loss import SigLipLoss

from acc_clip.config.parsing import Config
from acc_clip.config.schema import Section, option
from acc_clip.loss.blocks import sigmoid_loss_in_blocks
from acc_clip.loss.objective import Objective, in_one_block

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")  # open_clip SigLipLoss's exchanges across processes


@dataclass
class SigLipOptions(Section):
    title: ClassVar[str] = "siglip"
    siglip: bool = option(
        False,
        "train with the sigmoid loss (SigLIP); the model starts at logit scale ln 10, logit "
        "bias -10, as open_clip_train sets it",
    )
    loss_dist_impl: str | None = option(
        None,
        "SigLIP's exchange of text features across processes: bidir (the "
        "default), shift, reduce or gather; the same loss either way",
        choices=DIST_IMPLS,
        train_only=True,
    )


class SigLipObjective(Objective):
    name = "siglip"
    options = SigLipOptions
    identity = ("siglip",)

    def __init__(self, config: Config, rank: int, world_size: int, *placement):
        super().__init__(config, rank, world_size, *placement)
        self.loss = SigLipLoss(rank=rank, world_size=world_size, dist_impl=config[SigLipOptions].loss_dist_impl)
        self.mean_over_processes = world_size > 1

    @classmethod
    def selected(cls, config: Config) -> bool:
        return config[SigLipOptions].siglip

    @classmethod
    def check(cls, config: Config, chosen: type[Objective]) -> list[str]:
        options = config[SigLipOptions]
        notices = []
        if options.siglip and chosen is not cls:
            notices.append(
                f"--siglip: the {chosen.name} loss trains (open_clip_train's order: distillation, CoCa, "
                "SigLIP); only the SigLIP initialisation (logit scale ln 10, bias -10) applies"
            )
        if options.loss_dist_impl is not None and chosen is not cls:
            notices.append(
                f"--loss-dist-impl {options.loss_dist_impl} has no effect: this run does not train with "
                "the SigLIP loss (as in open_clip)"
            )
        return notices

    @classmethod
    def model_options(cls, config: Config) -> dict[str, Any]:
        # open_clip_train's SigLIP start: a cooler temperature and a strongly negative bias, most pairs being negatives.
        return {"init_logit_scale": math.log(10), "init_logit_bias": -10} if config[SigLipOptions].siglip else {}

    def __call__(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "contrastive_loss": self.loss(
                rows["image_features"].float(),
                rows["text_features"].float(),
                rows["logit_scale"],
                rows.get("logit_bias"),
            )
        }

    def whole_set(self, rows: dict[str, torch.Tensor], chunk_size: int) -> dict[str, torch.Tensor]:
        if in_one_block(rows, chunk_size):
            return self(rows)
        image, text = rows["image_features"].float(), rows["text_features"].float()
        bias = rows.get("logit_bias")
        return {"contrastive_loss": sigmoid_loss_in_blocks(image, text, rows["logit_scale"], bias, chunk_size)}

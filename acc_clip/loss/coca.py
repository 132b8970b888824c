"""The CoCa objective: open_clip's contrastive loss of the two towers (`ClipLoss`, weighted by
--coca-contrastive-loss-weight) plus the caption loss, the token-level cross-entropy of the
multimodal decoder's logits against the caption shifted by one, padding left out (weighted by
--coca-caption-loss-weight). Both are logged by name beside their sum.

The caption loss is the mean over the tokens of the whole global batch. open_clip's `CoCaLoss`
takes each process's mean over its own tokens, so with several processes (or micro-batches) whose
captions differ in length its update is not the one-batch update; here `rows` keeps each sample's
summed token loss and token count, and the loss divides by the token count of the whole global
batch (one all-reduce of a count). On one process the value is `CoCaLoss`'s (tests/unit/loss/test_objectives.py).

A weight of 0 multiplies its loss by 0 instead of skipping it (open_clip skips the contrastive
loss), so every parameter still takes part in every step, which DDP requires."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from acc_clip.config.parsing import Config
from acc_clip.config.schema import NON_NEGATIVE, Section, option, options_of
from acc_clip.loss.blocks import softmax_loss_in_blocks
from acc_clip.loss.objective import Objective, ObjectiveOptions, in_one_block
from acc_clip.model.options import ModelOptions

PAD_TOKEN = 0  # open_clip's tokenizers pad with 0, and CoCaLoss ignores it


@dataclass
class CocaOptions(Section):
    title: ClassVar[str] = "coca"
    coca_caption_loss_weight: float = option(2.0, "CoCa models: weight of the caption loss", domain=NON_NEGATIVE)
    coca_contrastive_loss_weight: float = option(
        1.0, "CoCa models: weight of the contrastive loss", domain=NON_NEGATIVE
    )


class CoCaObjective(Objective):
    name = "coca"
    options = CocaOptions

    def __init__(self, config: Config, rank: int, world_size: int, *placement):
        super().__init__(config, rank, world_size, *placement)
        options = config[ObjectiveOptions]
        self.weights = config[CocaOptions]
        self.contrastive = ClipLoss(
            local_loss=options.local_loss,
            gather_with_grad=options.gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )
        self.mean_over_processes = world_size > 1

    @classmethod
    def selected(cls, config: Config) -> bool:
        """open_clip_train's rule: a model whose name holds 'coca'."""
        return config[ModelOptions].is_coca

    @classmethod
    def check(cls, config: Config, chosen: type[Objective]) -> list[str]:
        """The weights given for a model that is not CoCa are announced, at any value (the vendor's command
        passes them at their defaults)."""
        model = config[ModelOptions]
        if model.is_coca:
            return []
        return [
            f"--{option.flag} has no effect: {model.model} is not a CoCa model (open_clip_train's rule: the "
            "name holds 'coca')"
            for option in options_of(CocaOptions)
            if option.name in config.given
        ]

    def rows(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = outputs["labels"]
        token_losses = F.cross_entropy(
            outputs["logits"].float().transpose(1, 2), labels, ignore_index=PAD_TOKEN, reduction="none"
        )
        rows = {key: value for key, value in outputs.items() if key not in ("logits", "labels")}
        rows["caption_loss_sum"] = token_losses.sum(dim=1)
        rows["caption_tokens"] = (labels != PAD_TOKEN).sum(dim=1)
        return rows

    def global_tokens(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = rows["caption_tokens"].sum()
        if self.world_size > 1:
            torch.distributed.all_reduce(tokens)
        return tokens.clamp(min=1)

    def __call__(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        contrastive = self.contrastive(
            rows["image_features"].float(),
            rows["text_features"].float(),
            rows["logit_scale"],
            logit_bias=rows.get("logit_bias"),
        )
        return self._weighted(contrastive, rows)

    def whole_set(self, rows: dict[str, torch.Tensor], chunk_size: int) -> dict[str, torch.Tensor]:
        if in_one_block(rows, chunk_size):
            return self(rows)
        image, text = rows["image_features"].float(), rows["text_features"].float()
        bias = rows.get("logit_bias")
        return self._weighted(softmax_loss_in_blocks(image, text, rows["logit_scale"], bias, chunk_size), rows)

    def _weighted(self, contrastive: torch.Tensor, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Each process holds its share of the token sum; x world size because the processes' values (and
        # DDP's gradients) are averaged, which makes the mean over all tokens.
        caption = rows["caption_loss_sum"].sum() * self.world_size / self.global_tokens(rows)
        return {
            "contrastive_loss": self.weights.coca_contrastive_loss_weight * contrastive,
            "caption_loss": self.weights.coca_caption_loss_weight * caption,
        }

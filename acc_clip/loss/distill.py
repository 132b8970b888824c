"""Distillation (--distill-model, --distill-pretrained): open_clip's own `DistillClipLoss`, the CLIP
loss of the student plus the cross-entropy of the student's image->text and text->image softmax
against a frozen teacher's, both logged by name.

The teacher (model.create_teacher) runs in eval mode under no_grad, in the run's autocast, on each
micro-batch once, on the student's inputs (same image size, context length and, unchecked,
normalisation: as open_clip_train assumes): its features are `targets`, per-sample rows like the student's,
so contrastive-exact accumulation covers them (open_clip_train refuses accumulation with distillation). It is held
here, not in the model, so it is never wrapped, optimised or saved in a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from open_clip.loss import DistillClipLoss

from acc_clip.config.parsing import Config
from acc_clip.config.schema import Section, option
from acc_clip.errors import UsageError
from acc_clip.loss.objective import Objective, ObjectiveOptions
from acc_clip.loss.siglip import SigLipOptions
from acc_clip.model.build import create_teacher
from acc_clip.model.options import ModelOptions
from acc_clip.runtime.device import RuntimeOptions


@dataclass
class DistillOptions(Section):
    title: ClassVar[str] = "distillation"
    distill_model: str | None = option(
        None,
        "distil from this frozen teacher model (an open_clip name or "
        "local-dir:PATH); same transforms and tokenizer as --model assumed",
        train_only=True,
    )
    distill_pretrained: str | None = option(
        None,
        "the teacher's weights: a pretrained tag or a local file "
        "(not needed for a local-dir: teacher whose folder holds them)",
        train_only=True,
    )

    def check(self) -> None:
        if self.distill_pretrained and not self.distill_model:
            # open_clip_train would silently train without a teacher.
            raise UsageError("--distill-pretrained needs --distill-model (the teacher's architecture)")


class DistillObjective(Objective):
    name = "distill"
    options = DistillOptions
    identity = ("distill_model",)

    def __init__(self, config: Config, rank: int, world_size: int, *placement, teacher: torch.nn.Module | None = None):
        super().__init__(config, rank, world_size, *placement)
        options, distill = config[ObjectiveOptions], config[DistillOptions]
        self.student, self.teacher_name = config[ModelOptions].model, str(distill.distill_model)
        self.teacher = (
            teacher
            if teacher is not None
            else create_teacher(
                self.teacher_name,
                distill.distill_pretrained,
                precision=config[RuntimeOptions].precision,
                device=self.device,
            )
        )
        self.loss = DistillClipLoss(
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
        return bool(config[DistillOptions].distill_model)

    @classmethod
    def check(cls, config: Config, chosen: type[Objective]) -> list[str]:
        if chosen is cls and (config[ModelOptions].is_coca or config[SigLipOptions].siglip):
            raise UsageError(
                f"--distill-model trains with the CLIP distillation loss: it cannot be combined with "
                f"{'a CoCa model' if config[ModelOptions].is_coca else '--siglip'} (open_clip_train "
                "cannot either)"
            )
        return super().check(config, chosen)

    def check_inputs(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        """The teacher reads the student's inputs (as in open_clip_train): refuse, in one line, inputs
        of another shape than the teacher's, rather than fail deep in its forward."""
        size = getattr(self.teacher.visual, "image_size", tuple(images.shape[-2:]))
        size = (size, size) if isinstance(size, int) else tuple(size)  # a ResNet tower keeps an int
        context = getattr(self.teacher, "context_length", texts.shape[1])
        if tuple(images.shape[-2:]) != size or texts.shape[1] != context:
            raise UsageError(
                f"--distill-model {self.teacher_name} reads {size[0]}x{size[1]} images and {context}-token "
                f"texts, but --model {self.student} gives {images.shape[-2]}x{images.shape[-1]} and "
                f"{texts.shape[1]}: the teacher must take the student's inputs"
            )

    def targets(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_inputs(images, texts)
        with torch.no_grad(), self.autocast():
            outputs = self.teacher(images, texts)
        return {
            "dist_image_features": outputs["image_features"].float(),
            "dist_text_features": outputs["text_features"].float(),
            "dist_logit_scale": outputs["logit_scale"].float(),
        }

    def __call__(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "logit_bias" in rows:  # DistillClipLoss has no bias term: the bias would silently never train
            raise UsageError(
                f"--model {self.student} has a logit_bias (a SigLIP architecture), which "
                "open_clip's distillation loss does not use: distil into a model without one"
            )
        return self.loss(
            rows["image_features"].float(),
            rows["text_features"].float(),
            rows["logit_scale"],
            rows["dist_image_features"],
            rows["dist_text_features"],
            rows["dist_logit_scale"],
            output_dict=True,
        )

    def on_one_process(self) -> DistillObjective:
        return DistillObjective(self.config, 0, 1, self.device, self.autocast, teacher=self.teacher)

"""Training objectives behind one small contract, and the table that picks one from the config.

The contract (`Objective`), built from (config, rank, world size, device, autocast):
- `rows(outputs)`: the model's output dict of a batch as what the loss adds up: per-sample tensors
  (first dimension = the batch) and the per-model scalars of `PER_MODEL_OUTPUTS`. The identity for
  most objectives; CoCa turns its decoder's logits into per-sample token sums here, so that a
  whole batch can be held in memory (accumulation, validation).
- `targets(images, texts)`: per-sample rows that do not come from the trained model (a distillation
  teacher's features), computed without gradient; empty for most objectives.
- `__call__(rows)`: the named losses of the batch whose rows these are; their sum is trained on.
- `mean_over_processes`: True when each process's losses cover only its own rows (so the mean over
  processes is the one-process value), False when every process holds the whole global batch's.
- `on_one_process()`: the same objective for one process holding a whole set (validation).

Any objective that is right on a batch is right on an accumulated one: step.py calls it on
whole-batch rows assembled from micro-batches, and the evaluator on the whole validation set's.

Adding an objective: a module here with a subclass of `Objective`, one line in OBJECTIVES, and the
rule in `objective_name` that selects it.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch

from acc_clip.config import TrainConfig

# Outputs that belong to a model, not to a sample (open_clip_train's accumulation names the first two).
PER_MODEL_OUTPUTS = ("logit_scale", "logit_bias", "dist_logit_scale")


class Objective:
    mean_over_processes = False

    def __init__(self, config: TrainConfig, rank: int, world_size: int, device="cpu",
                 autocast: Callable[[], ContextManager] = nullcontext):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device, self.autocast = device, autocast  # where and in which precision any extra model runs

    def rows(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return outputs

    def targets(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def __call__(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_one_process(self) -> "Objective":
        return type(self)(self.config, 0, 1, self.device, self.autocast)


# name -> (module, class) of each objective; a module is imported only when its objective is chosen.
OBJECTIVES: dict[str, tuple[str, str]] = {
    "clip": ("acc_clip.loss.clip", "ClipObjective"),
    "siglip": ("acc_clip.loss.siglip", "SigLipObjective"),
    "coca": ("acc_clip.loss.coca", "CoCaObjective"),
    "distill": ("acc_clip.loss.distill", "DistillObjective"),
}


def objective_name(config: TrainConfig) -> str:
    """open_clip_train's order: distillation, then CoCa (by model name), then SigLIP, else CLIP."""
    if config.distill_model:
        return "distill"
    if config.is_coca:
        return "coca"
    return "siglip" if config.siglip else "clip"


def create_objective(config: TrainConfig, rank: int, world_size: int, device="cpu",
                     autocast: Callable[[], ContextManager] = nullcontext) -> Objective:
    module, name = OBJECTIVES[objective_name(config)]
    return getattr(importlib.import_module(module), name)(config, rank, world_size, device, autocast)


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(losses.values())


def model_rows(objective: Objective, model, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of one batch: the trained model's (with gradient where the caller allows it) and the
    objective's targets."""
    return {**objective.rows(model(images, texts)), **objective.targets(images, texts)}

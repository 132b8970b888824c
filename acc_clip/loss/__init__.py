"""Training objectives behind one small contract, and the table that picks one from the config.

The contract (`Objective`): built from (config, rank, world size); called with the model's output
dict of a batch (whatever keys the model returns: image_features, text_features, logit_scale,
logit_bias, logits, labels, ...) it returns the named losses, whose sum is the loss trained on.
`mean_over_processes` says how the logged value is combined: True when each process's value
covers only its own rows (so the mean over processes is the one-process value), False when every
process already holds the loss of the whole global batch.

Contrastive-exact accumulation (step.py) calls an objective on whole-batch output dicts assembled
from micro-batches, so any objective that is right on a batch is right on an accumulated one.

Adding an objective: a module here with a class that keeps the contract, one line in OBJECTIVES,
and the rule in `objective_name` that selects it.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from acc_clip.config import TrainConfig


class Objective(Protocol):
    mean_over_processes: bool

    def __call__(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


# name -> (module, class) of each objective; a module is imported only when its objective is chosen.
OBJECTIVES: dict[str, tuple[str, str]] = {
    "clip": ("acc_clip.loss.clip", "ClipObjective"),
    "siglip": ("acc_clip.loss.siglip", "SigLipObjective"),
    "coca": ("acc_clip.loss.coca", "CoCaObjective"),
}


def objective_name(config: TrainConfig) -> str:
    if config.is_coca:
        return "coca"
    return "siglip" if config.siglip else "clip"


def create_objective(config: TrainConfig, rank: int, world_size: int) -> Objective:
    module, name = OBJECTIVES[objective_name(config)]
    return getattr(importlib.import_module(module), name)(config, rank, world_size)


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(losses.values())

"""Training objectives behind one small contract, and the table that picks one from the config.

The contract (`Objective`): built from (config, rank, world size); called with the model's output
dict of a batch (whatever keys the model returns: image_features, text_features, logit_scale,
logit_bias, logits, labels, ...) it returns the named losses, whose sum is the loss trained on.
`mean_over_processes` says how the logged value is combined: True when each process's value
covers only its own rows (so the mean over processes is the one-process value), False when every
process already holds the loss of the whole global batch.

Contrastive-exact accumulation (step.py) calls an objective on whole-batch output dicts assembled
from micro-batches, so any objective that is right on a batch is right on an accumulated one.

Adding an objective: a module here with a class that keeps the contract, and one line in OBJECTIVES
plus the rule in `objective_name` that selects it.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from acc_clip.config import TrainConfig


class Objective(Protocol):
    mean_over_processes: bool

    def __call__(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def _clip(config: TrainConfig, rank: int, world_size: int) -> Objective:
    from acc_clip.loss.clip import ClipObjective

    return ClipObjective(config, rank, world_size)


def _siglip(config: TrainConfig, rank: int, world_size: int) -> Objective:
    from acc_clip.loss.siglip import SigLipObjective

    return SigLipObjective(config, rank, world_size)


def _coca(config: TrainConfig, rank: int, world_size: int) -> Objective:
    from acc_clip.loss.coca import CoCaObjective

    return CoCaObjective(config, rank, world_size)


# name -> factory(config, rank, world_size); factories import their module only when chosen.
OBJECTIVES: dict[str, Callable[[TrainConfig, int, int], Objective]] = {
    "clip": _clip, "siglip": _siglip, "coca": _coca}


def objective_name(config: TrainConfig) -> str:
    if config.is_coca:
        return "coca"
    return "siglip" if config.siglip else "clip"


def create_objective(config: TrainConfig, rank: int, world_size: int) -> Objective:
    return OBJECTIVES[objective_name(config)](config, rank, world_size)


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(losses.values())

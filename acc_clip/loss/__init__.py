"""Training objectives: the registry that picks one from the configuration.

Each objective (objective.py's contract) owns its flags, its selection rule and what a checkpoint
records of it. Adding an objective: a module here with an `Objective` subclass, and one entry in
OBJECTIVES, whose order is the selection order (open_clip_train's: distillation, then CoCa by the
model's name, then SigLIP, else CLIP)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from acc_clip.config.parsing import Config
from acc_clip.config.schema import Section
from acc_clip.loss.clip import ClipObjective
from acc_clip.loss.coca import CoCaObjective
from acc_clip.loss.distill import DistillObjective
from acc_clip.loss.objective import PER_MODEL_OUTPUTS, Objective, ObjectiveOptions, model_rows, total_loss
from acc_clip.loss.siglip import SigLipObjective

__all__ = [
    "OBJECTIVES",
    "PER_MODEL_OUTPUTS",
    "Objective",
    "ObjectiveOptions",
    "check_objective",
    "chosen_objective",
    "create_objective",
    "model_overrides",
    "model_rows",
    "objective_identity",
    "objective_options",
    "total_loss",
]

OBJECTIVES: tuple[type[Objective], ...] = (DistillObjective, CoCaObjective, SigLipObjective, ClipObjective)


def objective_options() -> list[type[Section]]:
    """The sections of the objectives' own flags."""
    return [objective.options for objective in OBJECTIVES if objective.options is not None]


def chosen_objective(config: Config) -> type[Objective]:
    return next(objective for objective in OBJECTIVES if objective.selected(config))


def check_objective(config: Config) -> list[str]:
    """Every objective's rules against the configuration; the notices to give."""
    chosen = chosen_objective(config)
    return [notice for objective in OBJECTIVES for notice in objective.check(config, chosen)]


def objective_identity(config: Config) -> dict[str, Any]:
    """What a checkpoint records of the objective, so that a resume with another one is refused: its name
    and each objective's identifying options."""
    identity: dict[str, Any] = {"name": chosen_objective(config).name}
    for objective in OBJECTIVES:
        if objective.options is not None:
            identity.update({key: getattr(config[objective.options], key) for key in objective.identity})
    return identity


def model_overrides(config: Config) -> dict[str, Any]:
    """What the objectives' flags change in how the model is created (open_clip's create arguments)."""
    return {key: value for objective in OBJECTIVES for key, value in objective.model_options(config).items()}


def create_objective(
    config: Config,
    rank: int,
    world_size: int,
    device: Any = "cpu",
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> Objective:
    return chosen_objective(config)(config, rank, world_size, device, autocast)

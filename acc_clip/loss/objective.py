"""The contract every training objective keeps, and the options common to the contrastive ones.

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
- `whole_set(rows, chunk_size)`: the losses of a whole validation set on one process; objectives whose
  loss compares every row with every other compute it `chunk_size` rows at a time (loss/blocks.py), so
  memory is chunk x rows; by default the one-batch `__call__`.

And what the registry (loss/__init__.py) asks of each objective class:
- `name`; `options`: the section of its own flags (None without any);
- `selected(config)`: its selection rule (the registry asks in order, first yes wins);
- `identity`: the names of its options that a checkpoint records as what the run trains on;
- `check(config, chosen)`: its rules against the whole configuration, and its notices (by default, its own
  flags given while another objective trains have no effect);
- `model_options(config)`: what it changes in how the model is created (SigLIP's initial scale and bias).

Any objective that is right on a batch is right on an accumulated one: step.py calls it on
whole-batch rows assembled from micro-batches, and the evaluator on the whole validation set's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch

from acc_clip.config.parsing import Config
from acc_clip.config.schema import Section, option, options_of
from acc_clip.errors import UsageError


@dataclass
class ObjectiveOptions(Section):
    """How the contrastive loss spans several processes (CLIP, CoCa and distillation)."""

    title: ClassVar[str] = "objective"
    gather_with_grad: bool = option(
        False, "all-gather features with gradient (exact multi-process gradients)", train_only=True
    )
    local_loss: bool = option(False, "compute only the local rows of the logit matrix", train_only=True)

    def check(self) -> None:
        if self.local_loss and not self.gather_with_grad:
            # Without gathered gradients each rank would only see its own rows' gradient: wrong.
            raise UsageError("--local-loss needs --gather-with-grad")


# Outputs that belong to a model, not to a sample (open_clip_train's accumulation names the first two).
PER_MODEL_OUTPUTS = ("logit_scale", "logit_bias", "dist_logit_scale")


class Objective:
    name: ClassVar[str] = ""
    options: ClassVar[type[Section] | None] = None
    identity: ClassVar[tuple[str, ...]] = ()
    mean_over_processes = False

    def __init__(
        self,
        config: Config,
        rank: int,
        world_size: int,
        device: Any = "cpu",
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device, self.autocast = device, autocast  # where and in which precision any extra model runs

    @classmethod
    def selected(cls, config: Config) -> bool:
        raise NotImplementedError

    @classmethod
    def check(cls, config: Config, chosen: type[Objective]) -> list[str]:
        """Rules against the whole configuration, given the objective that trains (`chosen`); returns the
        notices. By default: each of its own flags given while another objective trains has no effect."""
        if cls is chosen or cls.options is None:
            return []
        return [
            f"--{option.flag} has no effect: this run trains the {chosen.name} objective, not {cls.name}"
            for option in options_of(cls.options)
            if config.changed(option)
        ]

    @classmethod
    def model_options(cls, config: Config) -> dict[str, Any]:
        return {}

    def rows(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return outputs

    def targets(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def __call__(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_one_process(self) -> Objective:
        return type(self)(self.config, 0, 1, self.device, self.autocast)

    def whole_set(self, rows: dict[str, torch.Tensor], chunk_size: int) -> dict[str, torch.Tensor]:
        return self(rows)


def in_one_block(rows: dict[str, torch.Tensor], chunk_size: int) -> bool:
    """Whether a whole set's rows fit one block of chunk_size (0: always), computed then as one batch."""
    return chunk_size == 0 or chunk_size >= len(rows["image_features"])


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return cast(torch.Tensor, sum(losses.values()))


def model_rows(objective: Objective, model, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of one batch: the trained model's (with gradient where the caller allows it) and the
    objective's targets."""
    return {**objective.rows(model(images, texts)), **objective.targets(images, texts)}

"""--torchcompile's `task` and `step` strategies: the function the loop calls for each optimizer step,
with `train_step`'s arguments and result, compiled as the strategy says. (`model` compiles the module
itself before the wrapping, and under FSDP every strategy compiles the blocks before sharding: both in
runtime/parallel.prepare.)

- task: what each micro-batch computes, around the wrapping: the model's forward (through DDP or the
  FSDP root) and the objective's loss, each compiled once and called by `train_step` for every
  micro-batch, the contrastive-exact accumulation's cached and fresh passes included; the backward,
  clipping and optimizer step stay eager.
- step: `train_step` itself, for one micro-batch per step (train/config.py refuses --accum-freq above 1):
  forward, loss, backward, clipping, optimizer step, zeroing and logit-scale clamp in one compiled
  function. Dynamo runs what it cannot trace (the backward call itself, collectives) between graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import torch

from acc_clip.loss import Objective
from acc_clip.runtime.parallel import TorchCompile
from acc_clip.train.step import train_step

log = logging.getLogger(__name__)


class CompiledLoss:
    """The objective with its loss (`__call__`) compiled; every other attribute is the objective's own
    (Python looks `__call__` up on the class, so the objective itself cannot carry a compiled one)."""

    def __init__(self, objective: Objective, kwargs: dict[str, Any]) -> None:
        self.objective = objective
        self.loss = torch.compile(objective.__call__, **kwargs)

    def __call__(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.loss(rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.objective, name)


def step_function(compiling: TorchCompile | None, model, objective: Objective) -> Callable[..., dict]:
    """What the loop calls in place of `train_step` (same arguments) for `model` and `objective`."""
    if compiling is None or compiling.strategy == "model":
        return train_step
    log.info("torch.compile: %s", compiling.describe())
    if compiling.strategy == "step":
        return torch.compile(train_step, **compiling.kwargs)
    forward = torch.compile(model, **compiling.kwargs)  # an OptimizedModule: unwrap and no_sync see through it
    loss = cast(Objective, CompiledLoss(objective, compiling.kwargs))

    def task_step(model, micro_batches, objective, *args, **kwargs) -> dict:
        return train_step(forward, micro_batches, loss, *args, **kwargs)

    return task_step

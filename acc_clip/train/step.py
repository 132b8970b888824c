"""One optimizer step: a plain step, or k micro-batches accumulated with contrastive-exact semantics.

Plain accumulation (Accelerate's `accumulate()`) would give each micro-batch only its own b-1
negatives. Here, as in open_clip_train, every micro-batch is first encoded without gradient; then
each is encoded again with gradient and its loss is taken against the cached features of all the
others. Each of those k losses has the value of the big-batch loss L, and micro-batch j's backward
gives dL/d(its own features), so the summed feature gradients are those of one batch k times
larger. Two departures from open_clip_train 3.3, both so that the update equals the big batch's:
- the temperature (logit_scale) takes part with gradient only in the last micro-batch; open_clip
  lets every micro-batch add dL/d(logit_scale), k times the big-batch gradient (AdamW mostly hides
  the factor; gradient clipping and SGD do not);
- the non-final backwards run under `no_sync`, so gradients are all-reduced once per update, not k
  times.

Several processes: ranks must hold equally many samples in each micro-batch for the feature
all-gather; train/balance.py makes them so before the step, without dropping good samples.

The parts of a step are spans named after their phase (train/profiling.py), which --profile-steps traces.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.profiler import record_function

from acc_clip.loss import PER_MODEL_OUTPUTS, Objective, model_rows, total_loss
from acc_clip.model.build import clamp_logit_scale
from acc_clip.runtime import parallel
from acc_clip.train.profiling import BACKWARD, FORWARD, FORWARD_NO_GRAD, LOSS, OPTIMIZER

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (images, texts) on the device


def assemble(cached: list[dict], j: int, fresh: dict, last: bool) -> dict:
    """The whole batch's rows (loss/__init__.py) with micro-batch j's fresh (with gradient) and the
    others' cached. Per-sample rows (features, CoCa's token sums, a teacher's features) are
    concatenated in micro-batch order; per-model ones (PER_MODEL_OUTPUTS) are taken from the fresh
    forward, with gradient only in the last micro-batch, so theirs comes once per update."""
    outputs = {}
    for key, value in fresh.items():
        if key in PER_MODEL_OUTPUTS:
            outputs[key] = value if last else value.detach()
        else:
            outputs[key] = torch.cat([c[key] for c in cached[:j]] + [value] + [c[key] for c in cached[j + 1 :]])
    return outputs


def _accumulate(model, micro_batches: list[MicroBatch], objective: Objective, accelerator) -> dict:
    with torch.no_grad(), record_function(FORWARD_NO_GRAD):
        cached = [model_rows(objective, model, images, texts) for images, texts in micro_batches]
    last = len(micro_batches) - 1
    for j, (images, texts) in enumerate(micro_batches):
        with parallel.no_sync(accelerator, model) if j < last else nullcontext():
            with record_function(FORWARD):
                fresh = {**cached[j], **objective.rows(model(images, texts))}  # the targets are not recomputed
            with record_function(LOSS):
                losses = objective(assemble(cached, j, fresh, j == last))
            with record_function(BACKWARD):
                accelerator.backward(total_loss(losses))
    return losses


def train_step(
    model,
    micro_batches: list[MicroBatch],
    objective: Objective,
    accelerator,
    optimizer,
    grad_clip_norm: float | None = None,
) -> dict[str, torch.Tensor]:
    """Runs forward, backward and the optimizer update; returns the step's named losses and their
    total under "loss" (detached, on the device). Where each process's loss covers only its own
    rows (`objective.mean_over_processes`), they are averaged over the processes, which gives the
    one-process value."""
    if len(micro_batches) == 1:
        with record_function(FORWARD):
            rows = model_rows(objective, model, *micro_batches[0])
        with record_function(LOSS):
            losses = objective(rows)
        del rows  # as before the phases were split: the features (CoCa's logits) not held past the backward
        with record_function(BACKWARD):
            accelerator.backward(total_loss(losses))
    else:
        losses = _accumulate(model, micro_batches, objective, accelerator)
    with record_function(OPTIMIZER):
        if grad_clip_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale(parallel.unwrap(model))
    losses = {"loss": total_loss(losses).detach(), **{name: value.detach() for name, value in losses.items()}}
    if objective.mean_over_processes and accelerator.num_processes > 1:
        mean = accelerator.reduce(torch.stack(list(losses.values())), reduction="mean")  # one device collective
        losses = dict(zip(losses, mean.unbind()))
    return losses

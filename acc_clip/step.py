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

Several processes: ranks must hold equally many samples for the feature all-gather, and a rank
that skipped a corrupt sample holds fewer; `agree_batch_sizes` trims every rank to the smallest,
agreed over a CPU process group so the device is not synchronised.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch

from acc_clip.data.common import Batch
from acc_clip.errors import AccClipError
from acc_clip.loss import contrastive_loss
from acc_clip.model import clamp_logit_scale

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (images, texts) on the device


def _features(model, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = model(images, texts)
    return out["image_features"], out["text_features"], out["logit_scale"]


def _accumulate(model, micro_batches: list[MicroBatch], loss_fn, accelerator) -> torch.Tensor:
    with torch.no_grad():
        cached = [_features(model, images, texts)[:2] for images, texts in micro_batches]
    last = len(micro_batches) - 1
    for j, (images, texts) in enumerate(micro_batches):
        with accelerator.no_sync(model) if j < last else nullcontext():
            image_features, text_features, logit_scale = _features(model, images, texts)
            if j < last:
                logit_scale = logit_scale.detach()  # its gradient comes once, from the last micro-batch
            all_image = torch.cat([f[0] for f in cached[:j]] + [image_features] + [f[0] for f in cached[j + 1:]])
            all_text = torch.cat([f[1] for f in cached[:j]] + [text_features] + [f[1] for f in cached[j + 1:]])
            loss = contrastive_loss(loss_fn, all_image, all_text, logit_scale)
            accelerator.backward(loss)
    return loss


def train_step(model, micro_batches: list[MicroBatch], loss_fn, accelerator, optimizer,
               grad_clip_norm: Optional[float] = None) -> torch.Tensor:
    """Runs forward, backward and the optimizer update; returns the loss of the whole step (detached,
    on the device): under --local-loss each rank's loss covers its own rows, so it is averaged
    over the ranks, which gives the one-process loss."""
    if len(micro_batches) == 1:
        image_features, text_features, logit_scale = _features(model, *micro_batches[0])
        loss = contrastive_loss(loss_fn, image_features, text_features, logit_scale)
        accelerator.backward(loss)
    else:
        loss = _accumulate(model, micro_batches, loss_fn, accelerator)
    if grad_clip_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clamp_logit_scale(accelerator.unwrap_model(model))
    loss = loss.detach()
    if loss_fn.local_loss and accelerator.num_processes > 1:
        loss = accelerator.reduce(loss, reduction="mean")  # a device collective: no host sync
    return loss


def _trim(batch: Batch, size: int) -> Batch:
    return Batch(batch.images[:size], batch.texts[:size], batch.indices[:size], batch.num_bad)


def agree_batch_sizes(micro_batches: list[Batch], group) -> tuple[list[Batch], int]:
    """Cut micro-batch j on every rank to the smallest size any rank holds for it, and drop
    micro-batches left empty; returns the batches and how many good samples were cut here.

    `group` is a CPU (gloo) process group (`device.host_process_group`), None with one process:
    sizes live on the host, so agreeing costs one tiny all-reduce and no device sync. Every rank
    must call this once per step."""
    sizes = torch.tensor([len(batch.indices) for batch in micro_batches], dtype=torch.long)
    held = int(sizes.sum())
    if group is not None:
        torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MIN, group=group)
    kept = [_trim(batch, size) for batch, size in zip(micro_batches, sizes.tolist()) if size > 0]
    if not kept:
        read = sum(len(batch.indices) + batch.num_bad for batch in micro_batches)
        raise AccClipError(f"no usable sample in this optimizer step on some process ({read} read here): "
                           "every sample of a micro-batch was missing or corrupt; see the warnings above")
    return kept, held - int(sizes.sum())

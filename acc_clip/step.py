"""One optimizer step: a plain step, or k micro-batches accumulated with contrastive-exact semantics.

Plain accumulation (Accelerate's `accumulate()`) would give each micro-batch only its own b-1
negatives. Here, as in open_clip_train, every micro-batch is first encoded without gradient; then
each is encoded again with gradient and its loss is taken against the cached features of all the
others, so the summed gradient equals that of one batch k times larger. Unlike open_clip 3.3 the
non-final backwards run under `no_sync`: gradients are all-reduced once per update, not k times.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch

from acc_clip.loss import contrastive_loss
from acc_clip.model import clamp_logit_scale

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (images, texts) on the device


def _features(model, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = model(images, texts)
    return out["image_features"], out["text_features"], out["logit_scale"]


def train_step(model, micro_batches: list[MicroBatch], loss_fn, accelerator, optimizer,
               grad_clip_norm: Optional[float] = None) -> torch.Tensor:
    """Runs forward, backward and the optimizer update; returns the loss (detached, on the device)."""
    if len(micro_batches) == 1:
        image_features, text_features, logit_scale = _features(model, *micro_batches[0])
        loss = contrastive_loss(loss_fn, image_features, text_features, logit_scale)
        accelerator.backward(loss)
    else:
        with torch.no_grad():
            cached = [_features(model, images, texts)[:2] for images, texts in micro_batches]
        last = len(micro_batches) - 1
        for j, (images, texts) in enumerate(micro_batches):
            with accelerator.no_sync(model) if j < last else nullcontext():
                image_features, text_features, logit_scale = _features(model, images, texts)
                all_image = torch.cat([f[0] for f in cached[:j]] + [image_features] + [f[0] for f in cached[j + 1:]])
                all_text = torch.cat([f[1] for f in cached[:j]] + [text_features] + [f[1] for f in cached[j + 1:]])
                loss = contrastive_loss(loss_fn, all_image, all_text, logit_scale)
                accelerator.backward(loss)
    if grad_clip_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clamp_logit_scale(accelerator.unwrap_model(model))
    return loss.detach()

"""FLOPs of a training step of an open_clip model, per sample, counted by torch's own FLOP counter
(torch.utils.flop_counter.FlopCounterMode).

What is counted: the model's forward, `model(images, texts)`, and the backward of a scalar made from its
outputs, once per sample; matrix products, attention and convolutions, as the counter counts them (the other
operations add little arithmetic and are bound by memory, not by the matrix units that peak figures
describe). Weights whose requires_grad is False (a tower locked with --lock-image or --lock-text) get no
gradient, as in training. Not counted: the loss (its batch x batch logits are not the model), the no-grad
forward that contrastive-exact accumulation (--accum-freq > 1) adds, a distillation teacher's forward, and
the recomputation of --grad-checkpointing. MFU ("model FLOPs utilization", as the PaLM paper defines it)
counts the model's own FLOPs of a step once, whatever an implementation spends on top, so work done twice
shows as a lower MFU rather than as more work, and two trainers of one model compare like for like.

The count runs on the meta device, on a storage-free copy of the model and stand-ins of its parameters and
buffers (torch.func.functional_call), so even ViT-L costs about a second and no memory, and the real model is not
touched: its parameters, buffers (batch norm's running statistics), .grad, requires_grad flags and the RNG
state are as they were. Pass the plain model, before DDP/FSDP wrapping or torch.compile: a wrapper's hooks
would run.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

IMAGE_CHANNELS = 3  # open_clip's image towers take RGB
GRAD_CHECKPOINTING = "grad_checkpointing"  # open_clip's and timm's switch, an attribute of the blocks' holder


@dataclass(frozen=True)
class FlopCount:
    forward: float  # FLOPs per sample of the model's forward (in the mode the model is in: training)
    backward: float  # FLOPs per sample of its backward

    @property
    def total(self) -> float:
        return self.forward + self.backward


def count_train_flops(
    model: torch.nn.Module, *, image_size: int | tuple[int, int], context_length: int, batch: int = 2
) -> FlopCount:
    """Per-sample FLOPs of `model(images, texts)` and its backward for images of `image_size` (an int:
    square; else (height, width)) and texts of `context_length` tokens, counted over a batch of `batch`."""
    height, width = image_height_width(image_size)
    if context_length < 1:
        raise ValueError(f"context_length {context_length}: expected at least 1 token")
    if batch < 1:
        raise ValueError(f"batch {batch}: expected at least 1 sample")
    model = storage_free_copy(model)  # what the forward does to its modules stays off the real model
    stand_ins = meta_stand_ins(model)
    images = torch.empty(batch, IMAGE_CHANNELS, height, width, device="meta")
    texts = torch.zeros(batch, context_length, dtype=torch.long, device="meta")  # token values do not matter
    leaves = [tensor for tensor in stand_ins.values() if tensor.requires_grad]
    forward, backward = counter(), counter()
    # fork_rng: open_clip's patch dropout draws from the CPU generator even for meta inputs.
    with without_grad_checkpointing(model), torch.random.fork_rng(devices=[]), torch.enable_grad():
        try:
            with forward:
                outputs = functional_call(model, stand_ins, (images, texts))
            loss = differentiable_sum(outputs)
            if loss is not None and leaves:
                with backward:
                    torch.autograd.grad(loss, leaves, allow_unused=True)
        except (RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError) as error:
            # No fallback to fake tensors: under FakeTensorMode an in-place update of a tensor the model holds as a
            # plain attribute reaches the real tensor (checked with torch 2.14). Every open_clip model tried runs on
            # meta: RN50, ViT-B-32, ViT-B-16, ViT-L-14, EVA02-B-16, ViT-B-16-SigLIP, convnext_tiny (timm),
            # coca_ViT-B-32, patch dropout.
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise RuntimeError(
                f"counting the FLOPs of {type(model).__name__} on the meta device failed: {first_line}"
            ) from error
    return FlopCount(forward.get_total_flops() / batch, backward.get_total_flops() / batch)


def describe(count: FlopCount) -> str:
    """One line, e.g. "54.5 GFLOP per sample (forward 18.2, backward 36.3)"."""
    return f"{gflop(count.total)} GFLOP per sample (forward {gflop(count.forward)}, backward {gflop(count.backward)})"


def gflop(flops: float) -> str:
    value = flops / 1e9
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"  # tiny test models keep their digits


def image_height_width(image_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(side, int) and side >= 1 for side in size):
        raise ValueError(f"image_size {image_size!r}: expected a positive int or (height, width)")
    return size[0], size[1]


def storage_free_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device (no storage, so cheap even for
    ViT-L). The count runs on it, because a forward may change its modules: peft's LoRA on the packed attention
    weight (model/lora.py) registers a parametrization for each forward and removes it after, which under
    functional_call's stand-ins left the real model's weight registered as a buffer."""
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = torch.nn.Parameter(meta_like(parameter), requires_grad=parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = meta_like(buffer)
    return copy.deepcopy(model, memo)


def meta_stand_ins(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A storage-free tensor for every parameter and buffer, by name: the same shape (a sharded DTensor's
    global one), requires_grad kept, floating point as float32 (FLOPs do not depend on the dtype, and one
    dtype spares a model cast to fp16 from meeting float32 inputs). Tied weights appear once, under their
    first name; functional_call ties the others to it."""
    stand_ins = {}
    for name, parameter in model.named_parameters():
        stand_ins[name] = meta_like(parameter).requires_grad_(parameter.requires_grad)
    for name, buffer in model.named_buffers():
        stand_ins[name] = meta_like(buffer)
    return stand_ins


def meta_like(tensor: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
    return torch.empty(tuple(tensor.shape), dtype=dtype, device="meta")


@contextlib.contextmanager
def without_grad_checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """Turns off open_clip's (and timm's) `grad_checkpointing` switches while counting, and back on after:
    the recomputation it adds to the backward is no model FLOP, and it would run after functional_call
    returned, on the real weights."""
    switched = [module for module in model.modules() if getattr(module, GRAD_CHECKPOINTING, False) is True]
    for module in switched:
        setattr(module, GRAD_CHECKPOINTING, False)
    try:
        yield
    finally:
        for module in switched:
            setattr(module, GRAD_CHECKPOINTING, True)


def differentiable_sum(outputs: Any) -> torch.Tensor | None:
    """One scalar from every floating-point output that needs a gradient (a dict's values, a tuple's items,
    nested), or None when none does (every weight frozen). Its backward reaches every weight that the
    training loss reaches: each output feeds the loss."""
    tensors = list(differentiable_tensors(outputs))
    return torch.stack([tensor.float().sum() for tensor in tensors]).sum() if tensors else None


def differentiable_tensors(outputs: Any) -> Iterator[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        if outputs.is_floating_point() and outputs.requires_grad:
            yield outputs
    elif isinstance(outputs, dict):
        for value in outputs.values():
            yield from differentiable_tensors(value)
    elif isinstance(outputs, (list, tuple)):
        for value in outputs:
            yield from differentiable_tensors(value)


def counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


def conv_backward_flops(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    **_: Any,
) -> int:
    """A convolution's backward: the input's gradient and the weight's each take as many multiply-adds as
    the forward (every pair of an output point and a weight element, once). torch 2.14's own formula leaves
    the groups out of the weight's gradient, counting a depthwise convolution's backward `groups` times over
    (a fix is proposed upstream, pytorch/pytorch#183405); the weight's shape already holds in/groups."""
    points = x_shape[2:] if transposed else grad_out_shape[2:]  # where the kernel is applied
    forward = 2 * x_shape[0] * math.prod(w_shape) * math.prod(points)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))

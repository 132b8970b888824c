"""An exponential moving average (EMA) of the weights, as timm's `ModelEmaV3` keeps one: after every optimizer
step (not per micro-batch) each averaged tensor moves toward the weights by `1 - decay`, with timm's warm-up
of the decay (`ema_decay`). Trainable parameters and floating buffers are averaged (batch norm's running
statistics included, as timm does by default: an RN50's EMA evaluates with statistics of the averaged weights'
era); frozen weights are their own average and are not copied; integer buffers (batch norm's step count) are copied.

Under FSDP2 the EMA holds a copy of each *sharded* parameter (a DTensor with the parameter's placement) and
updates this process's shard only: nothing is gathered, except for evaluation (`in_place_of`, under the
caller's `parallel.gathered`) and for whole copies (`whole_tensors`: epoch files). A checkpoint keeps the
EMA beside the weights through the manager's one hook (`CheckpointManager.keep`), sharded like them under
FSDP. With `--ema-device cpu` (DDP or one process) the average lives in host memory."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from acc_clip.config.schema import Domain, Needs, Section, option
from acc_clip.errors import UsageError
from acc_clip.model.weights import plain_key
from acc_clip.runtime.parallel import SCALAR_PARAMETERS, full_tensor, local_tensor, unwrap

log = logging.getLogger(__name__)

OPEN_UNIT = Domain("within (0, 1)", lambda v: 0 < v < 1, ("0", "1", "1.5", "-0.1", "nan"))
EMA = Needs("--ema-decay", lambda s: s.ema_decay is not None)
# timm's ModelEmaV3 warm-up, with its defaults (warmup_gamma 1, warmup_power 2/3).
WARMUP_GAMMA, WARMUP_POWER = 1.0, 2 / 3
KEY = "ema"  # its key in the manifest, its folder or file in a step checkpoint


@dataclass
class EmaOptions(Section):
    title: ClassVar[str] = "ema"
    ema_decay: float | None = option(
        None,
        "keep an exponential moving average of the weights with this decay, updated after every optimizer step; "
        "evaluated beside the weights (results keys ema_*), saved in checkpoints, exported by `acc-clip export "
        "--ema` (off by default)",
        domain=OPEN_UNIT,
        train_only=True,
    )
    ema_warmup: bool | None = option(
        None,
        "timm ModelEmaV3's warm-up of the decay: 1 - (1 + n)^(-2/3) at update n, capped at --ema-decay "
        "(default on; --no-ema-warmup: --ema-decay from the second update, the first copies the weights)",
        tristate=True,
        needs=EMA,
        train_only=True,
    )
    ema_device: str = option(
        "same",
        "where the EMA lives: same (the weights' device; under FSDP a shard like theirs) or cpu (host memory, "
        "to save device memory under DDP; not with FSDP, where it is sharded already)",
        choices=("same", "cpu"),
        needs=EMA,
        train_only=True,
    )

    @property
    def enabled(self) -> bool:
        return self.ema_decay is not None

    @property
    def warmup(self) -> bool:
        return self.ema_warmup is not False

    def settings(self) -> dict:
        """What a checkpoint's manifest records of the EMA ({} when off)."""
        return {"decay": self.ema_decay, "warmup": self.warmup} if self.enabled else {}


def ema_decay(update: int, decay: float, warmup: bool) -> float:
    """The decay of the `update`-th EMA update (1-based: the optimizer steps done), as timm's
    ModelEmaV3.get_decay(update) with update_after_step 0 and min_decay 0: the first update copies
    the weights (decay 0), then 1 - (1 + n)^(-2/3) for n = update - 1, capped at `decay`, with the warm-up."""
    n = update - 1
    if n <= 0:
        return 0.0
    if not warmup:
        return decay
    return min(1 - (1 + n / WARMUP_GAMMA) ** -WARMUP_POWER, decay)


def averaged(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the EMA follows, by plain name: the parameters that train and the persistent buffers (those a state
    dict holds). A frozen parameter (LoRA's base, a locked tower) is its own average: holding a copy of it would
    only double its memory, so whole copies (epoch files, export) take it from the weights."""
    tensors: dict[str, torch.Tensor] = {plain_key(name): p for name, p in module.named_parameters() if p.requires_grad}
    for prefix, owner in module.named_modules():
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                tensors[plain_key(f"{prefix}.{name}" if prefix else name)] = buffer
    return tensors


class WeightsEma:
    """The EMA of `model`'s weights (the wrapped model; see the module docstring)."""

    name = KEY

    def __init__(self, model: torch.nn.Module, options: EmaOptions, *, sharded: bool):
        if options.ema_decay is None:
            raise ValueError("WeightsEma needs --ema-decay")
        if sharded and options.ema_device == "cpu":
            raise UsageError("--ema-device cpu under FSDP: not supported (the EMA is sharded like the weights)")
        self.model, self.decay, self.warmup = model, options.ema_decay, options.warmup
        self.device = torch.device("cpu") if options.ema_device == "cpu" else None
        with torch.no_grad():
            self.averages = {name: self._copy(value) for name, value in averaged(unwrap(model)).items()}

    def _copy(self, value: torch.Tensor) -> torch.Tensor:
        # Low-precision weights (--precision pure_bf16, fp16) are averaged in float32: (1 - decay) * (w - ema)
        # is below their resolution and would round to nothing (timm's ModelEmaV3 says so too).
        dtype = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
        return value.detach().to(self.device or value.device, dtype, copy=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averages, live (DTensors under FSDP): a checkpoint saves them and loads into them."""
        return self.averages

    def _pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(this process's part of the average, of the weight), for every averaged tensor."""
        weights = averaged(unwrap(self.model))
        for name, average in self.averages.items():
            yield local_tensor(average), local_tensor(weights[name]).detach()

    @torch.no_grad()
    def update(self, global_step: int) -> float:
        """Move the averages toward the weights after optimizer step `global_step` (1-based); returns the decay."""
        decay = ema_decay(global_step, self.decay, self.warmup)
        floats, weights = [], []
        for average, weight in self._pairs():
            if average.is_floating_point():
                floats.append(average)
                weights.append(weight.to(average.device, average.dtype))
            else:
                average.copy_(weight)
        if floats:
            torch._foreach_lerp_(floats, weights, 1.0 - decay)
        return decay

    @torch.no_grad()
    def copy_weights(self) -> None:
        """Start the average afresh from the weights as they are (a resume without a saved EMA)."""
        for average, weight in self._pairs():
            average.copy_(weight)

    @contextmanager
    def in_place_of(self, model: torch.nn.Module) -> Iterator[None]:
        """The averages in the weights' place (this process's shards under FSDP) for the block, the weights
        put back bit for bit after it: evaluation runs the same code on the EMA. Enter it before gathering."""
        pairs = list(self._pairs())
        with torch.no_grad():
            kept = [weight.clone() for _, weight in pairs]
            for average, weight in pairs:
                weight.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, weight), saved in zip(pairs, kept):
                    weight.copy_(saved)

    def whole_tensors(self) -> dict[str, torch.Tensor]:
        """The whole averages on the CPU, open_clip's 0-d temperature included (a collective under FSDP)."""
        whole = {}
        for name, average in self.averages.items():
            value = full_tensor(average).detach().cpu()
            whole[name] = value.reshape(()) if name in SCALAR_PARAMETERS and value.shape == (1,) else value
        return whole


def resume_decision(saved: dict, now: dict, source: str) -> bool:
    """Whether a resume loads the checkpoint's EMA: only when both it and this run have one, said in one line
    whenever they differ. A checkpoint without EMA under --ema-decay starts the EMA from the resumed weights;
    one with EMA in a run without --ema-decay leaves it; another decay or warm-up continues the saved EMA with
    this run's settings."""
    if not saved and now:
        log.warning("%s: saved without an EMA; the EMA (--ema-decay %s) starts from its weights", source, now["decay"])
    elif saved and not now:
        log.warning(
            "%s: holds an EMA of the weights (decay %s); this run has no --ema-decay, so it is not kept",
            source,
            saved["decay"],
        )
    elif saved != now:
        log.warning(
            "%s: its EMA was kept with %s, this run's settings are %s; the saved EMA goes on with them",
            source,
            saved,
            now,
        )
    return bool(saved) and bool(now)

"""The optimizer and its learning-rate schedule, as open_clip_train builds them: AdamW over two
parameter groups (no weight decay for gains, biases and the temperature), or any timm optimizer, and
a schedule that is a function of the global step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

from acc_clip.config.schema import NON_NEGATIVE, POSITIVE_FINITE, Domain, Needs, Section, option
from acc_clip.errors import UsageError

BETA = Domain("within [0, 1)", lambda v: 0 <= v < 1, ("1.0", "1.5", "-0.1"))
SCHEDULERS = ("cosine", "const", "const-cooldown")
TIMM = Needs("a timm optimizer (--opt timm/NAME), as in open_clip", lambda s: s.uses_timm_optimizer)
ADAMW = Needs("--opt adamw", lambda s: not s.uses_timm_optimizer)
SCHEDULE = Needs("a schedule (it is off under --skip-scheduler)", lambda s: not s.skip_scheduler)
COOLDOWN = Needs("--lr-scheduler const-cooldown", lambda s: s.lr_scheduler == "const-cooldown" and not s.skip_scheduler)


@dataclass
class OptimizerOptions(Section):
    title: ClassVar[str] = "optimizer"
    opt: str = option("adamw", "optimizer: adamw, or any timm optimizer as timm/NAME (e.g. timm/sgd, timm/lamb)")
    # None: open_clip_train's defaults for the model (get_default_params: beta2 0.98, eps 1e-6 for a model whose
    # name holds "vit", else 0.999, 1e-8; lr 5e-4), filled in by train/config.py, or the timm optimizer's own.
    lr: float | None = option(None, "peak learning rate (default 5e-4)", domain=POSITIVE_FINITE)
    beta1: float | None = option(None, "AdamW beta1 (default 0.9)", domain=BETA)
    beta2: float | None = option(
        None, "AdamW beta2 (default 0.98 for ViT models, else 0.999, as open_clip_train)", domain=BETA
    )
    eps: float | None = option(
        None, "AdamW epsilon (default 1e-6 for ViT models, else 1e-8, as open_clip_train)", domain=POSITIVE_FINITE
    )
    momentum: float | None = option(None, "momentum, for timm optimizers", domain=NON_NEGATIVE, needs=TIMM)
    wd: float = option(0.2, "weight decay (not applied to gains, biases, logit_scale)", domain=NON_NEGATIVE)
    fused_adamw: bool | None = option(
        None,
        "AdamW's fused kernel (default: on where torch has one, CUDA and the "
        "CPU from torch 2.4; --no-fused-adamw: open_clip_train's unfused "
        "update, the same values up to rounding)",
        tristate=True,
        needs=ADAMW,
    )
    warmup: int = option(10000, "linear warm-up optimizer steps", domain=NON_NEGATIVE, needs=SCHEDULE)
    lr_scheduler: str = option("cosine", "cosine, const or const-cooldown", choices=SCHEDULERS, needs=SCHEDULE)
    skip_scheduler: bool = option(False, "no schedule: the learning rate stays at --lr")
    epochs_cooldown: int | None = option(
        None, "cool-down epochs at the end, for const-cooldown", domain=NON_NEGATIVE, needs=COOLDOWN
    )
    lr_cooldown_end: float = option(
        0.0, "learning rate at the end of the cool-down", domain=NON_NEGATIVE, needs=COOLDOWN
    )
    lr_cooldown_power: float = option(1.0, "cool-down curve power (1 = linear)", domain=POSITIVE_FINITE, needs=COOLDOWN)
    grad_clip_norm: float | None = option(None, "clip the global gradient norm to this value", domain=POSITIVE_FINITE)

    @property
    def uses_timm_optimizer(self) -> bool:
        return self.opt.lower().startswith("timm/")

    def check(self) -> None:
        if self.opt.lower() != "adamw" and not self.uses_timm_optimizer:
            raise UsageError(f"--opt {self.opt}: expected adamw or a timm optimizer as timm/NAME")
        if self.uses_timm_optimizer:
            if self.lr is None:
                raise UsageError(f"--opt {self.opt} needs --lr: the schedule starts from it (open_clip_train's too)")
            if (self.beta1 is None) != (self.beta2 is None):
                raise UsageError(f"--opt {self.opt}: give both --beta1 and --beta2 or neither (as open_clip_train)")
        if self.lr_scheduler == "const-cooldown" and self.epochs_cooldown is None:
            raise UsageError("--lr-scheduler const-cooldown needs --epochs-cooldown")

    def describe(self) -> str:
        """The optimizer settings in force, open_clip's model-derived defaults included."""
        given = {
            "lr": self.lr,
            "betas": (self.beta1, self.beta2) if self.beta1 is not None else None,
            "eps": self.eps,
            "weight decay": self.wd,
            "momentum": self.momentum,
        }
        return (
            f"{self.opt}: "
            + ", ".join(f"{k} {v}" for k, v in given.items() if v is not None)
            + (" (timm's defaults for the rest)" if self.uses_timm_optimizer else "")
        )


def resolve_defaults(options: OptimizerOptions, model_name: str) -> None:
    """open_clip_train's rule: lr, beta1, beta2 and eps left unset take `get_default_params(model)` (a model
    whose name holds "vit": beta2 0.98, eps 1e-6), except under a timm optimizer, which keeps its own."""
    if options.uses_timm_optimizer:
        return
    from open_clip_train.params import get_default_params

    for key, value in get_default_params(model_name).items():
        if getattr(options, key) is None:
            setattr(options, key, value)


def is_gain_or_bias(name: str, parameter: torch.Tensor) -> bool:
    """open_clip_train's rule: no weight decay for gains, biases, norms and the temperature."""
    return parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in trainable if is_gain_or_bias(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in trainable if not is_gain_or_bias(n, p)], "weight_decay": weight_decay},
    ]


def fused_adamw_available(device_type: str) -> bool:
    """torch has fused AdamW kernels for CUDA, and for the CPU from torch 2.4; other devices get the default."""
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return device_type == "cuda" or (device_type == "cpu" and (major, minor) >= (2, 4))


def create_timm_optimizer(model: torch.nn.Module, options: OptimizerOptions) -> torch.optim.Optimizer:
    """`--opt timm/NAME` as open_clip_train builds it: timm's create_optimizer_v2 on the model (timm's own
    weight-decay grouping), with betas, momentum and eps only where given."""
    try:
        from timm.optim import create_optimizer_v2
    except ImportError:
        raise UsageError(f"--opt {options.opt} needs the timm package (pip install timm)") from None
    extra: dict = {"betas": (options.beta1, options.beta2)} if options.beta1 is not None else {}
    if options.momentum is not None:
        extra["momentum"] = options.momentum
    if options.eps is not None:
        extra["eps"] = options.eps
    try:
        return create_optimizer_v2(model, options.opt.split("/", 1)[1], lr=options.lr, weight_decay=options.wd, **extra)
    except (AssertionError, TypeError, ValueError) as error:  # timm's ways of saying "no such optimizer / option"
        raise UsageError(f"--opt {options.opt}: {error}") from None


def create_optimizer(model: torch.nn.Module, options: OptimizerOptions, device_type: str) -> torch.optim.Optimizer:
    if options.uses_timm_optimizer:
        return create_timm_optimizer(model, options)
    # The fused kernel makes one pass over each parameter instead of a dozen element-wise ops: on the
    # CPU it cuts the tiny model's AdamW step about fivefold (docs/performance.md).
    fused = fused_adamw_available(device_type) if options.fused_adamw is None else options.fused_adamw
    # lr, betas and eps are set by now: resolve_defaults fills what the user left out.
    lr, beta1, beta2, eps = (cast(float, value) for value in (options.lr, options.beta1, options.beta2, options.eps))
    return torch.optim.AdamW(
        parameter_groups(model, options.wd), lr=lr, betas=(beta1, beta2), eps=eps, fused=fused or None
    )


def create_lr_schedule(
    optimizer: torch.optim.Optimizer, options: OptimizerOptions, *, epochs: int, steps_per_epoch: int
) -> Callable[[int], float]:
    """A function of the global optimizer step that sets the learning rate: stateless, so resuming is
    only a matter of knowing the step."""
    total_steps = steps_per_epoch * epochs
    lr = float(options.lr)  # type: ignore[arg-type]  # resolved before any optimizer is built
    if options.skip_scheduler:  # open_clip_train's --skip-scheduler: the optimizer keeps --lr throughout
        return lambda step: lr
    if options.lr_scheduler == "cosine":
        return cosine_lr(optimizer, lr, options.warmup, total_steps)
    if options.lr_scheduler == "const":
        return const_lr(optimizer, lr, options.warmup, total_steps)
    cooldown_steps = steps_per_epoch * int(options.epochs_cooldown or 0)
    return const_lr_cooldown(
        optimizer, lr, options.warmup, total_steps, cooldown_steps, options.lr_cooldown_power, options.lr_cooldown_end
    )

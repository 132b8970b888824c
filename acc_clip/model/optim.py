"""The optimizer and its learning-rate schedule, as open_clip_train builds them: AdamW over two
parameter groups (no weight decay for gains, biases and the temperature), or any timm optimizer, and
a schedule that is a function of the global step. With open_clip main's fine-tuning flags (layer-wise
learning-rate decay, --wd-exclude, --opt-fallback-list) the groups are main's (model/param_groups.py), and
the schedule sets each group's learning rate times its lr_scale."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

from acc_clip.config.schema import NON_NEGATIVE, POSITIVE_FINITE, Domain, Needs, Section, option
from acc_clip.errors import UsageError
from acc_clip.model.param_groups import decay_in_force, decayed_layers, main_rule_groups

BETA = Domain("within [0, 1)", lambda v: 0 <= v < 1, ("1.0", "1.5", "-0.1"))
SCHEDULERS = ("cosine", "const", "const-cooldown")
TIMM = Needs("a timm optimizer (--opt timm/NAME), as in open_clip", lambda s: s.uses_timm_optimizer)
ADAMW = Needs("--opt adamw", lambda s: not s.uses_timm_optimizer)
SCHEDULE = Needs("a schedule (it is off under --skip-scheduler)", lambda s: not s.skip_scheduler)
LAYER_DECAY = Domain("within (0, 1] (1 is off)", lambda v: 0 < v <= 1, ("0", "1.5", "-0.5", "nan"))
# An empty pattern can only come from YAML (`wd_exclude: [""]`): the generated command-line cases cannot give one.
GLOBS = Domain("non-empty glob patterns", lambda v: bool(v))
KEYWORDS = Domain(
    "key=value pairs whose keys are Python names", lambda v: all(str(k).isidentifier() for k in v), ("=1", "1x=2")
)
# --opt-kwargs keys that a flag of acc_clip's sets
OWNED_KWARGS = {
    "params": "the parameter-group flags",
    "lr": "--lr",
    "weight_decay": "--wd",
    "betas": "--beta1 and --beta2",
    "eps": "--eps",
    "momentum": "--momentum",
    "fused": "--fused-adamw",
}
TEXT_DECAY = Needs("--text-layer-decay", lambda s: decay_in_force(s.text_layer_decay) is not None)
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
    # open_clip main's fine-tuning flags (model/param_groups.py says which weight-decay rule applies when).
    image_layer_decay: float | None = option(
        None,
        "layer-wise lr decay for the image tower: lr * decay**(depth from the head), the projection at full lr "
        "(off when unset or 1.0), as open_clip main",
        domain=LAYER_DECAY,
        aliases=("visual_layer_decay",),
    )
    text_layer_decay: float | None = option(
        None, "layer-wise lr decay for the text tower, as --image-layer-decay", domain=LAYER_DECAY
    )
    text_pooler_own_group: bool = option(
        False,
        "give the text tower's readout pooler its own decay group below the head (open_clip main's; "
        "open_clip 3.3's text towers have no such pooler, so it changes nothing for them)",
        needs=TEXT_DECAY,
    )
    wd_exclude: list[str] = option(
        [], "parameter-name globs (fnmatch, full names) that skip weight decay, as open_clip main", domain=GLOBS
    )
    opt_kwargs: dict = option(
        {}, "extra optimizer keyword arguments, key=value (values as Python literals, else text)", domain=KEYWORDS
    )
    opt_fallback_list: list[str] | None = option(
        None,
        "parameter-name globs routed to a Muon-family timm optimizer's AdamW fallback (e.g. timm/nadamuon)",
        domain=GLOBS,
        needs=TIMM,
    )

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
        self.check_opt_kwargs()
        if self.fallback_list and not self.uses_timm_optimizer:  # main refuses it too
            raise UsageError(
                f"--opt-fallback-list applies to Muon-family timm optimizers (timm/nadamuon), not {self.opt}"
            )

    def check_opt_kwargs(self) -> None:
        """--opt-kwargs adds what no flag sets: a key with a flag of its own would be overridden by it (lr, by the
        schedule; weight_decay, by each group's) or override it silently (betas, eps, momentum)."""
        owned = {key: flag for key, flag in OWNED_KWARGS.items() if key in self.opt_kwargs}
        if owned:
            key, flag = next(iter(owned.items()))
            raise UsageError(f"--opt-kwargs {key}=...: set it with {flag} instead")
        fallback = self.opt_kwargs.get("fallback_list")
        if fallback is not None and not (
            isinstance(fallback, (list, tuple)) and all(isinstance(glob, str) for glob in fallback)
        ):
            raise UsageError(
                f"--opt-kwargs fallback_list={fallback!r}: expected a list of globs, e.g. fallback_list=['*.bias'] "
                "(or use --opt-fallback-list)"
            )

    @property
    def fallback_list(self) -> list[str] | None:
        """--opt-fallback-list, or opt_kwargs' fallback_list (main reads either)."""
        return self.opt_fallback_list or self.opt_kwargs.get("fallback_list")

    @property
    def uses_main_groups(self) -> bool:
        """open_clip main's groups and weight-decay rule: asked for by any of its fine-tuning flags."""
        decays = (decay_in_force(self.image_layer_decay), decay_in_force(self.text_layer_decay))
        return any(d is not None for d in decays) or bool(self.wd_exclude) or bool(self.fallback_list)

    def group_identity(self) -> dict:
        """What the optimizer's groups depend on beyond the model: a checkpoint records it, and a resume
        with other values is refused (the optimizer state maps to its groups by their order)."""
        return {
            "rule": "open_clip main" if self.uses_main_groups else "open_clip_train 3.3",
            "wd": self.wd,
            # 1.0 is no decay, as unset; the pooler flag changes no group of 3.3's towers; globs are a set
            "image_layer_decay": decay_in_force(self.image_layer_decay),
            "text_layer_decay": decay_in_force(self.text_layer_decay),
            "wd_exclude": sorted(self.wd_exclude),
            "opt_fallback_list": sorted(self.fallback_list) if self.fallback_list else None,
        }

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


def main_groups(model: torch.nn.Module, options: OptimizerOptions) -> list[dict]:
    """open_clip main's groups (model/param_groups.py), each starting at --lr times its lr_scale, as main's
    create_optimizer leaves them (so --skip-scheduler keeps the scales too)."""
    layers = decayed_layers(model, options.image_layer_decay, options.text_layer_decay)
    groups = main_rule_groups(model, options.wd, layers, options.wd_exclude, options.fallback_list)
    for group in groups:
        group["lr"] = float(options.lr) * group["lr_scale"]  # type: ignore[arg-type]  # resolved by now
    return groups


def extra_kwargs(options: OptimizerOptions) -> dict:
    """--opt-kwargs for the optimizer's constructor; fallback_list there is a grouping setting (main's too)."""
    return {key: value for key, value in options.opt_kwargs.items() if key != "fallback_list"}


def create_timm_optimizer(model_or_groups, options: OptimizerOptions) -> torch.optim.Optimizer:
    """`--opt timm/NAME` as open_clip_train builds it: timm's create_optimizer_v2 on the model (timm's own
    weight-decay grouping), or on main's pre-built groups as open_clip main hands them over, with betas,
    momentum and eps only where given, then --opt-kwargs."""
    try:
        from timm.optim import create_optimizer_v2
    except ImportError:
        raise UsageError(f"--opt {options.opt} needs the timm package (pip install timm)") from None
    extra: dict = {"betas": (options.beta1, options.beta2)} if options.beta1 is not None else {}
    if options.momentum is not None:
        extra["momentum"] = options.momentum
    if options.eps is not None:
        extra["eps"] = options.eps
    extra.update(extra_kwargs(options))
    name = options.opt.split("/", 1)[1]
    try:
        return create_optimizer_v2(model_or_groups, name, lr=options.lr, weight_decay=options.wd, **extra)
    # timm's and torch's ways of saying "no such optimizer / option / value"
    except (AssertionError, TypeError, ValueError, RuntimeError) as error:
        raise UsageError(f"--opt {options.opt}: {error}") from None


def create_optimizer(model: torch.nn.Module, options: OptimizerOptions, device_type: str) -> torch.optim.Optimizer:
    """open_clip_train 3.3's optimizer, or, with main's fine-tuning flags, main's groups (param_groups.py)."""
    groups = main_groups(model, options) if options.uses_main_groups else None
    if options.uses_timm_optimizer:
        return create_timm_optimizer(model if groups is None else groups, options)
    # The fused kernel makes one pass over each parameter instead of a dozen element-wise ops: on the
    # CPU it cuts the tiny model's AdamW step about fivefold (docs/performance.md).
    fused = fused_adamw_available(device_type) if options.fused_adamw is None else options.fused_adamw
    # lr, betas and eps are set by now: resolve_defaults fills what the user left out.
    lr, beta1, beta2, eps = (cast(float, value) for value in (options.lr, options.beta1, options.beta2, options.eps))
    settings = {"lr": lr, "betas": (beta1, beta2), "eps": eps, "fused": fused or None, **extra_kwargs(options)}
    try:
        return torch.optim.AdamW(parameter_groups(model, options.wd) if groups is None else groups, **settings)
    except (TypeError, ValueError, RuntimeError) as error:  # an --opt-kwargs key or value AdamW does not take
        given = " ".join(f"{key}={value}" for key, value in options.opt_kwargs.items())
        raise UsageError(f"--opt-kwargs {given}: {error}") from None


def per_group_lr(schedule: Callable[[int], float], optimizer: torch.optim.Optimizer) -> Callable[[int], float]:
    """The schedule, then each group's lr times its lr_scale (open_clip main's assign_learning_rate; 3.3's
    sets one lr for every group). Groups without a scale (3.3's) keep the schedule's lr exactly."""

    def set_lr(step: int) -> float:
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    return set_lr


def create_lr_schedule(
    optimizer: torch.optim.Optimizer, options: OptimizerOptions, *, epochs: int, steps_per_epoch: int
) -> Callable[[int], float]:
    """A function of the global optimizer step that sets the learning rate: stateless, so resuming is
    only a matter of knowing the step."""
    return per_group_lr(
        open_clip_schedule(optimizer, options, epochs=epochs, steps_per_epoch=steps_per_epoch), optimizer
    )


def open_clip_schedule(
    optimizer: torch.optim.Optimizer, options: OptimizerOptions, *, epochs: int, steps_per_epoch: int
) -> Callable[[int], float]:
    """open_clip_train 3.3's schedule for --lr-scheduler: sets one lr in every group and returns it."""
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

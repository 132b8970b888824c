"""LoRA through peft (`--lora-rank R`): low-rank adapters on the transformer blocks of the chosen towers,
the base weights frozen, and the merge that turns adapted weights back into plain open_clip weights.

What is adapted, per block (`--lora-targets`):
- `attn`: the packed q, k, v projection of open_clip's `nn.MultiheadAttention` (`in_proj_weight`, 3d x d), as
  one low-rank update of the whole packed weight, through peft's `target_parameters` (its ParamWrapper
  parametrizes the weight as W + B A * alpha / r for the forward, and leaves W untouched). peft's own
  `MultiheadAttention` LoRA (target the module) is not used: it adds the update into the frozen weights before
  each forward and subtracts it after, so the frozen weights drift by rounding at every step, and it swaps the
  parameters out of the module during the forward. The output projection is not adapted: the attention reads
  `out_proj.weight` directly, so a LoRA layer on `out_proj` would never be called;
- `mlp`: the MLP's `c_fc` and `c_proj` linear layers (peft's `lora.Linear`, with --lora-dropout).

Step checkpoints hold the whole adapted model (the frozen base and the adapters, under peft's names), so a
resume is exact whatever happens to the weights the run started from; `merge_lora` gives plain open_clip
weights from such a state dict (epoch files, `acc-clip export`)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from acc_clip.config.schema import POSITIVE, POSITIVE_FINITE, Domain, Needs, Section, option
from acc_clip.errors import UsageError

log = logging.getLogger(__name__)

TOWERS = ("image", "text")
TARGETS = ("attn", "mlp")
ADAPTER = "default"  # peft's adapter name: the keys read `...lora_A.default.weight`
BASE = ".base_layer"  # peft's prefix of the wrapped layer's own parameters
MLP_LAYERS = ("mlp.c_fc", "mlp.c_proj")
LORA = Needs("--lora-rank", lambda s: s.lora_rank is not None)


def _names_among(allowed: tuple[str, ...]):
    def accepts(value: str) -> bool:
        names = value.split(",")
        return bool(value) and all(name in allowed for name in names) and len(set(names)) == len(names)

    return accepts


@dataclass
class LoraOptions(Section):
    title: ClassVar[str] = "lora"
    lora_rank: int | None = option(
        None,
        "LoRA: train low-rank adapters of this rank (peft), the base weights frozen; off by default",
        domain=POSITIVE,
        train_only=True,
    )
    lora_alpha: float | None = option(
        None,
        "LoRA's scale numerator: updates are scaled by alpha / rank (default: the rank, so a scale of 1)",
        domain=POSITIVE_FINITE,
        needs=LORA,
        train_only=True,
    )
    lora_dropout: float = option(
        0.0,
        "dropout on the adapters' input (MLP layers only: peft has none for the packed attention weight)",
        domain=Domain("within [0, 1)", lambda v: 0 <= v < 1, ("1.0", "-0.1")),
        needs=LORA,
        train_only=True,
    )
    lora_towers: str = option(
        "image,text",
        "comma-separated towers to adapt: image, text",
        domain=Domain("comma-separated among image, text", _names_among(TOWERS), ("", "audio", "image,image")),
        needs=LORA,
        train_only=True,
    )
    lora_targets: str = option(
        "attn,mlp",
        "comma-separated layers of each transformer block to adapt: attn (the packed q, k, v projection), "
        "mlp (c_fc and c_proj)",
        domain=Domain("comma-separated among attn, mlp", _names_among(TARGETS), ("", "qkv", "mlp,mlp")),
        needs=LORA,
        train_only=True,
    )
    lora_train_logit_scale: bool = option(
        False, "LoRA: train the temperature (and SigLIP's bias) too; frozen by default", needs=LORA, train_only=True
    )

    @property
    def enabled(self) -> bool:
        return self.lora_rank is not None

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank or 0)

    def check(self) -> None:
        if self.enabled and self.lora_dropout > 0 and "attn" in self.lora_targets.split(","):
            raise UsageError(
                f"--lora-dropout {self.lora_dropout} with --lora-targets {self.lora_targets}: peft's LoRA on the "
                "packed attention weight has no dropout; use --lora-targets mlp or --lora-dropout 0"
            )


def lora_record(options: LoraOptions) -> dict[str, Any]:
    """What a checkpoint records of LoRA (its manifest's `lora`): what merging its weights needs; {} when off."""
    if not options.enabled:
        return {}
    return {
        "rank": options.lora_rank,
        "alpha": options.alpha,
        "towers": options.lora_towers,
        "targets": options.lora_targets,
    }


def tower_roots(model: torch.nn.Module, towers: list[str]) -> dict[str, str]:
    """Each chosen tower's module name: `visual` for the image tower; the text tower is open_clip's
    `transformer` (CLIP) or `text` (CustomTextCLIP, CoCa). CoCa's caption decoder is neither: it stays frozen."""
    children = dict(model.named_children())
    roots = {}
    for tower in towers:
        names = ["visual"] if tower == "image" else ["text", "transformer"]
        root = next((name for name in names if name in children), None)
        if root is None:
            raise UsageError(f"--lora-towers {tower}: {type(model).__name__} has no {tower} tower")
        roots[tower] = root
    return roots


def target_names(tower: torch.nn.Module, name: str, targets: list[str]) -> tuple[list[str], list[str]]:
    """The names, within `tower`, of the linear layers (peft's target_modules) and of the packed attention weights
    (peft's target_parameters) to adapt: those of its transformer blocks (`resblocks`). A tower without such
    blocks (a ResNet, a timm or Hugging Face tower) is one line."""
    modules: list[str] = []
    parameters: list[str] = []
    for module_name, module in tower.named_modules():
        if "resblocks." not in module_name:
            continue
        if "attn" in targets and isinstance(module, torch.nn.MultiheadAttention) and module._qkv_same_embed_dim:
            parameters.append(f"{module_name}.in_proj_weight")
        if "mlp" in targets and isinstance(module, torch.nn.Linear) and module_name.endswith(MLP_LAYERS):
            modules.append(module_name)
    if not modules and not parameters:
        raise UsageError(
            f"--lora-towers {name}: the {name} tower ({type(tower).__name__}) has no open_clip transformer blocks "
            f"with {' or '.join(targets)} layers to adapt (LoRA here adapts ViT and text transformers only; a "
            "ResNet tower is refused); choose the other tower with --lora-towers"
        )
    return modules, parameters


def check_rank(tower: torch.nn.Module, name: str, modules: list[str], parameters: list[str], rank: int) -> None:
    """A rank above a layer's smaller side adds parameters and no expressiveness (and a huge one would fail
    deep in torch): one line naming the narrowest layer."""
    names = [f"{module}.weight" for module in modules] + parameters
    shapes = {name: tuple(tower.get_parameter(name).shape) for name in names}
    narrowest = min(shapes, key=lambda key: min(shapes[key]))
    if rank > min(shapes[narrowest]):
        raise UsageError(
            f"--lora-rank {rank}: above the {name} tower's narrowest adapted layer ({narrowest}, "
            f"{shapes[narrowest]}); at most {min(shapes[narrowest])}"
        )


def apply_lora(model: torch.nn.Module, options: LoraOptions, *, fsdp: bool) -> None:
    """--lora-rank: peft's adapters injected into `model` in place (the model stays open_clip's class), every
    other weight frozen (the temperature too unless --lora-train-logit-scale); the counts logged. peft matches
    its targets by the end of their names, so each tower is injected on its own: the image tower's blocks and the
    text tower's have the same names within their towers."""
    if not options.enabled:
        return
    if fsdp:
        raise UsageError(
            "--lora-rank under FSDP: not supported (peft parametrizes the packed attention weight at every "
            "forward, which FSDP2's sharded parameters do not allow); train LoRA with DDP or one process"
        )
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UsageError("--lora-rank needs the peft package: pip install 'acc_clip[lora]'") from None
    targets = options.lora_targets.split(",")
    model.requires_grad_(False)
    for name, root in tower_roots(model, options.lora_towers.split(",")).items():
        tower = model.get_submodule(root)
        modules, parameters = target_names(tower, name, targets)
        check_rank(tower, name, modules, parameters, int(options.lora_rank or 0))
        config = LoraConfig(
            r=int(options.lora_rank or 0),
            lora_alpha=options.alpha,  # type: ignore[arg-type]  # annotated int; peft scales by alpha / r
            lora_dropout=options.lora_dropout,
            target_modules=modules,
            target_parameters=parameters or None,
            bias="none",
        )
        inject_adapter_in_model(config, tower, adapter_name=ADAPTER)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter(name) or (options.lora_train_logit_scale and is_temperature(name)))
    log.info("LoRA: %s", describe_trainable(model, options))


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def is_temperature(name: str) -> bool:
    return name in ("logit_scale", "logit_bias")


def describe_trainable(model: torch.nn.Module, options: LoraOptions) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (
        f"rank {options.lora_rank}, alpha {options.alpha:g} (scale {options.alpha / (options.lora_rank or 1):g}), "
        f"towers {options.lora_towers}, layers {options.lora_targets}; {trainable:,} trainable parameters of "
        f"{total:,} ({100 * trainable / total:.2f}%)"
    )


ADAPTER_KEY = re.compile(rf"^(?P<prefix>.+)\.lora_A\.{ADAPTER}\.weight$")


def merge_lora(state: dict[str, torch.Tensor], record: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """Plain open_clip weights from an adapted model's state dict: each adapted weight W becomes
    W + B A * alpha / rank (computed in fp32, stored in W's dtype), the adapters dropped and peft's
    `base_layer` names made plain again. A state dict without adapters is returned as it is."""
    adapted = {match["prefix"] for key in state if (match := ADAPTER_KEY.match(key))}
    if not adapted:
        return state
    if not record:
        raise UsageError("these weights hold LoRA adapters but their checkpoint does not record LoRA's rank and alpha")
    scale = float(record["alpha"]) / int(record["rank"])
    merged = {key.replace(BASE + ".", "."): value for key, value in state.items() if not is_adapter(key)}
    for prefix in adapted:
        target = adapted_weight(state, prefix)
        down, up = state[f"{prefix}.lora_A.{ADAPTER}.weight"], state[f"{prefix}.lora_B.{ADAPTER}.weight"]
        weight = merged[target]
        merged[target] = (weight.float() + (up.float() @ down.float()) * scale).to(weight.dtype)
    return merged


def adapted_weight(state: dict[str, torch.Tensor], prefix: str) -> str:
    """The plain name of the weight the adapter at `prefix` updates: a linear layer's `weight`, or the attention's
    packed `in_proj_weight`."""
    for name in ("weight", "in_proj_weight"):
        if f"{prefix}{BASE}.{name}" in state:
            return f"{prefix}.{name}"
    raise UsageError(f"LoRA adapter {prefix!r}: no weight of a linear layer or attention beside it")

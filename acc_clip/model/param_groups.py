"""The optimizer's parameter groups with open_clip main's meaning: layer-wise learning-rate decay per tower,
its weight-decay rule and `--wd-exclude` globs, and `--opt-fallback-list` for timm's Muon-family optimizers.

open_clip 3.3's towers have no `layer_groups()`; main's (src/open_clip/transformer.py, modified_resnet.py,
timm_model.py) are reproduced here by module structure, one function per tower class (`LAYER_GROUPS`), as
ordered (group name, member paths) from the input to the head. Group i of n gets `lr_scale = decay ** (n - 1 - i)`
(the head 1.0); parameters outside every group of a decayed tower (a ViT's attention pooler, CoCa's text decoder,
the temperature) keep 1.0, as in main's `open_clip_train/optim.py` (`layer_decay_param_groups`).

Which weight-decay rule applies (written down once, here):
- a run that asks for nothing new (no layer decay, no --wd-exclude, no --opt-fallback-list) keeps open_clip_train
  3.3's rule and groups (model/optim.py `parameter_groups`, or timm's own split under --opt timm/NAME), so it
  trains exactly as 3.3 does;
- a run that uses any of them gets main's rule: no decay for parameters with ndim <= 1, for the names each
  module lists in `no_weight_decay()` (positional and class embeddings) and for the --wd-exclude globs, with
  main's groups keyed by (lr_scale, no decay, fallback).
The start-up log names the rule in force and `param_groups.json` lists every parameter's group."""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from open_clip.model import CLIP
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import TextTransformer, VisionTransformer

from acc_clip.errors import UsageError
from acc_clip.io.atomic import write_atomically
from acc_clip.runtime.run_dir import PARAM_GROUPS_FILE

log = logging.getLogger(__name__)

LayerGroups = list[tuple[str, list[str]]]  # (group name, member paths relative to the tower), input -> head


# --- layer groups per tower class, as main's layer_groups() forms them ---------------------------------------


def present(tower: torch.nn.Module, *names: str) -> list[str]:
    """The names among `names` that the tower has (not None)."""
    return [name for name in names if getattr(tower, name, None) is not None]


def vision_transformer_groups(tower: torch.nn.Module) -> LayerGroups:
    """main's VisionTransformer.layer_groups: embeddings (patch conv, class and positional embeddings, ln_pre),
    one group per block (the last with ln_post), then proj."""
    groups = [("embeddings", present(tower, "conv1", "class_embedding", "positional_embedding", "ln_pre"))]
    groups += block_groups("transformer.resblocks", count_blocks(tower), "ln_post")
    return groups + [("proj", ["proj"])] if getattr(tower, "proj", None) is not None else groups


def modified_resnet_groups(tower: torch.nn.Module) -> LayerGroups:
    """main's ModifiedResNet.layer_groups: the three-conv stem, the four stages, then the attention pool."""
    groups = [("embeddings", ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3"])]
    groups += [(f"layer.{i}", [f"layer{i + 1}"]) for i in range(4)]
    return groups + [("proj", ["attnpool"])] if getattr(tower, "attnpool", None) is not None else groups


def text_transformer_groups(tower: torch.nn.Module) -> LayerGroups:
    """main's _text_layer_groups, for a TextTransformer or a CLIP that keeps its text tower at top level:
    embeddings (token, positional, cls), one group per block (the last with ln_final), then text_projection.
    The native tower has no readout pooler, so --text-pooler-own-group changes nothing here (as in main)."""
    embeddings = present(tower, "token_embedding", "positional_embedding", "cls_emb")
    groups = [("embeddings", embeddings)] if embeddings else []
    final_norm = "ln_final" if getattr(tower, "ln_final", None) is not None else None
    groups += block_groups("transformer.resblocks", count_blocks(tower), final_norm)
    return groups + [("proj", ["text_projection"])] if getattr(tower, "text_projection", None) is not None else groups


def count_blocks(tower: torch.nn.Module) -> int:
    """The residual blocks of the tower's `transformer` (none when it has no such transformer)."""
    return len(getattr(getattr(tower, "transformer", None), "resblocks", ()))


def block_groups(path: str, count: int, last_extra: str | None) -> LayerGroups:
    """One group per block, `layer.i`; the last block's group also holds `last_extra` (the final norm)."""
    groups = [(f"layer.{i}", [f"{path}.{i}"]) for i in range(count)]
    if groups and last_extra:
        groups[-1][1].append(last_extra)
    return groups


def timm_groups(tower: torch.nn.Module) -> LayerGroups:
    """main's TimmModel.layer_groups: the trunk's layers as timm's own group_matcher numbers them (what timm's
    layer decay uses), then the adapter head as proj when it has parameters."""
    from timm.models import group_parameters

    trunk, head = getattr(tower, "trunk"), getattr(tower, "head")  # noqa: B009 - Any, for the type checker
    by_layer = group_parameters(trunk, trunk.group_matcher())
    groups = [(f"layer.{layer}", [f"trunk.{name}" for name in by_layer[layer]]) for layer in sorted(by_layer)]
    has_head = next(head.parameters(), None) is not None
    return groups + [("proj", ["head"])] if has_head else groups


def hugging_face_refusal(tower: torch.nn.Module) -> LayerGroups:
    raise UsageError(
        "--text-layer-decay: not supported for a Hugging Face text tower in acc_clip (open_clip 3.3's "
        "HFTextEncoder); use it with open_clip's own text transformer, or lock the tower instead"
    )


def _registry() -> dict[type, Callable[[torch.nn.Module], LayerGroups]]:
    from open_clip.hf_model import HFTextEncoder
    from open_clip.timm_model import TimmModel

    return {
        VisionTransformer: vision_transformer_groups,
        ModifiedResNet: modified_resnet_groups,
        TextTransformer: text_transformer_groups,
        CLIP: text_transformer_groups,  # CLIP's text tower lives at its top level
        TimmModel: timm_groups,
        HFTextEncoder: hugging_face_refusal,
    }


LAYER_GROUPS = _registry()


def layer_groups_of(tower: torch.nn.Module, flag: str) -> LayerGroups:
    """The tower's layer groups, by its class (or the nearest registered base class); one line if unknown."""
    for kind in type(tower).__mro__:
        if kind in LAYER_GROUPS:
            return LAYER_GROUPS[kind](tower)
    raise UsageError(f"{flag}: no layer groups for a {type(tower).__name__} tower (as open_clip main has none)")


def text_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """main's choice: `model.text` (CustomTextCLIP, CoCa), else the model itself when it holds the text
    transformer at top level (CLIP)."""
    text = getattr(model, "text", None)
    if text is not None:
        return text
    return model if getattr(model, "token_embedding", None) is not None else None


def member_of(name: str, paths: Iterable[str]) -> bool:
    """A parameter name (relative to its tower) belongs to a member path: the parameter itself or below that
    module. Parts a wrapper inserts below the path (peft's `base_layer.`, `lora_A.default.`) change nothing."""
    return any(name == path or name.startswith(path + ".") for path in paths)


# --- placements: each parameter's layer, lr scale and weight decay ------------------------------------------------


@dataclass(frozen=True)
class Layer:
    tower: str  # "visual" or "text"
    name: str  # the group in the tower's layer groups: embeddings, layer.3, proj
    index: int  # its position from the input (0) up
    lr_scale: float


def tower_layers(tower: torch.nn.Module, tower_name: str, decay: float, flag: str) -> dict[int, Layer]:
    """id(parameter) -> its Layer, for every parameter of the tower inside one of its layer groups."""
    groups = layer_groups_of(tower, flag)
    count = len(groups)
    layers = {}
    for name, parameter in tower.named_parameters():
        for index, (group, paths) in enumerate(groups):
            if member_of(name, paths):
                layers[id(parameter)] = Layer(tower_name, group, index, decay ** (count - 1 - index))
                break
    return layers


def decay_in_force(decay: float | None) -> float | None:
    """A layer decay that decays, else None: unset and 1.0 both mean off (main's rule)."""
    return None if decay is None or decay == 1.0 else decay


def decayed_layers(model: torch.nn.Module, image_decay: float | None, text_decay: float | None) -> dict[int, Layer]:
    """Layers of the towers whose decay is in force (`decay_in_force`)."""
    layers: dict[int, Layer] = {}
    image_decay, text_decay = decay_in_force(image_decay), decay_in_force(text_decay)
    if text_decay is not None:
        tower = text_tower(model)
        if tower is None:
            raise UsageError("--text-layer-decay: this model has no text tower")
        layers.update(tower_layers(tower, "text", text_decay, "--text-layer-decay"))
    if image_decay is not None:
        visual = getattr(model, "visual", None)
        if visual is None:
            raise UsageError("--image-layer-decay: this model has no image tower (model.visual)")
        layers.update(tower_layers(visual, "visual", image_decay, "--image-layer-decay"))
    return layers


def declared_no_weight_decay(model: torch.nn.Module) -> tuple[set[str], list[str]]:
    """What the model's modules declare: exact names from every module's `no_weight_decay()` and globs from
    `no_weight_decay_patterns()` / `no_weight_decay_keywords()`, each prefixed by the module's path (main's
    walk over every submodule, so a timm trunk's pos_embed is found under its tower)."""
    names: set[str] = set()
    patterns: list[str] = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for method, to_pattern in (("no_weight_decay_patterns", "{}"), ("no_weight_decay_keywords", "*{}")):
            if callable(getattr(module, method, None)):
                patterns += [prefix + to_pattern.format(p) for p in getattr(module, method)()]
        if callable(getattr(module, "no_weight_decay", None)):
            names |= {prefix + name for name in module.no_weight_decay()}
    return names, list(dict.fromkeys(patterns))


def main_weight_decay_rule(model: torch.nn.Module, wd_exclude: list[str]) -> Callable[[str, torch.Tensor], bool]:
    """open_clip main's no-decay predicate: ndim <= 1, declared names, declared and --wd-exclude globs."""
    names, patterns = declared_no_weight_decay(model)
    patterns = patterns + list(wd_exclude)
    return lambda name, p: p.ndim <= 1 or name in names or any(fnmatch.fnmatchcase(name, g) for g in patterns)


def main_rule_groups(
    model: torch.nn.Module,
    weight_decay: float,
    layers: dict[int, Layer],
    wd_exclude: list[str],
    fallback: list[str] | None,
) -> list[dict]:
    """main's optimizer groups keyed by (lr_scale, no decay, fallback), each with its lr_scale and group_name;
    ordered head first (largest scale) under layer decay, else in the order the parameters come."""
    no_decay = main_weight_decay_rule(model, wd_exclude)
    buckets: dict[tuple, dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = layers[id(parameter)].lr_scale if id(parameter) in layers else 1.0
        excluded = no_decay(name, parameter)
        routed = any(fnmatch.fnmatchcase(name, g) for g in fallback or [])
        key = (round(scale, 8), excluded, routed)
        if key not in buckets:
            label = ("no_wd" if excluded else "wd") + ("/fallback" if routed else "")
            buckets[key] = {
                "params": [],
                "weight_decay": 0.0 if excluded else weight_decay,
                "lr_scale": scale,
                "group_name": f"lr_scale={scale:.4g}/{label}" if layers else label,
                **({"use_fallback": True} if routed else {}),
            }
        buckets[key]["params"].append(parameter)
    groups = list(buckets.values())
    return sorted(groups, key=lambda g: (-g["lr_scale"], g["group_name"])) if layers else groups


# --- the record: param_groups.json and the start-up summary ----------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """One parameter as the optimizer holds it: what param_groups.json lists."""

    name: str
    group: int  # index in optimizer.param_groups
    lr_scale: float
    weight_decay: float
    tower: str | None  # the decayed tower it belongs to, else None
    layer: str | None  # its layer group there (embeddings, layer.i, proj)
    layer_id: int | None  # that group's position from the input (0) up
    shape: list[int]


def placements(model: torch.nn.Module, optimizer: torch.optim.Optimizer, layers: dict[int, Layer]) -> list[Placement]:
    """Every parameter of the optimizer's groups, named by the (unwrapped) model, in the model's order."""
    where = {id(p): (index, group) for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
    result = []
    for name, parameter in model.named_parameters():
        if id(parameter) not in where:
            continue  # frozen: not in the optimizer
        index, group = where[id(parameter)]
        layer = layers.get(id(parameter))
        result.append(
            Placement(
                name,
                index,
                float(group.get("lr_scale", 1.0)),
                float(group["weight_decay"]),
                layer.tower if layer else None,
                layer.name if layer else None,
                layer.index if layer else None,
                list(parameter.shape),
            )
        )
    return result


def write_param_groups(path: str, rule: str, entries: list[Placement], optimizer: torch.optim.Optimizer) -> None:
    groups = [
        {
            "index": index,
            "group_name": group.get("group_name"),
            "lr_scale": float(group.get("lr_scale", 1.0)),
            "weight_decay": float(group["weight_decay"]),
            **({"use_fallback": True} if group.get("use_fallback") else {}),
            "tensors": len(group["params"]),
            "parameters": sum(p.numel() for p in group["params"]),
        }
        for index, group in enumerate(optimizer.param_groups)
    ]
    record = {"weight_decay_rule": rule, "groups": groups, "parameters": [asdict(entry) for entry in entries]}
    write_atomically(path, json.dumps(record, indent=1) + "\n")


def record_param_groups(
    run_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, options
) -> list[Placement]:
    """Main process, at start-up, before any wrapping (FSDP swaps the parameters later): every parameter's
    group in <run>/param_groups.json, and a summary in the log. `options` is the OptimizerOptions."""
    uses_main_groups = options.uses_main_groups
    layers = decayed_layers(model, options.image_layer_decay, options.text_layer_decay) if uses_main_groups else {}
    rule = (
        "open_clip main's groups and weight-decay rule"
        if uses_main_groups
        else "open_clip_train 3.3's weight-decay rule" + (" (timm's own split)" if options.uses_timm_optimizer else "")
    )
    entries = placements(model, optimizer, layers)
    write_param_groups(os.path.join(run_dir, PARAM_GROUPS_FILE), rule, entries, optimizer)
    for line in summary(rule, len(optimizer.param_groups), entries):
        log.info("%s", line)
    return entries


def summary(rule: str, groups: int, entries: list[Placement]) -> list[str]:
    """A few lines for the start-up log: the groups, each decayed tower's lr-scale span, what lies outside
    them, and the tensors and parameters decayed or not (naming those of two or more dimensions not decayed)."""
    total = sum(math.prod(e.shape) for e in entries)
    lines = [f"parameter groups ({rule}): {groups} optimizer groups, {len(entries)} tensors, {total:,} parameters"]
    for tower in sorted({e.tower for e in entries if e.tower}):
        own = sorted((e for e in entries if e.tower == tower), key=lambda e: e.layer_id or 0)
        low, high = own[0], own[-1]
        lines.append(
            f"  {tower}: {high.layer_id + 1} layer groups, lr_scale {low.lr_scale:.4g} ({low.layer}) "  # type: ignore[operator]
            f"up to {high.lr_scale:.4g} ({high.layer}); {len(own)} tensors, {sum(math.prod(e.shape) for e in own):,} "
            "parameters"
        )
    if any(e.tower for e in entries):
        outside = [e.name for e in entries if not e.tower]
        lines.append(f"  outside the decayed towers, lr_scale 1: {len(outside)} tensors ({_some(outside)})")
    for decayed in (True, False):
        own = [e for e in entries if (e.weight_decay > 0) == decayed]
        spared = [e.name for e in own if len(e.shape) > 1]
        what = "weight decay" if decayed else "no weight decay"
        named = "" if decayed or not spared else f"; of 2 or more dimensions: {_some(spared)}"
        lines.append(f"  {what}: {len(own)} tensors, {sum(math.prod(e.shape) for e in own):,} parameters{named}")
    return lines


def _some(names: list[str], shown: int = 6) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")

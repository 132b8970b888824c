"""`acc-clip export CHECKPOINT --out OUT`: a step checkpoint as open_clip reads it, either an
open_clip `epoch_N.pt` (`--format epoch`, the default) or a local-dir: folder (`--format local-dir`:
open_clip_config.json and open_clip_model.safetensors, the layout open_clip's hub loader reads, so
`open_clip.create_model_and_transforms('local-dir:OUT')` loads it and the folder can be uploaded as
it is). `--ema` exports the checkpoint's EMA of the weights (--ema-decay) in their place, in either
format; an epoch export without it carries the EMA, if any, under `state_dict_ema`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

from acc_clip.checkpoint.folders import OPTIMIZER_FILE, SCALER_FILE, Progress, load_if_present, read_manifest
from acc_clip.checkpoint.manager import save_torch
from acc_clip.config.parsing import parse
from acc_clip.config.schema import REQUIRED, Section, option
from acc_clip.errors import UsageError
from acc_clip.model.build import initialise_coca_decoder_projection, local_dir_folder
from acc_clip.model.ema import KEY as EMA
from acc_clip.model.options import LOCAL_DIR, with_model_options
from acc_clip.model.weights import kept_tensors, open_clip_checkpoint, open_clip_weights, step_weights


def exported_weights(checkpoint: str, ema: bool, lora: dict | None, *, carry_ema: bool) -> tuple[dict, dict | None]:
    """(the weights to export, the EMA to carry beside them or None), as plain open_clip weights
    (model/weights.open_clip_weights): with `ema` the checkpoint's EMA in the weights' place, refused in one line
    for a checkpoint without one; the EMA is read only when exported or carried (`carry_ema`)."""
    weights = step_weights(checkpoint)  # a sharded (FSDP) save's too, without its optimizer state
    averages = kept_tensors(checkpoint, EMA) if ema or carry_ema else None
    if ema and averages is None:
        raise UsageError(f"export --ema: {checkpoint} holds no EMA of the weights (trained without --ema-decay)")
    weights, averages = open_clip_weights(weights, averages, lora)
    return (averages, None) if ema and averages is not None else (weights, averages)


def export_checkpoint(checkpoint: str, out: str, ema: bool = False) -> str:
    """Write an open_clip epoch_N.pt from a step checkpoint folder; returns a line saying what was
    written. Its `epoch` is the number of epochs completed, as open_clip counts: a checkpoint in
    the middle of epoch e exports as epoch e, and open_clip_train would resume it at e's start.
    With `ema` its state_dict is the EMA and no optimizer state goes with it (it belongs to the weights)."""
    manifest = read_manifest(checkpoint, source="export")
    weights, averages = exported_weights(checkpoint, ema, manifest.get("lora"), carry_ema=True)
    # Under LoRA the optimizer state is the adapters', which the merge removes; under --ema it is the weights'.
    optimizer_state, scaler_state = (
        None if ema or manifest.get("lora") else load_if_present(os.path.join(checkpoint, name))
        for name in (OPTIMIZER_FILE, SCALER_FILE)
    )
    progress = Progress(**manifest["progress"])
    steps_per_epoch = manifest.get("data", {}).get("steps_per_epoch")
    completed = progress.epoch + int(steps_per_epoch is not None and progress.step_in_epoch == steps_per_epoch)
    exported = open_clip_checkpoint(weights, optimizer_state, scaler_state, completed, manifest["name"], averages)
    save_torch(exported, out)
    return (
        f"wrote {out}{' (the EMA of the weights)' if ema else ''}: model {manifest['model']}, {completed} epoch(s) "
        f"completed, global step {progress.global_step}; {how_to_load(manifest['model'], out)}"
    )


def how_to_load(model: str, out: str) -> str:
    """How open_clip loads an exported epoch file. open_clip ignores `pretrained=` beside a local-dir: name (it
    loads that folder's own weights, or none), so for such a model say what does work."""
    if model.startswith(LOCAL_DIR):
        return (
            f"open_clip ignores pretrained= for a local-dir: model: export with --format local-dir for open_clip, "
            f"or start acc-clip from it with --model {model} --pretrained {out}"
        )
    return f"load it with open_clip.create_model_and_transforms({model!r}, pretrained={out!r})"


LOCAL_DIR_CONFIG, LOCAL_DIR_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"


def open_clip_config(model_name: str, state_dict: dict) -> dict:
    """open_clip_config.json for `model_name`: a local-dir: model's own, else open_clip's config of that
    name with the preprocessing open_clip would use for it. A model trained with a logit bias
    (--siglip) gets `init_logit_bias` so that open_clip builds the parameter its weights fill."""
    import open_clip

    folder = local_dir_folder(model_name, "export: the checkpoint's model")
    if folder is not None:
        with open(os.path.join(folder, LOCAL_DIR_CONFIG)) as file:
            config = json.load(file)
    else:
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise UsageError(f"export: open_clip has no model config named {model_name!r}")
        config = {
            "model_cfg": model_cfg,
            "preprocess_cfg": open_clip.get_model_preprocess_cfg(open_clip.create_model(model_name)),
        }
    if "logit_bias" in state_dict and "init_logit_bias" not in config["model_cfg"]:
        config["model_cfg"] = {**config["model_cfg"], "init_logit_bias": float(state_dict["logit_bias"])}
    return config


def write_local_dir(model_name: str, state_dict: dict, out: str, model_options: dict | None = None) -> str:
    """A local-dir: folder for open_clip at `out` (written in a temporary folder, then renamed into
    place, so a folder at `out` is whole); returns its local-dir: name. `out` must not exist."""
    from safetensors.torch import save_file

    if os.path.exists(out):
        raise UsageError(f"export: {out} exists; give a new folder")
    config = with_model_options(open_clip_config(model_name, state_dict), model_options or {})
    partial = f"{out}.partial-{os.getpid()}"
    os.makedirs(partial)
    with open(os.path.join(partial, LOCAL_DIR_CONFIG), "w") as file:
        json.dump(config, file, indent=2)
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, os.path.join(partial, LOCAL_DIR_WEIGHTS))
    os.rename(partial, out)
    return f"{LOCAL_DIR}{out}"


def export_local_dir(checkpoint: str, out: str, ema: bool = False) -> str:
    manifest = read_manifest(checkpoint, source="export")
    weights, _ = exported_weights(checkpoint, ema, manifest.get("lora"), carry_ema=False)
    name = write_local_dir(manifest["model"], weights, out, manifest.get("model_options"))
    return (
        f"wrote {out}{' (the EMA of the weights)' if ema else ''}: model {manifest['model']}, global step "
        f"{manifest['progress']['global_step']}; load it as {name}"
    )


def write_seeded_local_dir(model_name: str, out: str, seed: int) -> str:
    """`model_name` with the weights open_clip draws after torch.manual_seed(seed), CoCa's decoder
    projection included (open_clip leaves it uninitialised), as a local-dir: folder: a model that
    two trainers (parity, benchmarks) or a teacher start from identically."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    initialise_coca_decoder_projection(model)
    return write_local_dir(model_name, model.state_dict(), out)


FORMATS = {"epoch": export_checkpoint, "local-dir": export_local_dir}


@dataclass
class ExportOptions(Section):
    title: ClassVar[str] = "export"
    checkpoint: str = option(REQUIRED, "a checkpoints/step_NNNNNNNN folder", positional=True)
    out: str = option(REQUIRED, "the .pt file (epoch) or the new folder (local-dir) to write")
    format: str = option(
        "epoch",
        "epoch: an open_clip epoch_N.pt; local-dir: open_clip_config.json and "
        "open_clip_model.safetensors, loaded as local-dir:OUT",
        choices=tuple(sorted(FORMATS)),
    )
    ema: bool = option(False, "export the EMA of the weights (a run with --ema-decay) instead of the weights")


def main(argv: list[str]) -> int:
    """`acc-clip export CHECKPOINT --out OUT [--format epoch|local-dir] [--ema]`: a step checkpoint for open_clip."""
    options = parse(argv, [ExportOptions], prog="acc-clip export", description=main.__doc__ or "", train=False)[
        ExportOptions
    ]
    print(FORMATS[options.format](options.checkpoint, options.out, options.ema))
    return 0

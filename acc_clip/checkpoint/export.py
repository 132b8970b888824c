"""`acc-clip export CHECKPOINT --out OUT`: a step checkpoint as open_clip reads it, either an
open_clip `epoch_N.pt` (`--format epoch`, the default) or a local-dir: folder (`--format local-dir`:
open_clip_config.json and open_clip_model.safetensors, the layout open_clip's hub loader reads, so
`open_clip.create_model_and_transforms('local-dir:OUT')` loads it and the folder can be uploaded as
it is)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from acc_clip.errors import AccClipError
from acc_clip.checkpoint.format import (OPTIMIZER_FILE, SCALER_FILE, Progress, atomic_torch_save, load_if_present,
                                        open_clip_checkpoint, read_manifest, step_weights)


def export_checkpoint(checkpoint: str, out: str) -> str:
    """Write an open_clip epoch_N.pt from a step checkpoint folder; returns a line saying what was
    written. Its `epoch` is the number of epochs completed, as open_clip counts: a checkpoint in
    the middle of epoch e exports as epoch e, and open_clip_train would resume it at e's start."""
    manifest = read_manifest(checkpoint, source="export")
    weights = step_weights(checkpoint)  # a sharded (FSDP) checkpoint's without its optimizer state (docs/fsdp.md)
    optimizer_state, scaler_state = (load_if_present(os.path.join(checkpoint, name))
                                     for name in (OPTIMIZER_FILE, SCALER_FILE))
    progress = Progress(**manifest["progress"])
    steps_per_epoch = manifest.get("data", {}).get("steps_per_epoch")
    completed = progress.epoch + int(steps_per_epoch is not None and progress.step_in_epoch == steps_per_epoch)
    atomic_torch_save(open_clip_checkpoint(weights, optimizer_state, scaler_state, completed, manifest["name"]), out)
    return (f"wrote {out}: model {manifest['model']}, {completed} epoch(s) completed, global step "
            f"{progress.global_step}")


LOCAL_DIR_CONFIG, LOCAL_DIR_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"


def open_clip_config(model_name: str, state_dict: dict) -> dict:
    """open_clip_config.json for `model_name`: a local-dir: model's own, else open_clip's config of that
    name with the preprocessing open_clip would use for it. A model trained with a logit bias
    (--siglip) gets `init_logit_bias` so that open_clip builds the parameter its weights fill."""
    import open_clip

    from acc_clip.model.build import local_dir_folder

    folder = local_dir_folder(model_name, "export: the checkpoint's model")
    if folder is not None:
        with open(os.path.join(folder, LOCAL_DIR_CONFIG)) as file:
            config = json.load(file)
    else:
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise AccClipError(f"export: open_clip has no model config named {model_name!r}")
        config = {"model_cfg": model_cfg,
                  "preprocess_cfg": open_clip.get_model_preprocess_cfg(open_clip.create_model(model_name))}
    if "logit_bias" in state_dict and "init_logit_bias" not in config["model_cfg"]:
        config["model_cfg"] = {**config["model_cfg"], "init_logit_bias": float(state_dict["logit_bias"])}
    return config


# --force-* / --image-* options of a run -> where open_clip's config keeps them (as its create_model applies them).
MODEL_CFG_OPTIONS = {"force_quick_gelu": ("quick_gelu",), "force_custom_text": ("custom_text",),
                     "force_image_size": ("vision_cfg", "image_size"), "force_patch_dropout": ("vision_cfg", "patch_dropout"),
                     "force_context_length": ("text_cfg", "context_length")}
PREPROCESS_OPTIONS = {"image_mean": "mean", "image_std": "std", "image_interpolation": "interpolation",
                      "image_resize_mode": "resize_mode"}
MODEL_OPTIONS = (*MODEL_CFG_OPTIONS, *PREPROCESS_OPTIONS)  # recorded in each checkpoint's manifest


def with_model_options(config: dict, options: dict) -> dict:
    """open_clip_config.json's content with the run's model options (the checkpoint manifest's
    `model_options`) written in, so that the folder alone builds the model that was trained."""
    config = json.loads(json.dumps(config))  # a copy
    for key, value in options.items():
        if key in MODEL_CFG_OPTIONS and value:
            *parents, leaf = MODEL_CFG_OPTIONS[key]
            section = config["model_cfg"]
            for parent in parents:
                section = section.setdefault(parent, {})
            section[leaf] = value[0] if key == "force_image_size" and len(value) == 1 else value
        elif key in PREPROCESS_OPTIONS and value is not None:
            config.setdefault("preprocess_cfg", {})[PREPROCESS_OPTIONS[key]] = value
    return config


def write_local_dir(model_name: str, state_dict: dict, out: str, model_options: Optional[dict] = None) -> str:
    """A local-dir: folder for open_clip at `out` (written in a temporary folder, then renamed into
    place, so a folder at `out` is whole); returns its local-dir: name. `out` must not exist."""
    from safetensors.torch import save_file

    from acc_clip.model.build import LOCAL_DIR

    if os.path.exists(out):
        raise AccClipError(f"export: {out} exists; give a new folder")
    config = with_model_options(open_clip_config(model_name, state_dict), model_options or {})
    partial = f"{out}.partial-{os.getpid()}"
    os.makedirs(partial)
    with open(os.path.join(partial, LOCAL_DIR_CONFIG), "w") as file:
        json.dump(config, file, indent=2)
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, os.path.join(partial, LOCAL_DIR_WEIGHTS))
    os.rename(partial, out)
    return f"{LOCAL_DIR}{out}"


def export_local_dir(checkpoint: str, out: str) -> str:
    manifest = read_manifest(checkpoint, source="export")
    weights = step_weights(checkpoint)
    name = write_local_dir(manifest["model"], weights, out, manifest.get("model_options"))
    return f"wrote {out}: model {manifest['model']}, global step {manifest['progress']['global_step']}; load it as {name}"


def write_seeded_local_dir(model_name: str, out: str, seed: int) -> str:
    """`model_name` with the weights open_clip draws after torch.manual_seed(seed), CoCa's decoder
    projection included (open_clip leaves it uninitialised), as a local-dir: folder: a model that
    two trainers (parity, benchmarks) or a teacher start from identically."""
    import open_clip
    import torch

    from acc_clip.model.build import initialise_coca_decoder_projection

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    initialise_coca_decoder_projection(model)
    return write_local_dir(model_name, model.state_dict(), out)


FORMATS = {"epoch": export_checkpoint, "local-dir": export_local_dir}


def main(argv: list[str]) -> int:
    """`acc-clip export CHECKPOINT --out OUT [--format epoch|local-dir]`: a step checkpoint for open_clip."""
    parser = argparse.ArgumentParser(prog="acc-clip export", description=main.__doc__)
    parser.add_argument("checkpoint", help="a checkpoints/step_NNNNNNNN folder")
    parser.add_argument("--out", required=True, help="the .pt file (epoch) or the new folder (local-dir) to write")
    parser.add_argument("--format", choices=sorted(FORMATS), default="epoch",
                        help="epoch: an open_clip epoch_N.pt; local-dir: open_clip_config.json and "
                             "open_clip_model.safetensors, loaded as local-dir:OUT")
    args = parser.parse_args(argv)
    print(FORMATS[args.format](args.checkpoint, args.out))
    return 0

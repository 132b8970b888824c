"""The one weights loader, and the weight formats it reads: a step checkpoint folder (Accelerate's
model.safetensors, or FSDP's sharded torch.distributed.checkpoint folder), a .safetensors file, an
open_clip `epoch_N.pt` and a bare state dict. `load_weights` serves --pretrained, the distillation
teacher, `acc-clip eval`, resume from an epoch file and export alike, and refuses weights of another
architecture in one line before any tensor is read where the format allows.

Weights are stored under their plain names (no `module.` or `_orig_mod.`), so they load whatever the
wrapping."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from acc_clip.errors import CheckpointError
from acc_clip.io.sealed import read_sealed
from acc_clip.model.lora import merge_lora
from acc_clip.runtime.parallel import SCALAR_PARAMETERS

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"  # Accelerate's name for the first model's weights
EMA_KEY = "state_dict_ema"  # the EMA of the weights in an epoch_N.pt, as timm names it
SHARDED_WEIGHTS_DIR = "pytorch_model_fsdp_0"  # Accelerate's folder for FSDP's sharded weights (FSDP_MODEL_NAME)


def plain_key(key: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP's `module.`, torch.compile's `_orig_mod.`),
    so checkpoints load whatever the number of processes or compilation."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def is_sharded_checkpoint(folder: str) -> bool:
    """Whether a step checkpoint holds FSDP shards (Accelerate's torch.distributed.checkpoint folder)
    instead of model.safetensors."""
    return os.path.isdir(os.path.join(folder, SHARDED_WEIGHTS_DIR))


def check_architecture(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one line naming the first key that shows `shapes` (saved weights) belong to another model."""
    own = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    unexpected = [key for key in shapes if key not in own]
    missing = [key for key in own if key not in shapes]
    wrong = [key for key in shapes if key in own and tuple(shapes[key]) != own[key]]
    if wrong:
        key = wrong[0]
        raise CheckpointError(
            f"{source}: weights of another architecture ({key!r} has shape {tuple(shapes[key])}, "
            f"this model's is {own[key]}; {len(wrong)} such key(s))"
        )
    if unexpected or missing:
        what = f"unexpected key {unexpected[0]!r}" if unexpected else f"missing key {missing[0]!r}"
        # A SigLIP model differs from its CLIP twin by the bias alone: name the flag that makes it (a distillation
        # teacher has none: open_clip's distillation loss has no bias term, so a SigLIP teacher is not supported).
        teacher = source.startswith("--distill")
        hint = (
            "; a SigLIP-trained teacher (its weights have a logit_bias): distilling from a SigLIP model is not "
            "supported, open_clip's distillation loss has no bias term"
            if unexpected == ["logit_bias"] and not missing and teacher
            else "; the weights have a logit_bias: trained with --siglip? pass --siglip"
            if unexpected == ["logit_bias"] and not missing
            else "; these weights have no logit_bias: drop --siglip"
            if missing == ["logit_bias"] and not unexpected
            else ""
        )
        raise CheckpointError(
            f"{source}: weights of another architecture ({what}; {len(unexpected)} unexpected, "
            f"{len(missing)} missing){hint}"
        )


def open_clip_checkpoint(
    state_dict: dict,
    optimizer_state: dict | None,
    scaler_state: dict | None,
    epoch: int,
    name: str | None,
    ema: dict | None = None,
) -> dict:
    """The dict open_clip_train writes as `epoch_N.pt` and `create_model_and_transforms(pretrained=path)` loads;
    the EMA of the weights, if any, under `state_dict_ema`, where timm's checkpoints keep it (timm's
    load_checkpoint(use_ema=True) reads it; open_clip reads `state_dict`, which `acc-clip export --ema` fills)."""
    exported: dict[str, Any] = {"epoch": epoch, "name": name, "state_dict": state_dict}
    if ema is not None:
        exported[EMA_KEY] = ema
    if optimizer_state is not None:
        exported["optimizer"] = optimizer_state
    if scaler_state is not None:
        exported["scaler"] = scaler_state
    return exported


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what saving it writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def state_dict_of(saved: Any, path: str, source: str) -> dict[str, torch.Tensor]:
    """The plain-named state dict of an open_clip `epoch_N.pt` (under 'state_dict') or of a bare state dict."""
    state_dict = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if (
        not isinstance(state_dict, dict)
        or not state_dict
        or not all(isinstance(v, torch.Tensor) for v in state_dict.values())
    ):
        raise CheckpointError(f"{source} {path}: not an open_clip checkpoint (no state_dict of tensors)")
    return {plain_key(key): value for key, value in state_dict.items()}


def read_torch_checkpoint(path: str, source: str) -> Any:
    """An open_clip `epoch_N.pt` or a bare state dict, read without unpickling code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(
            f"{source} {path}: not an open_clip checkpoint torch can read ({type(error).__name__})"
        ) from None


def load_safetensors_weights(model: torch.nn.Module, path: str, source: str) -> None:
    """Weights from a safetensors file into `model`, the architecture checked from the header first
    (no tensor is read for weights of another model)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as file:
        names = list(file.keys())  # noqa: SIM118 - safe_open is not a dict: iterating it fails
        shapes = {plain_key(key): tuple(file.get_slice(key).get_shape()) for key in names}
    check_architecture(model, shapes, source)
    model.load_state_dict({plain_key(k): v for k, v in load_file(path).items()})


def read_sharded_weights(folder: str) -> dict[str, torch.Tensor]:
    """A sharded (FSDP) step checkpoint's whole weights, plain-named, on the CPU, read in this one process by
    torch.distributed.checkpoint (no process group: each tensor whole, from every shard). FSDP holds
    open_clip's 0-d parameters as 1-element vectors (runtime/parallel.scalars_as_vectors): 0-d again here."""
    return read_sharded_tensors(os.path.join(folder, SHARDED_WEIGHTS_DIR), "model")


def read_sharded_tensors(path: str, key: str) -> dict[str, torch.Tensor]:
    """The whole tensors saved under `key` (a dict of named tensors) in the torch.distributed.checkpoint
    folder `path`, read as `read_sharded_weights` reads the weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    prefix = f"{key}."
    state = {
        name[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in metadata.items()
        if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    dcp.load({key: state}, checkpoint_id=path)
    return {
        name: value.reshape(()) if name in SCALAR_PARAMETERS and value.shape == (1,) else value
        for name, value in state.items()
    }


def step_weights(folder: str) -> dict[str, torch.Tensor]:
    """A step checkpoint's plain-named weights, sharded or not (for export, which has no model to load into)."""
    from safetensors.torch import load_file

    if is_sharded_checkpoint(folder):
        return read_sharded_weights(folder)
    return {plain_key(k): v for k, v in load_file(os.path.join(folder, WEIGHTS_FILE)).items()}


def open_clip_weights(
    weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None, lora: dict | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """A run's weights and EMA (None without one) as plain open_clip state dicts: the EMA, which holds only what
    trains (model/ema.py), completed with the frozen weights, their own average; LoRA's adapters merged into both."""
    whole_ema = None if ema is None else merge_lora({**weights, **ema}, lora)
    return merge_lora(weights, lora), whole_ema


def kept_tensors(folder: str, name: str) -> dict[str, torch.Tensor] | None:
    """What a step checkpoint keeps beside the weights under `name` (checkpoint/manager.CheckpointManager.keep:
    the EMA), whole and plain-named on the CPU: `NAME.safetensors`, or the sharded folder `NAME/` of an FSDP
    save; None when the checkpoint has none."""
    from safetensors.torch import load_file

    if os.path.isdir(os.path.join(folder, name)):
        return read_sharded_tensors(os.path.join(folder, name), name)
    path = os.path.join(folder, f"{name}.safetensors")
    return load_file(path) if os.path.isfile(path) else None


def load_weights(model: torch.nn.Module, path: str, source: str) -> dict | None:
    """Load a step checkpoint folder (checked against its manifest first), a .safetensors file, an open_clip
    `epoch_N.pt` or a bare state dict into the plain `model`, and say so in the log (after open_clip's own
    lines, which may have said the model starts from random weights). Returns what a file held besides the
    weights (optimizer, scaler, epoch), None for a folder. Every failure is one line naming `source` and `path`."""
    extra = _load_weights(model, path, source)
    log.info("%s %s: loaded %d weight tensors into %s", source, path, len(model.state_dict()), type(model).__name__)
    return extra


def _load_weights(model: torch.nn.Module, path: str, source: str) -> dict | None:
    if os.path.isdir(path):
        manifest = read_sealed(path, source)  # refuses a partial, damaged or foreign folder in one line
        if is_sharded_checkpoint(path) or manifest.get("lora"):
            # a LoRA run's weights are merged into plain open_clip weights first (model/lora.py)
            weights = merge_lora(step_weights(path), manifest.get("lora"))
            check_architecture(model, {k: tuple(v.shape) for k, v in weights.items()}, f"{source} {path}")
            model.load_state_dict(weights)
            return None
        load_safetensors_weights(model, os.path.join(path, WEIGHTS_FILE), f"{source} {path}")
        return None
    if not os.path.isfile(path):
        raise CheckpointError(f"{source} {path}: no such file or folder")
    if path.endswith(".safetensors"):
        load_safetensors_weights(model, path, f"{source} {path}")
        return {}
    saved = read_torch_checkpoint(path, source)
    state_dict = state_dict_of(saved, path, source)
    check_architecture(model, {k: tuple(v.shape) for k, v in state_dict.items()}, f"{source} {path}")
    model.load_state_dict(state_dict)
    return saved if isinstance(saved, dict) and "state_dict" in saved else {}

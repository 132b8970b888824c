"""The step checkpoint's on-disk format, and the one weights loader.

A step checkpoint `<run>/checkpoints/step_NNNNNNNN/` holds Accelerate's state (model.safetensors,
optimizer.bin, scaler.pt under fp16, random_states_<rank>.pkl for every process; under FSDP the sharded
pytorch_model_fsdp_0/ and optimizer_0/ of torch.distributed.checkpoint instead of the first two) and
`complete.json`, the manifest: training progress (epoch, step within the epoch, global step,
samples seen), the data position and the settings it depends on, and every file with its size and
SHA-256. A folder without a manifest is never read as a checkpoint (see manager.py for how saves
commit), and one whose files differ from their manifest (a flipped bit, a truncated copy) is refused
by name wherever it is read: resume, evaluation, export. Manifests written before hashes were
recorded (no "sha256") are checked by size only.

Weights are stored under their plain names (no `module.` or `_orig_mod.`), so they load whatever
the wrapping. `load_weights` reads them from a step checkpoint folder, an open_clip `epoch_N.pt` or a
plain state dict, for resume, evaluation and export alike, and refuses another architecture in one line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import torch

from acc_clip.checkpoint import debug
from acc_clip.errors import AccClipError, describe_error
from acc_clip.io.files import file_sha256
from acc_clip.runtime.run_dir import CHECKPOINTS_DIR

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "complete.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = "damaged-"  # a checkpoint that failed its check, moved out of the step_ names (newest_intact_checkpoint)
OLD_PREFIX = TMP_PREFIX + "old-"  # a committed checkpoint moved aside while a save of its step replaces it
WEIGHTS_FILE = "model.safetensors"  # Accelerate's name for the first model's weights
OPTIMIZER_FILE = "optimizer.bin"
SCALER_FILE = "scaler.pt"
SHARDED_WEIGHTS_DIR = "pytorch_model_fsdp_0"  # Accelerate's folder for FSDP's sharded weights (FSDP_MODEL_NAME)


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (or the next one, once step_in_epoch is reset)
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    samples_seen: int = 0

    def advance(self, step_in_epoch: int, global_batch: int) -> None:
        self.step_in_epoch = step_in_epoch
        self.global_step += 1
        self.samples_seen += global_batch

    def finish_epoch(self, epoch: int) -> None:
        self.epoch, self.step_in_epoch = epoch + 1, 0



# the checkpoint folder ---------------------------------------------------------------------------

def step_name(global_step: int) -> str:
    return f"{STEP_PREFIX}{global_step:08d}"


def complete_checkpoints(directory: str) -> list[str]:
    """Complete step checkpoints in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory)
                   if n.startswith(STEP_PREFIX) and os.path.isfile(os.path.join(directory, n, MANIFEST)))
    return [os.path.join(directory, n) for n in names]


def read_manifest(path: str, source: str = "--resume") -> dict:
    """The manifest of a complete checkpoint, after checking that every file it lists is there
    with its size; else one line saying what is wrong with `path`."""
    if not os.path.exists(path):
        raise AccClipError(f"{source} {path}: no such file or folder")
    if not os.path.isdir(path):
        raise AccClipError(f"{source} {path}: not a checkpoint folder")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        if os.path.basename(os.path.normpath(path)).startswith(TMP_PREFIX):
            raise AccClipError(f"{source} {path}: an interrupted save (no {MANIFEST}), not a checkpoint")
        inside = complete_checkpoints(path) or complete_checkpoints(os.path.join(path, CHECKPOINTS_DIR))
        hint = f"; it holds checkpoints, e.g. {inside[-1]}" if inside else ""
        raise AccClipError(f"{source} {path}: not an acc_clip checkpoint (no {MANIFEST}){hint}")
    try:
        with open(manifest_path, encoding="utf-8") as file:
            manifest = json.load(file)
        files, progress = manifest["files"], manifest["progress"]
        if not (isinstance(files, dict) and files and isinstance(progress, dict)):
            raise TypeError
    except (ValueError, KeyError, TypeError):  # ValueError: not JSON, not UTF-8
        raise AccClipError(f"{source} {path}: {MANIFEST} is damaged") from None
    except OSError as error:
        raise AccClipError(f"{source} {path}: cannot read {MANIFEST} ({error.strerror or error})") from None
    for name, size in files.items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise AccClipError(f"{source} {path}: damaged checkpoint, {name} is missing")
        if os.path.getsize(file_path) != size:
            raise AccClipError(f"{source} {path}: damaged checkpoint, {name} has {os.path.getsize(file_path)} "
                               f"bytes, the manifest says {size}")
    if set(progress) != set(Progress.__dataclass_fields__):
        raise AccClipError(f"{source} {path}: {MANIFEST} has progress fields {sorted(progress)}")
    check_hashes(path, manifest.get("sha256", {}), source)
    return manifest


def folder_hashes(folder: str) -> dict[str, str]:
    """{relative path: SHA-256} of every file under a save folder (a sharded one's shards lie in
    sub-folders), for its manifest."""
    return {name: file_sha256(os.path.join(folder, name)) for name in checkpoint_files(folder)}


def check_hashes(path: str, hashes: dict, source: str) -> None:
    """Refuse, naming the file, a checkpoint whose content is not what was saved: sizes catch a cut
    file, only a hash catches a bit flipped in place (a weight of 3.0 read back as 5.9e-39)."""
    if not isinstance(hashes, dict):
        raise AccClipError(f"{source} {path}: {MANIFEST} is damaged (sha256 is not a mapping)")
    for name, expected in sorted(hashes.items()):
        if not os.path.isfile(os.path.join(path, name)):
            raise AccClipError(f"{source} {path}: damaged checkpoint, {name} is missing")
        try:
            actual = file_sha256(os.path.join(path, name))
        except OSError as error:
            raise AccClipError(f"{source} {path}: cannot read {name} ({error.strerror or error})") from None
        if actual != expected:
            raise AccClipError(f"{source} {path}: damaged checkpoint, {name} differs from what was saved "
                               f"(SHA-256 mismatch)")


def newest_intact_checkpoint(directory: str) -> tuple[Optional[str], Optional[dict]]:
    """(path, manifest) of the newest complete checkpoint in `directory` whose files pass their
    manifest; (None, None) when there is none at all. Each newer one that fails is named in a warning
    and renamed `damaged-step_N`: kept for inspection, but out of the way of --keep-checkpoints, which
    would otherwise count it among the newest and prune the good ones. When there are checkpoints but
    none passes, one line naming the newest (and nothing renamed)."""
    found, failed = complete_checkpoints(directory), []
    for path in reversed(found):
        try:
            manifest = read_manifest(path, source="--resume latest:")
        except AccClipError as error:
            log.warning("%s; trying the checkpoint before it", error)
            failed.append(path)
            continue
        for damaged in failed:
            aside = os.path.join(directory, DAMAGED_PREFIX + os.path.basename(damaged))
            remove_path(aside)
            os.replace(damaged, aside)
        if failed:
            log.warning("--resume latest: resuming from %s, the newest checkpoint that passes its check (%d newer "
                        "one(s) failed, named above, and were renamed %s*)", path, len(failed), DAMAGED_PREFIX)
        return path, manifest
    if found:
        raise AccClipError(f"--resume latest: none of the {len(found)} checkpoint(s) in {directory} passes its "
                           f"manifest check (the newest, {os.path.basename(found[-1])}, is named above)")
    return None, None


def fsync_entry(path: str) -> None:
    """Flush a file's or a folder's own entry (a folder's: the names in it, so renames survive a power loss)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_folder(path: str) -> None:
    """Data first, then the folder entry, so a power loss cannot leave a renamed but empty save.
    Sub-folders (a sharded checkpoint's) in turn."""
    for name in os.listdir(path):
        if os.path.isdir(os.path.join(path, name)):
            fsync_folder(os.path.join(path, name))
            continue
        with open(os.path.join(path, name), "rb") as file:
            os.fsync(file.fileno())
    fsync_entry(path)


def checkpoint_files(folder: str) -> dict[str, int]:
    """Every file under `folder` by its relative path ('/'-separated), with its size: the manifest's
    `files`. A sharded checkpoint's shards lie in sub-folders (pytorch_model_fsdp_0/__0_0.distcp, ...)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return dict(sorted(files.items()))


def is_sharded_checkpoint(folder: str) -> bool:
    """Whether a step checkpoint holds FSDP shards (Accelerate's torch.distributed.checkpoint folder)
    instead of model.safetensors."""
    return os.path.isdir(os.path.join(folder, SHARDED_WEIGHTS_DIR))


# model weights -----------------------------------------------------------------------------------

def plain_key(key: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP's `module.`, torch.compile's `_orig_mod.`),
    so checkpoints load whatever the number of processes or compilation."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def check_architecture(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one line naming the first key that shows `shapes` (saved weights) belong to another model."""
    own = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    unexpected = [key for key in shapes if key not in own]
    missing = [key for key in own if key not in shapes]
    wrong = [key for key in shapes if key in own and tuple(shapes[key]) != own[key]]
    if wrong:
        key = wrong[0]
        raise AccClipError(f"{source}: weights of another architecture ({key!r} has shape {tuple(shapes[key])}, "
                           f"this model's is {own[key]}; {len(wrong)} such key(s))")
    if unexpected or missing:
        what = f"unexpected key {unexpected[0]!r}" if unexpected else f"missing key {missing[0]!r}"
        # A SigLIP model differs from its CLIP twin by the bias alone: name the flag that makes it.
        hint = ("; the weights have a logit_bias: trained with --siglip? pass --siglip" if unexpected == ["logit_bias"]
                and not missing else "; these weights have no logit_bias: drop --siglip" if missing == ["logit_bias"]
                and not unexpected else "")
        raise AccClipError(f"{source}: weights of another architecture ({what}; {len(unexpected)} unexpected, "
                           f"{len(missing)} missing){hint}")


def weights_are_finite(model: torch.nn.Module) -> bool:
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all().item()) if flags else True




def commit_folder(partial: str, final: str) -> None:
    """Rename the finished save into place. A save of the same step (an epoch's end right after a
    step save, or a replayed step) replaces the old folder, which is moved aside first so that at
    every moment the name holds a complete checkpoint or nothing; a kill between the two renames
    leaves the old one as `.tmp-old-NAME`, which `restore_moved_aside` puts back at the next start."""
    old = os.path.join(os.path.dirname(final), OLD_PREFIX + os.path.basename(final))
    if os.path.exists(final):
        remove_path(old)
        os.replace(final, old)
        debug.kill_if_asked_between_renames(final)
    os.replace(partial, final)
    fsync_entry(os.path.dirname(final))
    remove_path(old)


def restore_moved_aside(directory: str) -> list[str]:
    """Put back each checkpoint a kill between commit_folder's two renames left moved aside: a
    complete `.tmp-old-NAME` with no `NAME` is the only committed copy of that step (its replacement
    never got the name). Returns the names put back. Call it before removing `.tmp-*` folders as
    interrupted saves: it would be removed with them. An old copy whose name exists again (the kill
    came after the second rename) or without a complete manifest is left to that removal."""
    restored = []
    for name in sorted(n for n in os.listdir(directory) if n.startswith(OLD_PREFIX)):
        old, final = os.path.join(directory, name), os.path.join(directory, name[len(OLD_PREFIX):])
        if os.path.exists(final):
            continue
        try:
            read_manifest(old, source="restoring")
        except AccClipError:
            continue
        os.replace(old, final)
        restored.append(os.path.basename(final))
    if restored:
        fsync_entry(directory)
    return restored


def remove_path(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def folder_bytes(path: str) -> int:
    return sum(checkpoint_files(path).values())



def open_clip_checkpoint(state_dict: dict, optimizer_state: Optional[dict], scaler_state: Optional[dict],
                         epoch: int, name: str) -> dict:
    """The dict open_clip_train writes and `create_model_and_transforms(pretrained=path)` loads."""
    exported: dict[str, Any] = {"epoch": epoch, "name": name, "state_dict": state_dict}
    if optimizer_state is not None:
        exported["optimizer"] = optimizer_state
    if scaler_state is not None:
        exported["scaler"] = scaler_state
    return exported


def atomic_torch_save(obj: dict, path: str) -> None:
    """torch.save under a temporary name, renamed into place: `path` holds the old file or the new one.
    A failed save (a full disk) removes the temporary file and is one line."""
    partial = path + ".tmp"
    try:
        torch.save(obj, partial)
        os.replace(partial, path)
    except Exception as error:  # torch reports a full disk as RuntimeError "[enforce fail at inline_container.cc...]"
        remove_path(partial)
        raise AccClipError(save_failure(path, os.path.dirname(os.path.abspath(path)), describe_error(error),
                                        tensor_bytes(obj))) from None


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what saving it writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def state_bytes(model: torch.nn.Module, optimizer) -> int:
    return tensor_bytes(model.state_dict()) + tensor_bytes(optimizer.state_dict())


DISK_FULL_SIGNS = ("No space left", "StorageFull", "file write failed", "Disk quota exceeded")


def save_failure(what: str, directory: str, failure: str, needed_bytes: int) -> str:
    """One line for a save that failed. A full disk hides behind torch's and safetensors' own words
    ('PytorchStreamWriter failed writing file', 'IoError ... StorageFull'): say it is the disk, how much
    the save needs and how much is free (measured after the partial save was removed)."""
    free = shutil.disk_usage(directory).free
    if free < needed_bytes or any(sign in failure for sign in DISK_FULL_SIGNS):
        failure = (f"no space left on the disk of {directory} (the save needs about {needed_bytes / 1e6:.1f} MB, "
                   f"{free / 1e6:.1f} MB are free)")
    return f"{what} could not be saved: {failure}; the partial save was removed, what was saved before is kept"


def load_if_present(path: str) -> Optional[dict]:
    """A checkpoint's optimizer or scaler state, None where the file is absent; a damaged one is one line."""
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise AccClipError(f"{path}: cannot be read ({type(error).__name__}); the checkpoint is damaged") from None



# the one weights loader --------------------------------------------------------------------------

def state_dict_of(saved: Any, path: str, source: str) -> dict[str, torch.Tensor]:
    """The plain-named state dict of an open_clip `epoch_N.pt` (under 'state_dict') or of a bare state dict."""
    state_dict = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state_dict, dict) or not state_dict or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise AccClipError(f"{source} {path}: not an open_clip checkpoint (no state_dict of tensors)")
    return {plain_key(key): value for key, value in state_dict.items()}


def read_torch_checkpoint(path: str, source: str) -> dict:
    """An open_clip `epoch_N.pt` or a bare state dict, read without unpickling code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise AccClipError(f"{source} {path}: not an open_clip checkpoint torch can read "
                           f"({type(error).__name__})") from None


def load_safetensors_weights(model: torch.nn.Module, path: str, source: str) -> None:
    """Weights from a safetensors file into `model`, the architecture checked from the header first
    (no tensor is read for weights of another model)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as file:
        shapes = {plain_key(key): tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    check_architecture(model, shapes, source)
    model.load_state_dict({plain_key(k): v for k, v in load_file(path).items()})


def read_sharded_weights(folder: str) -> dict[str, torch.Tensor]:
    """A sharded (FSDP) step checkpoint's whole weights, plain-named, on the CPU, read in this one process by
    torch.distributed.checkpoint (no process group: each tensor whole, from every shard). FSDP holds
    open_clip's 0-d parameters as 1-element vectors (runtime/parallel.scalars_as_vectors): 0-d again here."""
    import torch.distributed.checkpoint as dcp

    from acc_clip.runtime.parallel import SCALAR_PARAMETERS

    path = os.path.join(folder, SHARDED_WEIGHTS_DIR)
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.items() if key.startswith("model.") and hasattr(meta, "size")}
    dcp.load({"model": state}, checkpoint_id=path)
    return {key: value.reshape(()) if key in SCALAR_PARAMETERS and value.shape == (1,) else value
            for key, value in state.items()}


def step_weights(folder: str) -> dict[str, torch.Tensor]:
    """A step checkpoint's plain-named weights, sharded or not (for export, which has no model to load into)."""
    from safetensors.torch import load_file

    if is_sharded_checkpoint(folder):
        return read_sharded_weights(folder)
    return {plain_key(k): v for k, v in load_file(os.path.join(folder, WEIGHTS_FILE)).items()}


def load_weights(model: torch.nn.Module, path: str, source: str) -> Optional[dict]:
    """Load a step checkpoint folder (its model.safetensors), a .safetensors file, an open_clip
    `epoch_N.pt` or a bare state dict into the plain `model`. Returns what a file held besides the weights (optimizer, scaler,
    epoch), None for a folder. Every failure is one line naming `source` and `path`."""
    if os.path.isdir(path):
        read_manifest(path, source=source)  # refuses a partial or foreign folder in one line
        if is_sharded_checkpoint(path):
            weights = read_sharded_weights(path)
            check_architecture(model, {k: tuple(v.shape) for k, v in weights.items()}, f"{source} {path}")
            model.load_state_dict(weights)
            return None
        load_safetensors_weights(model, os.path.join(path, WEIGHTS_FILE), f"{source} {path}")
        return None
    if not os.path.isfile(path):
        raise AccClipError(f"{source} {path}: no such file or folder")
    if path.endswith(".safetensors"):
        load_safetensors_weights(model, path, f"{source} {path}")
        return {}
    saved = read_torch_checkpoint(path, source)
    state_dict = state_dict_of(saved, path, source)
    check_architecture(model, {k: tuple(v.shape) for k, v in state_dict.items()}, f"{source} {path}")
    model.load_state_dict(state_dict)
    return saved if isinstance(saved, dict) and "state_dict" in saved else {}

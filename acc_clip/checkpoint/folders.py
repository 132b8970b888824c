"""Step checkpoint folders: their names, what their manifest records, how a save commits, and how the
newest intact one is found.

A step checkpoint `<run>/checkpoints/step_NNNNNNNN/` holds Accelerate's state (model.safetensors,
optimizer.bin, scaler.pt under fp16, random_states_<rank>.pkl for every process; under FSDP the sharded
pytorch_model_fsdp_0/ and optimizer_0/ of torch.distributed.checkpoint instead of the first two) and is a
sealed folder (io/sealed.py): its manifest, `complete.json`, written last, lists every file with its size
and SHA-256, plus the training progress (epoch, step within the epoch, global step, samples seen), the
data position and the settings it depends on. A folder without a manifest is never read as a checkpoint,
and one whose files differ from their manifest is refused by name wherever it is read."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from acc_clip.errors import CheckpointError
from acc_clip.io.atomic import fsync_entry, remove_path
from acc_clip.io.sealed import MANIFEST, read_sealed
from acc_clip.runtime.faults import fault_point

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = (
    "damaged-"  # a checkpoint that failed its check, moved out of the step_ names (newest_intact_checkpoint)
)
OLD_PREFIX = TMP_PREFIX + "old-"  # a committed checkpoint moved aside while a save of its step replaces it
OPTIMIZER_FILE = "optimizer.bin"
SCALER_FILE = "scaler.pt"


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (or the next one, once step_in_epoch is reset)
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    samples_seen: int = 0
    # The position in `epoch`, in samples: its segments so far, each {"layout": the data's layout (TrainData.layout),
    # "batches": micro-batches every process trained on it}, the last one the layout in training (data/order.py).
    segments: list[dict[str, Any]] = field(default_factory=list)

    def enter_layout(self, layout: dict[str, Any]) -> None:
        """Train the rest of the epoch on `layout`: the last segment goes on if it has this layout, else one starts."""
        if not self.segments or self.segments[-1]["layout"] != layout:
            self.segments = [*self.segments, {"layout": dict(layout), "batches": 0}]

    def advance(self, step_in_epoch: int, global_batch: int, micro_batches: int = 1) -> None:
        self.step_in_epoch = step_in_epoch
        self.global_step += 1
        self.samples_seen += global_batch
        if self.segments:  # new objects, never changed in place: a save in the background holds a copy of this
            last = self.segments[-1]
            self.segments = [*self.segments[:-1], {**last, "batches": last["batches"] + micro_batches}]

    def finish_epoch(self, epoch: int) -> None:
        self.epoch, self.step_in_epoch, self.segments = epoch + 1, 0, []


OPTIONAL_PROGRESS = {"segments"}  # absent from checkpoints saved before positions were kept in samples


def step_name(global_step: int) -> str:
    return f"{STEP_PREFIX}{global_step:08d}"


def complete_checkpoints(directory: str) -> list[str]:
    """Complete step checkpoints in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(
        n
        for n in os.listdir(directory)
        if n.startswith(STEP_PREFIX) and os.path.isfile(os.path.join(directory, n, MANIFEST))
    )
    return [os.path.join(directory, n) for n in names]


def read_manifest(path: str, source: str = "--resume") -> dict:
    """The manifest of a complete checkpoint, after checking every file it lists (size and hash) and its
    progress record; else one line saying what is wrong with `path`."""
    manifest = read_sealed(path, source)
    progress = manifest.get("progress")
    if not isinstance(progress, dict):
        raise CheckpointError(f"{source} {path}: {MANIFEST} is damaged")
    fields = set(Progress.__dataclass_fields__)
    if not fields - OPTIONAL_PROGRESS <= set(progress) <= fields:
        raise CheckpointError(f"{source} {path}: {MANIFEST} has progress fields {sorted(progress)}")
    return manifest


def newest_intact_checkpoint(directory: str) -> tuple[str | None, dict | None]:
    """(path, manifest) of the newest complete checkpoint in `directory` whose files pass their
    manifest; (None, None) when there is none at all. Each newer one that fails is named in a warning
    and renamed `damaged-step_N`: kept for inspection, but out of the way of --keep-checkpoints, which
    would otherwise count it among the newest and prune the good ones. When there are checkpoints but
    none passes, one line naming the newest (and nothing renamed)."""
    found, failed = complete_checkpoints(directory), []
    for path in reversed(found):
        try:
            manifest = read_manifest(path, source="--resume latest:")
        except CheckpointError as error:
            log.warning("%s; trying the checkpoint before it", error)
            failed.append(path)
            continue
        for damaged in failed:
            aside = os.path.join(directory, DAMAGED_PREFIX + os.path.basename(damaged))
            remove_path(aside)
            os.replace(damaged, aside)
        if failed:
            log.warning(
                "--resume latest: resuming from %s, the newest checkpoint that passes its check (%d newer "
                "one(s) failed, named above, and were renamed %s*)",
                path,
                len(failed),
                DAMAGED_PREFIX,
            )
        return path, manifest
    if found:
        raise CheckpointError(
            f"--resume latest: none of the {len(found)} checkpoint(s) in {directory} passes its "
            f"manifest check (the newest, {os.path.basename(found[-1])}, is named above)"
        )
    return None, None


def commit_folder(partial: str, final: str, global_step: int) -> None:
    """Rename the finished save into place. A save of the same step (an epoch's end right after a
    step save, or a replayed step) replaces the old folder, which is moved aside first so that at
    every moment the name holds a complete checkpoint or nothing; a kill between the two renames
    leaves the old one as `.tmp-old-NAME`, which `restore_moved_aside` puts back at the next start."""
    old = os.path.join(os.path.dirname(final), OLD_PREFIX + os.path.basename(final))
    if os.path.exists(final):
        remove_path(old)
        os.replace(final, old)
        fault_point("between_renames", global_step)
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
        old, final = os.path.join(directory, name), os.path.join(directory, name[len(OLD_PREFIX) :])
        if os.path.exists(final):
            continue
        try:
            read_manifest(old, source="restoring")
        except CheckpointError:
            continue
        os.replace(old, final)
        restored.append(os.path.basename(final))
    if restored:
        fsync_entry(directory)
    return restored


def load_if_present(path: str) -> dict | None:
    """A checkpoint's optimizer or scaler state, None where the file is absent; a damaged one is one line."""
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}); the checkpoint is damaged") from None

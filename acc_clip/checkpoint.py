"""Checkpoints a user can trust.

A checkpoint is a folder `checkpoints/step_NNNNNNNN/` holding Accelerate's state (model, optimizer,
grad scaler, the RNG states of every process) and `progress.json` (epoch, step within the epoch,
global step, samples seen). It is written under a temporary name and renamed into place after a
`complete.json` manifest is written, so a folder without the manifest is never resumed from.

The data position needs no more than the step within the epoch: the epoch's sample order is rebuilt
from (seed, epoch) and the batches already done are skipped as indices, not decoded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from acc_clip.config import TrainConfig
from acc_clip.errors import AccClipError

log = logging.getLogger("acc_clip")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on a signal after saving; rerun with --resume latest
MANIFEST = "complete.json"
PROGRESS = "progress.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


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


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves and exits. A second SIGINT
    interrupts at once."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @classmethod
    def install(cls) -> "StopSignal":
        stop = cls()

        def handler(signum, frame):
            if stop.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            stop.signal_name = signal.Signals(signum).name

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handler)
        return stop


def complete_checkpoints(directory: str) -> list[str]:
    """Complete step checkpoints in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory)
                   if n.startswith(STEP_PREFIX) and os.path.isfile(os.path.join(directory, n, MANIFEST)))
    return [os.path.join(directory, n) for n in names]


def read_manifest(path: str) -> dict:
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        raise AccClipError(f"--resume {path}: not a complete acc_clip checkpoint (no {MANIFEST})")
    with open(manifest) as file:
        return json.load(file)


def _load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    own = model.state_dict()
    for key, value in state_dict.items():
        if key not in own:
            raise AccClipError(f"{source}: weights of another architecture (unexpected key {key!r})")
        if own[key].shape != value.shape:
            raise AccClipError(f"{source}: weights of another architecture ({key!r} has shape "
                               f"{tuple(value.shape)}, the model {tuple(own[key].shape)})")
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise AccClipError(f"{source}: weights of another architecture (missing key {missing[0]!r})")
    model.load_state_dict(state_dict)


class CheckpointManager:
    def __init__(self, run_dir: str, config: TrainConfig, accelerator):
        self.directory = os.path.join(run_dir, "checkpoints")
        self.config = config
        self.accelerator = accelerator
        if accelerator.is_main_process:
            os.makedirs(self.directory, exist_ok=True)
            for name in os.listdir(self.directory):  # partial saves of a crashed run
                if name.startswith(TMP_PREFIX):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        accelerator.wait_for_everyone()

    # resume -----------------------------------------------------------------------------------
    def resume(self, model, optimizer, steps_per_epoch: int) -> Progress:
        target = self.config.resume
        if target is None:
            return Progress()
        if target == "latest":
            found = complete_checkpoints(self.directory)
            if not found:
                log.info("--resume latest: no checkpoint in %s yet, starting from the beginning", self.directory)
                return Progress()
            target = found[-1]
        if not os.path.exists(target):
            raise AccClipError(f"--resume {target}: no such file or folder")
        if os.path.isfile(target):
            return self._resume_open_clip(target, model, optimizer)
        manifest = read_manifest(target)
        if manifest.get("model") != self.config.model:
            raise AccClipError(f"--resume {target}: a checkpoint of model {manifest.get('model')!r}, "
                               f"but this run trains {self.config.model!r}")
        if manifest.get("steps_per_epoch") not in (None, steps_per_epoch):
            log.warning("--resume %s: the checkpoint had %s steps per epoch, this run has %d (different data or "
                        "batch size): the position within the epoch is kept, the sample order is not the same",
                        target, manifest.get("steps_per_epoch"), steps_per_epoch)
        try:
            self.accelerator.load_state(target)
        except (RuntimeError, KeyError, ValueError) as error:
            raise AccClipError(f"--resume {target}: cannot load: {str(error).splitlines()[0]}") from None
        with open(os.path.join(target, PROGRESS)) as file:
            progress = Progress(**json.load(file))
        log.info("resumed from %s: epoch %d, step %d of the epoch, global step %d", target, progress.epoch,
                 progress.step_in_epoch, progress.global_step)
        return progress

    def _resume_open_clip(self, path: str, model, optimizer) -> Progress:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # torch raises many types for a file that is not a checkpoint
            raise AccClipError(f"--resume {path}: not a checkpoint torch can read ({type(error).__name__})") from None
        state_dict = saved.get("state_dict", saved) if isinstance(saved, dict) else None
        if not isinstance(state_dict, dict):
            raise AccClipError(f"--resume {path}: not an open_clip checkpoint (no state_dict)")
        _load_state_dict_strict(self.accelerator.unwrap_model(model), state_dict, f"--resume {path}")
        if "optimizer" in saved:
            optimizer.load_state_dict(saved["optimizer"])
        epoch = int(saved.get("epoch", 0))
        log.info("started from open_clip checkpoint %s (epoch %d)", path, epoch)
        return Progress(epoch=epoch)

    # save -------------------------------------------------------------------------------------
    def step_save_due(self, progress: Progress) -> bool:
        every = self.config.save_every_n_steps
        return every > 0 and progress.global_step % every == 0

    def save(self, model, optimizer, progress: Progress) -> str:
        name = f"{STEP_PREFIX}{progress.global_step:08d}"
        final, partial = os.path.join(self.directory, name), os.path.join(self.directory, TMP_PREFIX + name)
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(partial)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with open(os.path.join(partial, PROGRESS), "w") as file:
                json.dump(asdict(progress), file)
            manifest = {"model": self.config.model, "name": self.config.name, **asdict(progress),
                        "files": sorted(os.listdir(partial))}
            with open(os.path.join(partial, MANIFEST), "w") as file:
                json.dump(manifest, file)
                file.flush()
                os.fsync(file.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            self._prune()
            log.info("saved checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        keep = self.config.keep_checkpoints
        if keep > 0:
            for old in complete_checkpoints(self.directory)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def end_of_epoch(self, model, optimizer, progress: Progress) -> None:
        """Epoch saves as open_clip makes them (`epoch_N.pt`), plus a full step checkpoint."""
        completed, config = progress.epoch, self.config
        due = completed == config.epochs or (config.save_frequency > 0 and completed % config.save_frequency == 0)
        if not (due or config.save_most_recent):
            return
        self.save(model, optimizer, progress)
        if not self.accelerator.is_main_process:
            return
        exported = open_clip_checkpoint(self.accelerator.unwrap_model(model).state_dict(), optimizer.state_dict(),
                                        self.accelerator.scaler, completed, config.name)
        if due:
            _atomic_torch_save(exported, os.path.join(self.directory, f"epoch_{completed}.pt"))
            previous = os.path.join(self.directory, f"epoch_{completed - 1}.pt")
            if config.delete_previous_checkpoint and os.path.exists(previous):
                os.remove(previous)
        if config.save_most_recent:
            _atomic_torch_save(exported, os.path.join(self.directory, "epoch_latest.pt"))


def open_clip_checkpoint(state_dict: dict, optimizer_state: Optional[dict], scaler, epoch: int, name: str) -> dict:
    """The dict open_clip_train writes and `create_model_and_transforms(pretrained=path)` loads."""
    exported = {"epoch": epoch, "name": name, "state_dict": state_dict}
    if optimizer_state is not None:
        exported["optimizer"] = optimizer_state
    if scaler is not None:
        exported["scaler"] = scaler.state_dict()
    return exported


def _atomic_torch_save(obj: dict, path: str) -> None:
    partial = path + ".tmp"
    torch.save(obj, partial)
    os.replace(partial, path)


def export_main(argv: list[str]) -> int:
    """`acc-clip export CHECKPOINT --out model.pt`: an open_clip epoch_N.pt from a step checkpoint."""
    parser = argparse.ArgumentParser(prog="acc-clip export", description=export_main.__doc__)
    parser.add_argument("checkpoint", help="a checkpoints/step_NNNNNNNN folder")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    args = parser.parse_args(argv)
    manifest = read_manifest(args.checkpoint)
    from safetensors.torch import load_file

    weights = os.path.join(args.checkpoint, "model.safetensors")
    if not os.path.isfile(weights):
        raise AccClipError(f"{args.checkpoint}: no model.safetensors in the checkpoint")
    optimizer_file = os.path.join(args.checkpoint, "optimizer.bin")
    optimizer_state = torch.load(optimizer_file, map_location="cpu", weights_only=False) \
        if os.path.isfile(optimizer_file) else None
    exported = open_clip_checkpoint(load_file(weights), optimizer_state, None, manifest["epoch"], manifest["name"])
    _atomic_torch_save(exported, args.out)
    print(f"wrote {args.out} (model {manifest['model']}, epoch {manifest['epoch']}, step {manifest['global_step']})")
    return 0

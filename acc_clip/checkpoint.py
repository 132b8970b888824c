"""Checkpoints a user can trust: atomic step checkpoints on Accelerate's save_state/load_state,
exact mid-epoch resume, graceful preemption, and open_clip `epoch_N.pt` exports.

Layout. `<run>/checkpoints/step_NNNNNNNN/` holds Accelerate's state (model.safetensors,
optimizer.bin, scaler.pt under fp16, random_states_<rank>.pkl for every process) and
`complete.json`, the manifest: training progress (epoch, step within the epoch, global step,
samples seen), the data position and the settings it depends on, and every file with its size.
A save is written to `checkpoints/.tmp-step_NNNNNNNN/` and renamed into place only after the
manifest is written, so a folder without a manifest is never resumed from; partial folders left
by a crash are removed at the next start.

Data position. The sample order of an epoch is rebuilt from (seed, epoch), so the next unseen
micro-batch (step in epoch x --accum-freq) is all a resume needs; the batches already done are
skipped as indices, not decoded. The learning rate is a function of the global step.

Test hooks, read from the environment (off unless set):
- ACC_CLIP_TEST_KILL_BEFORE_COMMIT=STEP: `save` at global step STEP kills its own process with
  SIGKILL after Accelerate wrote the state and before the manifest and the rename, i.e. a
  `kill -9` in the middle of writing a checkpoint.
- ACC_CLIP_DEBUG_SAMPLES=1: every optimizer step appends its samples to `<run>/samples.jsonl`
  (`SampleLog`), so tests observe which samples each epoch really saw.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from acc_clip.config import TrainConfig
from acc_clip.errors import AccClipError

log = logging.getLogger("acc_clip")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on SIGTERM/SIGINT after saving; rerun with --resume latest
FORMAT_VERSION = 1
MANIFEST = "complete.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
WEIGHTS_FILE = "model.safetensors"  # Accelerate's name for the first model's weights
OPTIMIZER_FILE = "optimizer.bin"
SCALER_FILE = "scaler.pt"
KILL_BEFORE_COMMIT_ENV = "ACC_CLIP_TEST_KILL_BEFORE_COMMIT"
SAMPLES_ENV = "ACC_CLIP_DEBUG_SAMPLES"
SAMPLES_FILE = "samples.jsonl"
METRICS_FILE = "metrics.jsonl"


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
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves and exits with
    PREEMPTED_EXIT_CODE. A second SIGINT interrupts at once."""

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

    def agreed(self, host_group=None) -> bool:
        """Whether any process was asked to stop. A scheduler signals the ranks at slightly
        different times; all must stop after the same step or the save's collectives would hang.
        The vote goes over a CPU process group (None with one process), so the device is not
        synchronised. Every rank must call this once per step."""
        if host_group is None:
            return self.requested
        vote = torch.tensor([int(self.requested)], dtype=torch.int32)
        torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX, group=host_group)
        if vote.item() and not self.requested:
            self.signal_name = "a stop signal on another process"
        return bool(vote.item())


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`. Schedulers often signal the whole process group (SLURM's
    scancel, Ctrl-C in a terminal); torch's workers die of SIGTERM, and the main process then fails
    with "DataLoader worker ... is killed by signal" instead of finishing its step and saving.
    Workers ignore both signals: the main process shuts them down, and they exit if it dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
        inside = complete_checkpoints(path) or complete_checkpoints(os.path.join(path, "checkpoints"))
        hint = f"; it holds checkpoints, e.g. {inside[-1]}" if inside else ""
        raise AccClipError(f"{source} {path}: not an acc_clip checkpoint (no {MANIFEST}){hint}")
    try:
        with open(manifest_path) as file:
            manifest = json.load(file)
        files, progress = manifest["files"], manifest["progress"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise AccClipError(f"{source} {path}: {MANIFEST} is damaged") from None
    for name, size in files.items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise AccClipError(f"{source} {path}: damaged checkpoint, {name} is missing")
        if os.path.getsize(file_path) != size:
            raise AccClipError(f"{source} {path}: damaged checkpoint, {name} has {os.path.getsize(file_path)} "
                               f"bytes, the manifest says {size}")
    if set(progress) != set(Progress.__dataclass_fields__):
        raise AccClipError(f"{source} {path}: {MANIFEST} has progress fields {sorted(progress)}")
    return manifest


def _fsync_folder(path: str) -> None:
    """Data first, then the folder entry, so a power loss cannot leave a renamed but empty save."""
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as file:
            os.fsync(file.fileno())
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# model weights -----------------------------------------------------------------------------------

def plain_key(key: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP's `module.`, torch.compile's `_orig_mod.`),
    so checkpoints load whatever the number of processes or compilation."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def plain_model(accelerator, model) -> torch.nn.Module:
    return accelerator.unwrap_model(model, keep_torch_compile=False)


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
        raise AccClipError(f"{source}: weights of another architecture ({what}; {len(unexpected)} unexpected, "
                           f"{len(missing)} missing)")


def weights_are_finite(model: torch.nn.Module) -> bool:
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all().item()) if flags else True


# the manager -------------------------------------------------------------------------------------

class CheckpointManager:
    """Saves and resumes one run. All processes call every method (saves are collective)."""

    def __init__(self, run_dir: str, config: TrainConfig, accelerator):
        self.run_dir = run_dir
        self.directory = os.path.join(run_dir, "checkpoints")
        self.config = config
        self.accelerator = accelerator
        self.global_batch = config.batch_size * config.accum_freq * accelerator.num_processes
        self.steps_per_epoch: Optional[int] = None  # known once `resume` is called
        self.remote = None
        if accelerator.is_main_process:
            os.makedirs(self.directory, exist_ok=True)
            for name in os.listdir(self.directory):  # partial saves of a crashed run
                if name.startswith(TMP_PREFIX):
                    log.info("removing %s, a save that was interrupted", name)
                    _remove(os.path.join(self.directory, name))
            if config.remote_sync:
                from acc_clip.remote_sync import RemoteSync

                self.remote = RemoteSync(run_dir, config.remote_sync, config.remote_sync_protocol,
                                         config.remote_sync_frequency, prune=config.keep_checkpoints > 0)
        # Weights are stored under their plain names, and loaded here with an architecture check.
        accelerator.register_save_state_pre_hook(_save_plain_weights)
        accelerator.register_load_state_pre_hook(self._load_weights)
        accelerator.wait_for_everyone()

    # resume -----------------------------------------------------------------------------------
    def resume(self, model, optimizer, steps_per_epoch: int) -> Progress:
        """Restore the state `--resume` names and return where training stands; then start the
        remote copy, if any."""
        self.steps_per_epoch = steps_per_epoch
        progress = self._restore(model, optimizer)
        if self.accelerator.is_main_process:
            for name in (METRICS_FILE, SAMPLES_FILE):
                _rewind_jsonl(os.path.join(self.run_dir, name), progress.global_step)
            if self.remote is not None:
                self.remote.start()
        self.accelerator.wait_for_everyone()
        return progress

    def _restore(self, model, optimizer) -> Progress:
        target = self.config.resume
        if target is None:
            return Progress()
        if target == "latest":
            if self.remote is not None:
                self.remote.fetch_newest_checkpoint()
            self.accelerator.wait_for_everyone()
            found = complete_checkpoints(self.directory)
            if not found:
                log.info("--resume latest: no checkpoint in %s yet, starting from the beginning", self.directory)
                return Progress()
            target = found[-1]
        if os.path.isfile(target):
            return self._start_from_open_clip(target, model, optimizer)
        return self._resume_folder(target)

    def _resume_folder(self, path: str) -> Progress:
        manifest = read_manifest(path)
        if manifest.get("model") != self.config.model:
            log.warning("--resume %s: saved from model %r, this run names %r; loading as the weights' shapes agree",
                        path, manifest.get("model"), self.config.model)
        self._warn_if_data_differs(path, manifest.get("data", {}))
        try:
            self.accelerator.load_state(path)
        except AccClipError:
            raise
        except Exception as error:  # torch and pickle raise many types for damaged files
            raise AccClipError(f"--resume {path}: cannot load: {type(error).__name__}: "
                               f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from None
        rng_file = os.path.join(path, f"random_states_{self.accelerator.process_index}.pkl")
        if not os.path.isfile(rng_file):
            log.warning("--resume %s: no random state saved for process %d (fewer processes then); "
                        "its random streams start afresh", path, self.accelerator.process_index)
        progress = Progress(**manifest["progress"])
        log.info("resumed from %s: epoch %d, step %d of the epoch, global step %d, %d samples seen", path,
                 progress.epoch, progress.step_in_epoch, progress.global_step, progress.samples_seen)
        if self.accelerator.is_main_process and os.path.dirname(os.path.abspath(path)) == os.path.abspath(
                self.directory):
            newer = [c for c in complete_checkpoints(self.directory) if os.path.basename(c) > os.path.basename(path)]
            if newer:
                log.warning("--resume %s: %d newer checkpoint(s) of the earlier run remain (newest %s); "
                            "--resume latest would pick them until this run passes them", path, len(newer),
                            os.path.basename(newer[-1]))
        return progress

    def _warn_if_data_differs(self, path: str, saved: dict) -> None:
        # The order depends on the seed and the global micro-batch (per-process batch x processes),
        # not on how the processes share it: 2 x 8 resumes 1 x 16 exactly.
        now = self._data_settings()
        changed = [key for key in ("seed", "global_micro_batch", "accum_freq", "steps_per_epoch")
                   if key in saved and saved[key] != now[key]]
        if changed:
            what = ", ".join(f"{key} {saved[key]} -> {now[key]}" for key in changed)
            log.warning("--resume %s: %s since the save: the epoch's sample order or position differs, so "
                        "the rest of this epoch may repeat or skip samples", path, what)

    def _load_weights(self, models: list, input_dir: str) -> None:
        """Accelerate's load pre-hook: load the plain-named weights into the unwrapped model, checking
        the architecture first; Accelerate then restores optimizer, scaler and RNG states."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        for index, wrapped in enumerate(models):
            name = WEIGHTS_FILE if index == 0 else WEIGHTS_FILE.replace(".", f"_{index}.")
            path = os.path.join(input_dir, name)
            with safe_open(path, framework="pt") as file:
                shapes = {plain_key(key): tuple(file.get_slice(key).get_shape()) for key in file.keys()}
            target = plain_model(self.accelerator, wrapped)
            check_architecture(target, shapes, f"--resume {input_dir}")
            target.load_state_dict({plain_key(k): v for k, v in load_file(path).items()})
        models.clear()  # loaded: Accelerate must not load them again

    def _start_from_open_clip(self, path: str, model, optimizer) -> Progress:
        """An open_clip epoch_N.pt (or a bare state dict): weights, plus optimizer and scaler when
        present; training goes on with epoch N, the learning rate where open_clip's would be."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a file that is not a checkpoint
            raise AccClipError(f"--resume {path}: not a checkpoint torch can read ({type(error).__name__})") from None
        state_dict = saved.get("state_dict", saved) if isinstance(saved, dict) else None
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise AccClipError(f"--resume {path}: not an open_clip checkpoint (no state_dict of tensors)")
        state_dict = {plain_key(key): value for key, value in state_dict.items()}
        target = plain_model(self.accelerator, model)
        check_architecture(target, {k: tuple(v.shape) for k, v in state_dict.items()}, f"--resume {path}")
        target.load_state_dict(state_dict)
        try:
            if "optimizer" in saved:
                optimizer.load_state_dict(saved["optimizer"])
            if "scaler" in saved and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(saved["scaler"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise AccClipError(f"--resume {path}: its optimizer state does not fit this model's parameter "
                               f"groups ({str(error).splitlines()[0]})") from None
        epoch = int(saved.get("epoch", 0))
        global_step = epoch * self.steps_per_epoch
        log.info("started from open_clip checkpoint %s: epoch %d, global step %d", path, epoch, global_step)
        return Progress(epoch=epoch, global_step=global_step, samples_seen=global_step * self.global_batch)

    # save -------------------------------------------------------------------------------------
    def step_save_due(self, progress: Progress) -> bool:
        every = self.config.save_every_n_steps
        return every > 0 and progress.global_step % every == 0

    def save(self, model, optimizer, progress: Progress) -> str:
        """A complete step checkpoint, or nothing: see the module docstring."""
        self._refuse_non_finite(model, progress)
        name = step_name(progress.global_step)
        final, partial = os.path.join(self.directory, name), os.path.join(self.directory, TMP_PREFIX + name)
        started = time.perf_counter()
        if self.accelerator.is_main_process:
            _remove(partial)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(partial)
        self.accelerator.wait_for_everyone()  # every process has written its random states
        if self.accelerator.is_main_process:
            if os.environ.get(KILL_BEFORE_COMMIT_ENV) == str(progress.global_step):
                os.kill(os.getpid(), signal.SIGKILL)  # test hook, see the module docstring
            self._write_manifest(partial, progress)
            _fsync_folder(partial)
            _commit(partial, final)
            self._prune()
            log.info("saved checkpoint %s (%.1f MB, %.2f s)", final, folder_bytes(final) / 1e6,
                     time.perf_counter() - started)
        self.accelerator.wait_for_everyone()
        return final

    def _refuse_non_finite(self, model, progress: Progress) -> None:
        # Every process holds the same weights, so all of them stop here together.
        if not weights_are_finite(plain_model(self.accelerator, model)):
            raise AccClipError(f"the weights are not finite after step {progress.global_step} (epoch "
                               f"{progress.epoch}): not saving them; the last checkpoint saved before is kept "
                               "(resume with --resume latest, perhaps with a lower --lr or --grad-clip-norm)")

    def _data_settings(self) -> dict:
        world_size = self.accelerator.num_processes
        return {"seed": self.config.seed, "batch_size": self.config.batch_size, "world_size": world_size,
                "global_micro_batch": self.config.batch_size * world_size, "accum_freq": self.config.accum_freq,
                "steps_per_epoch": self.steps_per_epoch, "train_data": self.config.train_data}

    def _write_manifest(self, folder: str, progress: Progress) -> None:
        manifest = {
            "format": FORMAT_VERSION,
            "model": self.config.model,
            "name": self.config.name,
            "progress": asdict(progress),
            # the position in the epoch's rebuilt order: micro-batches each process has consumed
            "data": {"epoch": progress.epoch, "next_micro_batch": progress.step_in_epoch * self.config.accum_freq,
                     **self._data_settings()},
            "files": {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with open(os.path.join(folder, MANIFEST), "w") as file:
            json.dump(manifest, file, indent=1)

    def _prune(self) -> None:
        keep = self.config.keep_checkpoints
        if keep > 0:
            for old in complete_checkpoints(self.directory)[:-keep]:
                _remove(old)

    def end_of_epoch(self, model, optimizer, progress: Progress) -> None:
        """Epoch saves as open_clip makes them (`epoch_N.pt`), then a full step checkpoint. The export
        comes first: a crash between the two resumes from before the epoch's end and exports again."""
        completed, config = progress.epoch, self.config
        due = completed == config.epochs or (config.save_frequency > 0 and completed % config.save_frequency == 0)
        if not (due or config.save_most_recent):
            return
        self._refuse_non_finite(model, progress)
        if self.accelerator.is_main_process:
            scaler = self.accelerator.scaler
            exported = open_clip_checkpoint(plain_model(self.accelerator, model).state_dict(), optimizer.state_dict(),
                                            scaler.state_dict() if scaler is not None else None, completed,
                                            config.name)
            if due:
                _atomic_torch_save(exported, os.path.join(self.directory, f"epoch_{completed}.pt"))
                if config.delete_previous_checkpoint:
                    # open_clip removes epoch_{N-1}.pt, even when it never saved one (--save-frequency > 1)
                    # and after an epoch that saved nothing; here: the older epoch files, once a new one exists.
                    for older in _epoch_files(self.directory, before=completed):
                        os.remove(older)
            if config.save_most_recent:
                _atomic_torch_save(exported, os.path.join(self.directory, "epoch_latest.pt"))
        self.save(model, optimizer, progress)


def _epoch_files(directory: str, before: int) -> list[str]:
    matches = (re.fullmatch(r"epoch_(\d+)\.pt", name) for name in os.listdir(directory))
    return [os.path.join(directory, m.group(0)) for m in matches if m and int(m.group(1)) < before]


def _save_plain_weights(models: list, weights: list[dict], output_dir: str) -> None:
    """Accelerate's save pre-hook: store the weights under their plain names (see `plain_key`),
    contiguous (safetensors refuses channels_last convolution weights)."""
    for index, state in enumerate(weights):
        weights[index] = {plain_key(key): value.contiguous() for key, value in state.items()}


def _commit(partial: str, final: str) -> None:
    """Rename the finished save into place. A save of the same step (an epoch's end right after a
    step save, or a replayed step) replaces the old folder, which is moved aside first so that at
    every moment the name holds a complete checkpoint or nothing."""
    old = os.path.join(os.path.dirname(final), TMP_PREFIX + "old-" + os.path.basename(final))
    if os.path.exists(final):
        _remove(old)
        os.replace(final, old)
    os.replace(partial, final)
    descriptor = os.open(os.path.dirname(final), os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    _remove(old)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def _rewind_jsonl(path: str, global_step: int) -> None:
    """Drop the records of steps at or after `global_step` (0-based `step` field): they were made
    after the checkpoint the run resumes from, and are made again. Torn lines go too."""
    if not os.path.isfile(path):
        return
    with open(path) as file:
        lines = file.readlines()
    kept = [line for line in lines if _record_step(line) < global_step]
    if len(kept) != len(lines):
        partial = path + ".tmp"
        with open(partial, "w") as file:
            file.writelines(kept)
        os.replace(partial, path)
        log.info("%s: dropped %d record(s) of steps from %d on, which are trained again", os.path.basename(path),
                 len(lines) - len(kept), global_step)


def _record_step(line: str) -> float:
    """The step of a jsonl record; a line torn by a kill in mid-write counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class SampleLog:
    """Opt-in debug record (ACC_CLIP_DEBUG_SAMPLES=1): one line per optimizer step and process,
    {"step", "epoch", "rank", "indices"}, in `<run>/samples.jsonl`. Resume tests read it to check that
    no sample of an epoch is seen twice or skipped. Off by default: it costs a write per step."""

    def __init__(self, path: str, rank: int):
        self.path, self.rank = path, rank

    @classmethod
    def from_env(cls, run_dir: str, rank: int) -> Optional["SampleLog"]:
        return cls(os.path.join(run_dir, SAMPLES_FILE), rank) if os.environ.get(SAMPLES_ENV) == "1" else None

    def record(self, step: int, epoch: int, micro_batches: list) -> None:
        indices = [i for batch in micro_batches for i in batch.indices.tolist()]
        line = json.dumps({"step": step, "epoch": epoch, "rank": self.rank, "indices": indices}) + "\n"
        with open(self.path, "a") as file:  # one short append per line: lines of ranks do not interleave
            file.write(line)


# open_clip export --------------------------------------------------------------------------------

def open_clip_checkpoint(state_dict: dict, optimizer_state: Optional[dict], scaler_state: Optional[dict],
                         epoch: int, name: str) -> dict:
    """The dict open_clip_train writes and `create_model_and_transforms(pretrained=path)` loads."""
    exported: dict[str, Any] = {"epoch": epoch, "name": name, "state_dict": state_dict}
    if optimizer_state is not None:
        exported["optimizer"] = optimizer_state
    if scaler_state is not None:
        exported["scaler"] = scaler_state
    return exported


def _atomic_torch_save(obj: dict, path: str) -> None:
    partial = path + ".tmp"
    torch.save(obj, partial)
    os.replace(partial, path)


def _load_if_present(path: str) -> Optional[dict]:
    return torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None


def export_checkpoint(checkpoint: str, out: str) -> str:
    """Write an open_clip epoch_N.pt from a step checkpoint folder; returns a line saying what was
    written. Its `epoch` is the number of epochs completed, as open_clip counts: a checkpoint in
    the middle of epoch e exports as epoch e, and open_clip_train would resume it at e's start."""
    from safetensors.torch import load_file

    manifest = read_manifest(checkpoint, source="export")
    weights = {plain_key(k): v for k, v in load_file(os.path.join(checkpoint, WEIGHTS_FILE)).items()}
    optimizer_state, scaler_state = (_load_if_present(os.path.join(checkpoint, name))
                                     for name in (OPTIMIZER_FILE, SCALER_FILE))
    progress = Progress(**manifest["progress"])
    steps_per_epoch = manifest.get("data", {}).get("steps_per_epoch")
    completed = progress.epoch + int(steps_per_epoch is not None and progress.step_in_epoch == steps_per_epoch)
    _atomic_torch_save(open_clip_checkpoint(weights, optimizer_state, scaler_state, completed, manifest["name"]), out)
    return (f"wrote {out}: model {manifest['model']}, {completed} epoch(s) completed, global step "
            f"{progress.global_step}")


def export_main(argv: list[str]) -> int:
    """`acc-clip export CHECKPOINT --out model.pt`: an open_clip epoch_N.pt from a step checkpoint."""
    parser = argparse.ArgumentParser(prog="acc-clip export", description=export_main.__doc__)
    parser.add_argument("checkpoint", help="a checkpoints/step_NNNNNNNN folder")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.checkpoint, args.out))
    return 0

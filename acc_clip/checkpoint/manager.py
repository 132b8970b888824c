"""Checkpoints a user can trust: atomic step checkpoints on Accelerate's save_state/load_state,
exact mid-epoch resume, and open_clip `epoch_N.pt` files at epoch ends. The folders' format is in
folders.py; the weights' formats in model/weights.py.

Commit. A save is written to `checkpoints/.tmp-step_NNNNNNNN/` and renamed into place only after
the manifest is written, so a folder without a manifest is never resumed from; partial folders
left by a crash are removed at the next start, after a checkpoint that a crash left moved aside
while a save of its step replaced it is put back (folders.commit_folder, restore_moved_aside).

Data position. The sample order of an epoch is rebuilt from (seed, epoch), and the position in it is kept in
samples: the epoch's segments, each a layout (processes, per-process batch, workers) and the micro-batches
trained on it (Progress.segments, data/order.py). A resume on the same layout skips the batches done as indices,
not decoded; on another layout the data source serves the samples not trained yet, once each (a source that
cannot, resampled shards, refuses as before). The learning rate is a function of the global step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from time import monotonic
from typing import Any, ClassVar, cast

import torch

from acc_clip.checkpoint.folders import (
    FORMAT_VERSION,
    TMP_PREFIX,
    Progress,
    commit_folder,
    complete_checkpoints,
    newest_intact_checkpoint,
    read_manifest,
    restore_moved_aside,
    step_name,
)
from acc_clip.checkpoint.remote_sync import RemoteSync
from acc_clip.checkpoint.writer import BackgroundFiles, KeptState, Snapshot, load_kept, write_in_step
from acc_clip.config.schema import NON_NEGATIVE, POSITIVE, Needs, Section, option
from acc_clip.errors import (
    KINDS,
    CheckpointError,
    DivergedError,
    ResourceError,
    UsageError,
    attempt,
    kind_name,
    one_line,
)
from acc_clip.io.atomic import fsync_folder, remove_path, save_failure, write_atomically
from acc_clip.io.sealed import folder_bytes, seal
from acc_clip.model.ema import resume_decision
from acc_clip.model.weights import (
    EMA_KEY,
    WEIGHTS_FILE,
    is_sharded_checkpoint,
    load_safetensors_weights,
    load_weights,
    open_clip_checkpoint,
    open_clip_weights,
    plain_key,
    tensor_bytes,
)
from acc_clip.runtime import parallel
from acc_clip.runtime.device import host_vote
from acc_clip.runtime.faults import fault_point
from acc_clip.runtime.parallel import full_state_dict, unwrap
from acc_clip.runtime.run_dir import CHECKPOINTS_DIR, METRICS_FILE, RESULTS_FILE, SAMPLES_FILE, run_id

log = logging.getLogger(__name__)


REMOTE = Needs("--remote-sync", lambda s: bool(s.remote_sync))
RESUMING = Needs("--resume", lambda s: s.resume is not None)


@dataclass
class CheckpointOptions(Section):
    title: ClassVar[str] = "checkpoint"
    save_frequency: int = option(1, "save every N epochs (0: never)", domain=NON_NEGATIVE, train_only=True)
    save_every_n_steps: int = option(
        0, "also save every N optimizer steps (0: never)", domain=NON_NEGATIVE, train_only=True
    )
    save_every_n_minutes: float = option(
        30.0,
        "also save when this many minutes have passed since the run started or last saved, at the same step on "
        "every process (0: never); with the default a crash loses at most about half an hour",
        domain=NON_NEGATIVE,
        train_only=True,
    )
    async_save: bool = option(
        False,
        "write step checkpoints in the background: the step copies the weights and optimizer state to host memory "
        "and training goes on while they are written, hashed and committed (a kill meanwhile leaves the previous "
        "checkpoint); costs host memory for one copy of that state. Under FSDP the shards are written in the step "
        "and only their hashing and the commit go to the background",
        train_only=True,
    )
    keep_checkpoints: int = option(
        3,
        "keep only the newest K step checkpoints (0: keep all); epoch_N.pt files are kept",
        domain=NON_NEGATIVE,
        train_only=True,
    )
    save_most_recent: bool = option(False, "also keep an epoch_latest.pt", train_only=True)
    delete_previous_checkpoint: bool = option(
        False, "delete the previous epoch_N.pt after saving a new one", train_only=True
    )
    resume: str | None = option(None, "'latest', a checkpoint folder, or an open_clip epoch_N.pt", train_only=True)
    fsdp_checkpoint: str = option(
        "full",
        "under FSDP (--fsdp or an FSDP launch config), the form of the epoch saves, as open_clip's flag (full: "
        "gathered on rank 0 into one .pt; sharded: each process writes its shards). full: epoch_N.pt and "
        "epoch_latest.pt gathered whole in open_clip's layout, then the epoch's sharded step checkpoint; "
        "sharded: the epoch's end writes only the sharded step checkpoint (no gather: faster, no whole copy "
        "in memory; rotated by --keep-checkpoints like the others, and `acc-clip export` makes an epoch_N.pt "
        "from it). Step checkpoints are sharded under FSDP either way",
        choices=("full", "sharded"),
        train_only=True,
    )
    resume_changed_data: bool = option(
        False,
        "resume in the middle of an epoch although the data or what its order depends on changed since the save "
        "(the data, the seed, the epoch length; with --dataset-resampled or uncounted shards also processes, batch "
        "size, --workers, --accum-freq): the rest of that epoch may then train some samples twice and others "
        "never; without it such a resume is refused. Other processes, batch size, --workers or --accum-freq "
        "alone resume exactly",
        needs=RESUMING,
        train_only=True,
    )
    remote_sync: str | None = option(None, "copy the run folder to this fsspec URL in the background", train_only=True)
    remote_sync_frequency: int = option(
        300, "seconds between remote copies", domain=POSITIVE, needs=REMOTE, train_only=True
    )
    remote_sync_protocol: str = option("s3", "s3 or fsspec", choices=("s3", "fsspec"), needs=REMOTE, train_only=True)
    remote_stale_after: int = option(
        900,
        "seconds after which another run's heartbeat in the --remote-sync folder counts as stale: a fresher one "
        "means its owner still runs, and --resume latest refuses to adopt the run",
        domain=POSITIVE,
        needs=REMOTE,
        train_only=True,
    )


# What checkpoints saved before layouts were recorded apart held in their order; an elastic source's order lacks them.
LEGACY_LAYOUT_KEYS = ("batch_size", "world_size", "workers", "global_micro_batch")


@dataclass
class RunRecord:
    """What a run's checkpoints record beyond its progress, given by the training loop: the run's name and
    epochs, what it trains (the model, its recorded options, the objective's identity) and the settings the
    data order depends on."""

    name: str
    epochs: int
    model: str
    model_options: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=dict)
    precision: str | None = None  # --precision: how the weights were cast and computed, for evaluating them alike
    seed: int = 0
    batch_size: int = 1
    accum_freq: int = 1
    auto_micro_batch: bool = False  # batch_size and accum_freq were chosen by the memory probe (--auto-micro-batch)
    train_data: str | None = None
    order: dict[str, Any] = field(default_factory=dict)  # what the data source's sample order depends on
    layout: dict[str, Any] = field(default_factory=dict)  # how the data is laid out over processes (TrainData.layout)
    elastic: bool = True  # whether the rest of an epoch begun on another layout is served exactly once
    # what the optimizer's groups depend on (OptimizerOptions.group_identity): its state maps to them by order
    optimizer_groups: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, Any] = field(default_factory=dict)  # the EMA's settings (model/ema.EmaOptions.settings); {}: none
    lora: dict[str, Any] = field(default_factory=dict)  # --lora-rank's settings (model/lora.py); {} without LoRA


class CheckpointManager:
    """Saves and resumes one run. All processes call every method (saves are collective)."""

    def __init__(self, run_dir: str, options: CheckpointOptions, record: RunRecord, accelerator):
        self.run_dir = run_dir
        self.directory = os.path.join(run_dir, CHECKPOINTS_DIR)
        self.options, self.record = options, record
        self.accelerator = accelerator
        self.global_batch = record.batch_size * record.accum_freq * accelerator.num_processes
        self.steps_per_epoch: int | None = None  # known once `resume` is called
        self.remote: RemoteSync | None = None
        self._last_save = monotonic()  # --save-every-n-minutes counts from the start, then from each save
        self._pending: BackgroundFiles | None = None  # a save whose files are being written (--async-save)
        self._pending_progress = Progress()
        self._started, self._needed_bytes = 0.0, 0
        self.kept: KeptState | None = None  # state kept beside the weights (`keep`)
        self._raise_agreed(attempt(self._prepare_folder) if accelerator.is_main_process else None)
        self.sharded_epochs = options.fsdp_checkpoint == "sharded" and parallel.is_fsdp(accelerator)
        if options.fsdp_checkpoint == "sharded" and not self.sharded_epochs:
            log.warning("--fsdp-checkpoint sharded has no effect without FSDP: epoch_N.pt files are written whole")
        # Weights are stored under their plain names, and loaded here with an architecture check.
        accelerator.register_save_state_pre_hook(_save_plain_weights)
        accelerator.register_load_state_pre_hook(self._load_weights)

    def keep(self, state: KeptState) -> None:
        """The one hook through which checkpoints learn new state (the EMA of the weights): `state` is saved in
        every step checkpoint beside the weights (sharded like them under FSDP), loaded on resume, and its whole
        tensors go into epoch_N.pt files under `state_dict_ema`. Call it before `resume`."""
        self.kept = state

    def _prepare_folder(self) -> None:
        """Main process: put back what a killed commit moved aside, remove partial saves, claim the remote copy."""
        os.makedirs(self.directory, exist_ok=True)
        for name in restore_moved_aside(self.directory):  # before they are removed as partial saves
            log.warning("restored %s, moved aside by a save of its step that was interrupted", name)
        for name in os.listdir(self.directory):  # partial saves of a crashed run
            if name.startswith(TMP_PREFIX):
                log.info("removing %s, a save that was interrupted", name)
                remove_path(os.path.join(self.directory, name))
        options = self.options
        if options.remote_sync:
            self.remote = RemoteSync(
                self.run_dir,
                options.remote_sync,
                options.remote_sync_protocol,
                options.remote_sync_frequency,
                prune=options.keep_checkpoints > 0,
                stale_after=options.remote_stale_after,
            )
            self.remote.claim(may_adopt=options.resume == "latest" and not complete_checkpoints(self.directory))

    # resume -----------------------------------------------------------------------------------
    def resume(self, model, optimizer, steps_per_epoch: int) -> Progress:
        """Restore the state `--resume` names and return where training stands; then start the
        remote copy, if any."""
        self.steps_per_epoch = steps_per_epoch
        progress = self._restore(model, optimizer, steps_per_epoch)
        self._raise_agreed(attempt(self._after_restore, progress) if self.accelerator.is_main_process else None)
        return progress

    def _after_restore(self, progress: Progress) -> None:
        """Main process: drop the records of the steps trained again, then start the remote copy. An
        evaluation's `step` counts the steps done before it: those made at the checkpoint's step stay
        (a step's evaluation comes before its save), later ones are made again."""
        for name in (METRICS_FILE, SAMPLES_FILE):
            rewind_jsonl(os.path.join(self.run_dir, name), progress.global_step)
        rewind_jsonl(os.path.join(self.run_dir, RESULTS_FILE), progress.global_step + 1)
        if self.remote is not None:
            self.remote.start()

    def _restore(self, model, optimizer, steps_per_epoch: int) -> Progress:
        target = self.options.resume
        if target is None:
            return Progress()
        if target == "latest":
            self._raise_agreed(attempt(self.remote.fetch_newest_checkpoint) if self.remote is not None else None)
            target, manifest = self._on_main_process(newest_intact_checkpoint, self.directory)
            if target is None:
                log.info("--resume latest: no checkpoint in %s yet, starting from the beginning", self.directory)
                return Progress()
            return self._resume_folder(target, manifest)
        if os.path.isfile(target):
            return self._start_from_open_clip(target, model, optimizer, steps_per_epoch)
        return self._resume_folder(target, self._on_main_process(read_manifest, target))

    def _on_main_process(self, function, *args):
        """function(*args) on the main process only (checking a checkpoint's hashes reads every byte of
        it: once, not once per process), its result or its one-line error given to every process."""
        from accelerate.utils import broadcast_object_list

        answer: list[Any] = [None, None]
        if self.accelerator.is_main_process:
            try:
                answer[0] = function(*args)
            except Exception as error:  # noqa: BLE001 - every process must hear of it, or the others wait
                answer[1] = one_line(error)
        broadcast_object_list(answer)
        if answer[1] is not None:
            raise CheckpointError(answer[1])
        return answer[0]

    def _resume_folder(self, path: str, manifest: dict) -> Progress:
        """Resume from a checkpoint folder whose `manifest` was read and checked (see `_on_main_process`)."""
        # What the run trains on, beyond the weights: resuming with another objective would change the
        # training silently (the weights alone load either way).
        saved = manifest.get("objective")  # absent from checkpoints written before it was recorded
        if saved is not None and saved != self.record.objective:
            raise UsageError(
                f"--resume {path}: saved by a run training {saved}, this run trains "
                f"{self.record.objective}; resume with the flags it was saved with"
            )
        groups = manifest.get("optimizer_groups")  # absent from checkpoints written before it was recorded
        if groups is not None and groups != self.record.optimizer_groups:
            changes = describe_changes(groups, self.record.optimizer_groups)
            raise UsageError(
                f"--resume {path}: the optimizer's groups changed ({changes}); its state would load into "
                "other groups: resume with the flags it was saved with"
            )
        lora = manifest.get("lora", {})  # the adapters' scale (alpha / rank) is not in the weights' shapes
        if lora != self.record.lora:
            changes = describe_changes(lora, self.record.lora) or f"{lora} -> {self.record.lora}"
            raise UsageError(
                f"--resume {path}: LoRA's settings changed ({changes}); resume with the --lora-* flags it was "
                "saved with"
            )
        if manifest.get("model") != self.record.model:
            log.warning(
                "--resume %s: saved from model %r, this run names %r; loading as the weights' shapes agree",
                path,
                manifest.get("model"),
                self.record.model,
            )
        progress = self._saved_progress(manifest)
        # Every process checks its own data (node-local copies may differ): all stop if any refuses.
        self._raise_agreed(attempt(self._check_order, path, manifest.get("data", {}), progress))
        self._raise_agreed(attempt(self._check_random_states, path))
        try:
            self.accelerator.load_state(path)
        except (UsageError, CheckpointError):
            raise
        except Exception as error:  # torch and pickle raise many types for damaged files
            raise CheckpointError(f"--resume {path}: cannot load: {one_line(error)}") from None
        self._restore_kept(path, manifest)
        log.info(
            "resumed from %s: epoch %d, step %d of the epoch, global step %d, %d samples seen",
            path,
            progress.epoch,
            progress.step_in_epoch,
            progress.global_step,
            progress.samples_seen,
        )
        if self.accelerator.is_main_process and os.path.dirname(os.path.abspath(path)) == os.path.abspath(
            self.directory
        ):
            newer = [c for c in complete_checkpoints(self.directory) if os.path.basename(c) > os.path.basename(path)]
            if newer:
                log.warning(
                    "--resume %s: %d newer checkpoint(s) of the earlier run remain (newest %s); "
                    "--resume latest would pick them until this run passes them",
                    path,
                    len(newer),
                    os.path.basename(newer[-1]),
                )
        return progress

    def _restore_kept(self, path: str, manifest: dict) -> None:
        """The kept state (the EMA) from the checkpoint, or afresh from the resumed weights, as `resume_decision`
        decides and says from the manifest's record of it and this run's."""
        load = resume_decision(manifest.get("ema") or {}, self.record.ema, f"--resume {path}")
        if self.kept is None:
            return
        if not load:
            self.kept.copy_weights()
            return
        try:
            load_kept(self.kept, path, parallel.is_fsdp(self.accelerator))
        except Exception as error:  # torch.distributed.checkpoint and safetensors raise many types
            raise CheckpointError(f"--resume {path}: cannot load its {self.kept.name}: {one_line(error)}") from None

    def _check_random_states(self, path: str) -> None:
        """Accelerate's load_state logs a random-state file it cannot read at INFO level and goes on with
        fresh streams, so the resume is silently not exact: read it first with Accelerate's own loader."""
        from accelerate.utils import load

        rng_file = os.path.join(path, f"random_states_{self.accelerator.process_index}.pkl")
        if not os.path.isfile(rng_file):
            log.warning(
                "--resume %s: no random state saved for process %d (fewer processes then); "
                "its random streams start afresh",
                path,
                self.accelerator.process_index,
            )
            return
        try:
            load(rng_file)
        except Exception as error:  # torch and pickle raise many types for a damaged or foreign file
            raise CheckpointError(
                f"--resume {path}: cannot read {os.path.basename(rng_file)} ({type(error).__name__}); "
                "the run's random streams could not be restored exactly"
            ) from None

    def _saved_progress(self, manifest: dict) -> Progress:
        """The manifest's progress; one saved before positions were kept in samples gets the one segment it
        trained, in the layout it recorded (or this run's, where it recorded none)."""
        progress = Progress(**manifest["progress"])
        if progress.step_in_epoch and "segments" not in manifest["progress"]:
            data = manifest.get("data", {})
            recorded = {key: data.get("order", {}).get(key, data.get(key)) for key in self.record.layout}
            layout = recorded if None not in recorded.values() else self.record.layout
            batches = data.get("next_micro_batch", progress.step_in_epoch * self.record.accum_freq)
            progress.segments = [{"layout": layout, "batches": batches}]
        return progress

    def _check_order(self, path: str, saved: dict, progress: Progress) -> None:
        """A resume in the middle of an epoch continues its sample order: the seed and what the data source says
        the order depends on (the data's fingerprint, the epoch length) must be those of the save; for a source
        that is not elastic also the layout (processes, batch size, workers: in its order) and the position
        (steps per epoch, --accum-freq). Anything else would train some samples of the epoch twice and others
        never: refused in one line naming what changed, unless --resume-changed-data (a warning). At an epoch's end
        nothing of the epoch remains, and the next epochs simply follow the new settings."""
        now = self._data_settings()
        elastic = self.record.elastic and "order" in saved
        if elastic:
            keys: tuple[str, ...] = ("seed", "order")
            saved = {**saved, "order": self._order_without_layout(saved)}
        elif "order" in saved:
            keys = ("seed", "accum_freq", "steps_per_epoch", "order")
        else:  # a checkpoint from before the order was recorded: what it recorded then
            keys = ("seed", "global_micro_batch", "accum_freq", "steps_per_epoch")
        changed = describe_changes({key: saved[key] for key in keys if key in saved}, now)
        if not changed:
            if elastic and progress.segments and progress.segments[-1]["layout"] != self.record.layout:
                log.info(
                    "--resume %s: the layout changed since the save (%s): the rest of epoch %d trains the samples "
                    "not trained yet, each once, on this run's layout",
                    path,
                    describe_changes(progress.segments[-1]["layout"], self.record.layout),
                    progress.epoch,
                )
            return
        # Nothing of the epoch remains at its start, or after its last step when the loop still counts that step
        # as the last (the same steps per epoch).
        done = (
            progress.step_in_epoch == 0
            or progress.step_in_epoch == saved.get("steps_per_epoch") == now["steps_per_epoch"]
        )
        if done:
            log.info("--resume %s: %s since the save; the next epochs follow the new settings", path, changed)
            return
        consequence = f"the rest of epoch {progress.epoch} would train some samples twice and others never"
        if not self.options.resume_changed_data:
            raise UsageError(
                f"--resume {path}: {changed} since the save: {consequence}; resume with the settings "
                "and data it was saved with, or pass --resume-changed-data to go on anyway"
            )
        log.warning("--resume %s: %s since the save (--resume-changed-data): %s", path, changed, consequence)

    def _order_without_layout(self, saved: dict) -> dict:
        """The saved order as an elastic source records it now: checkpoints saved before layouts were recorded
        apart kept the layout in the order, and from shards an epoch length rounded down to the global batch."""
        order = dict(saved["order"])
        if "layout" in saved:
            return order
        global_batch = order.get("batch_size", 0) * order.get("world_size", 0) or order.get("global_micro_batch")
        for key in LEGACY_LAYOUT_KEYS:
            order.pop(key, None)
        now = self.record.order.get("data")
        counts = now.get("counts_sha256") if isinstance(now, dict) and order.get("source") == "webdataset" else None
        if counts is not None and isinstance(order.get("data"), dict):  # saved before per-shard counts were recorded
            order["data"] = {**order["data"], "counts_sha256": counts}
        samples = self.record.order.get("samples")
        if (
            order.get("source") == "webdataset"
            and global_batch
            and order.get("samples") == (samples // global_batch * global_batch if isinstance(samples, int) else None)
        ):
            order["samples"] = samples
        return order

    def _load_weights(self, models: list, input_dir: str) -> None:
        """Accelerate's load pre-hook: load the plain-named weights into the unwrapped model, checking
        the architecture first; Accelerate then restores optimizer, scaler and RNG states."""
        if self._sharded_weights(models, input_dir):
            return
        for index, wrapped in enumerate(models):
            name = WEIGHTS_FILE if index == 0 else WEIGHTS_FILE.replace(".", f"_{index}.")
            load_safetensors_weights(unwrap(wrapped), os.path.join(input_dir, name), f"--resume {input_dir}")
        models.clear()  # loaded: Accelerate must not load them again

    def _sharded_weights(self, models: list, input_dir: str) -> bool:
        """Under FSDP, Accelerate reads the sharded weights (torch.distributed.checkpoint, resharded to
        this run's processes) and optimizer state itself; a checkpoint and a run that differ in being
        sharded are refused in one line. Returns whether Accelerate loads the weights."""
        sharded_run, sharded_save = parallel.is_fsdp(self.accelerator), is_sharded_checkpoint(input_dir)
        if sharded_save and not sharded_run:
            raise UsageError(
                f"--resume {input_dir}: a sharded (FSDP) checkpoint; resume it with --fsdp or under an FSDP "
                "launch config (launch/fsdp.yaml), on any number of processes"
            )
        if sharded_run and not sharded_save:
            raise UsageError(
                f"--resume {input_dir}: a DDP or one-process checkpoint; resume it without FSDP (no --fsdp, "
                "no FSDP launch config)"
            )
        return sharded_run

    def _start_from_open_clip(self, path: str, model, optimizer, steps_per_epoch: int) -> Progress:
        """An open_clip epoch_N.pt (or a bare state dict): weights, plus optimizer and scaler when
        present; training goes on with epoch N, the learning rate where open_clip's would be."""
        if parallel.is_fsdp(self.accelerator):
            raise UsageError(
                f"--resume {path}: an open_clip checkpoint cannot be resumed under the FSDP launch "
                "config yet; resume a step checkpoint folder, or start from it without FSDP"
            )
        saved = load_weights(unwrap(model), path, "--resume") or {}
        try:
            if "optimizer" in saved:
                load_optimizer_state(optimizer, saved["optimizer"])
            if "scaler" in saved and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(saved["scaler"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(
                f"--resume {path}: its optimizer state does not fit this model's parameter "
                f"groups ({str(error).splitlines()[0]})"
            ) from None
        self._kept_from_epoch_file(saved.get(EMA_KEY), path)
        epoch = int(saved.get("epoch", 0))
        global_step = epoch * steps_per_epoch
        log.info("started from open_clip checkpoint %s: epoch %d, global step %d", path, epoch, global_step)
        return Progress(epoch=epoch, global_step=global_step, samples_seen=global_step * self.global_batch)

    def _kept_from_epoch_file(self, saved: dict | None, path: str) -> None:
        """An epoch_N.pt's EMA (`state_dict_ema`) into the kept state, or the kept state afresh from its weights."""
        if self.kept is None:
            return
        if saved is None:
            log.warning("--resume %s: no %s in it; the EMA starts from its weights", path, EMA_KEY)
            self.kept.copy_weights()
            return
        live = self.kept.tensors()  # what trains and the buffers; the file holds every weight (frozen ones too)
        if not live.keys() <= saved.keys():
            raise CheckpointError(f"--resume {path}: its {EMA_KEY} holds other tensors than this model's")
        with torch.no_grad():
            for name, tensor in live.items():
                tensor.copy_(saved[name])

    # save -------------------------------------------------------------------------------------
    def step_save_due(self, progress: Progress, host_group=None) -> bool:
        """Whether to save after this step: every --save-every-n-steps steps, or once --save-every-n-minutes
        have passed. The processes' clocks differ (each started it at its own moment), and all must save at
        the same step or the save's collectives would hang, so they vote over the CPU group (None with one
        process): one is due, all are. Every process must call this once per step."""
        every, minutes = self.options.save_every_n_steps, self.options.save_every_n_minutes
        by_steps = every > 0 and progress.global_step % every == 0
        if minutes <= 0:
            return by_steps
        late = host_vote(monotonic() - self._last_save >= minutes * 60, host_group)  # first: every process votes
        return by_steps or late

    def save(self, model, optimizer, progress: Progress) -> str:
        """Start a step checkpoint of `progress` and return the folder it will have. It is committed before
        this returns, or with --async-save once every process has written its files (`poll`, `complete`):
        the steps in between train while the files are written. One save at a time: the previous one is
        committed first. A save that fails on any process (a full disk, say) removes its partial folder and
        stops every process with one line; the checkpoints saved before are untouched."""
        self.complete()
        self._refuse_non_finite(model, progress)
        name = step_name(progress.global_step)
        partial = os.path.join(self.directory, TMP_PREFIX + name)
        self._started, self._needed_bytes = (
            time.perf_counter(),
            state_bytes(model, optimizer) + (tensor_bytes(self.kept.tensors()) if self.kept is not None else 0),
        )
        if self.accelerator.is_main_process:
            remove_path(partial)
        self.accelerator.wait_for_everyone()
        snapshot, failure = Snapshot(), None
        try:
            snapshot = write_in_step(self.accelerator, model, optimizer, partial, self.kept)
        except Exception as error:  # noqa: BLE001 - every process must hear of it, or the others wait
            failure = error
        self._raise_save_failure(self._agreed_failure(failure), partial)
        self._pending = BackgroundFiles(
            snapshot,
            partial,
            self.accelerator.process_index,
            progress.global_step,
            background=self.options.async_save,
        )
        self._pending_progress = replace(progress)
        self._last_save = monotonic()
        if not self.options.async_save:
            self.complete()
        return os.path.join(self.directory, name)

    def poll(self, host_group=None) -> None:
        """With --async-save, commit the save in flight once every process has written its files. The
        processes vote over the CPU group (None with one process) so that all commit at the same step.
        Every process must call this once per step."""
        if self._pending is None:
            return
        if host_vote(self._pending.done(), host_group, every=True):
            self.complete()

    def complete(self) -> None:
        """Wait for the save in flight, if any, and commit it: the manifest of every process's hashes, then
        the rename. Every process must call this (collective)."""
        from accelerate.utils import gather_object

        if self._pending is None:
            return
        pending, progress = self._pending, self._pending_progress
        self._pending = None
        result = pending.result()
        self._raise_save_failure(
            self._agreed_failure(result if isinstance(result, BaseException) else None), pending.folder
        )
        own = cast(dict, result)
        every = gather_object([own]) if self.accelerator.num_processes > 1 else [own]
        name = step_name(progress.global_step)
        final, commit_failure = os.path.join(self.directory, name), None
        if self.accelerator.is_main_process:
            fault_point("before_commit", progress.global_step)
            hashes = {file: each for part in every for file, each in part.items()}
            commit_failure = attempt(self._commit, pending.folder, final, progress, hashes)
        self._raise_save_failure(self._agreed_failure(commit_failure), pending.folder)
        if self.accelerator.is_main_process:
            log.info(
                "saved checkpoint %s (%.1f MB, %.2f s)",
                final,
                folder_bytes(final) / 1e6,
                time.perf_counter() - self._started,
            )

    def _raise_save_failure(self, failure: tuple[str, str] | None, partial: str) -> None:
        """After an agreed failure of a save: its partial folder removed, one line on every process."""
        if failure is None:
            return
        self._pending = None
        if self.accelerator.is_main_process:
            remove_path(partial)
        name = os.path.basename(partial)[len(TMP_PREFIX) :]
        raise ResourceError(save_failure(f"checkpoint {name}", self.directory, failure[1], self._needed_bytes))

    def _commit(self, partial: str, final: str, progress: Progress, hashes: dict) -> None:
        self._write_manifest(partial, progress, hashes)
        fsync_folder(partial, files=False)  # each process flushed its own files
        commit_folder(partial, final, progress.global_step)
        self._prune(keep=final)

    def _agreed_failure(self, failure: BaseException | None) -> tuple[str, str] | None:
        """The first process's failure as (its kind, one line), the same on every process; None when all
        succeeded. Every process must call it: a process that stopped alone would hang the others."""
        from accelerate.utils import gather_object

        described = None if failure is None else (kind_name(failure, CheckpointError), one_line(failure))
        if self.accelerator.num_processes == 1:
            return described
        return next((each for each in gather_object([described]) if each is not None), None)

    def _raise_agreed(self, failure: BaseException | None) -> None:
        """After a step some processes took alone: every process raises the first failure, of its kind, or
        none does."""
        agreed = self._agreed_failure(failure)
        if agreed is not None:
            raise KINDS[agreed[0]](agreed[1])

    def _refuse_non_finite(self, model, progress: Progress) -> None:
        # The processes vote (under FSDP each holds another shard), so all of them stop here together.
        if not parallel.weights_are_finite(model, self.accelerator):
            raise DivergedError(
                f"the weights are not finite after step {progress.global_step} (epoch "
                f"{progress.epoch}): not saving them; the last checkpoint saved before is kept "
                "(resume with --resume latest, perhaps with a lower --lr or --grad-clip-norm)"
            )

    def _data_settings(self) -> dict:
        world_size, record = self.accelerator.num_processes, self.record
        return {
            "seed": record.seed,
            "batch_size": record.batch_size,
            "world_size": world_size,
            "global_micro_batch": record.batch_size * world_size,
            "accum_freq": record.accum_freq,
            "auto_micro_batch": record.auto_micro_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "train_data": record.train_data,
            "order": record.order,
            "layout": record.layout,
        }

    def _write_manifest(self, folder: str, progress: Progress, hashes: dict) -> None:
        record = self.record
        seal(
            folder,
            {
                "format": FORMAT_VERSION,
                "model": record.model,
                "objective": record.objective,
                "optimizer_groups": record.optimizer_groups,
                # what changes the architecture or preprocessing beyond the model's config (export writes them in)
                "model_options": record.model_options,
                "lora": record.lora,  # the weights hold peft's adapters: export merges them (model/lora.py)
                "precision": record.precision,
                "ema": record.ema,  # the EMA's settings; its tensors are in ema.safetensors or ema/ (sharded)
                "name": record.name,
                "run_id": run_id(self.run_dir),  # which run saved it: remote sync prunes and fetches only its own
                "progress": asdict(progress),
                # the position in the epoch's rebuilt order: micro-batches each process has consumed
                "data": {
                    "epoch": progress.epoch,
                    "next_micro_batch": progress.step_in_epoch * record.accum_freq,
                    **self._data_settings(),
                },
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            hashes,
        )

    def _prune(self, keep: str) -> None:
        """--keep-checkpoints K: remove all but the K newest, never `keep` (the checkpoint just saved, which
        is older than some when a run resumed from an older one)."""
        count = self.options.keep_checkpoints
        if count > 0:
            for old in complete_checkpoints(self.directory)[:-count]:
                if old != keep:
                    remove_path(old)

    def end_of_epoch(self, model, optimizer, progress: Progress) -> None:
        """Epoch saves as open_clip makes them (`epoch_N.pt`), then a full step checkpoint. The export
        comes first: a crash between the two resumes from before the epoch's end and exports again."""
        completed, options = progress.epoch, self.options
        due = completed == self.record.epochs or (
            options.save_frequency > 0 and completed % options.save_frequency == 0
        )
        if not (due or options.save_most_recent):
            return
        if self.sharded_epochs:  # --fsdp-checkpoint sharded: the epoch's save is the sharded step checkpoint
            self.save(model, optimizer, progress)
            return
        self._refuse_non_finite(model, progress)
        main = self.accelerator.is_main_process
        # Collectives under FSDP: every process gathers, the main process alone keeps the whole copy.
        weights, optimizer_state = full_state_dict(model), parallel.full_optimizer_state_dict(model, optimizer, main)
        ema = self.kept.whole_tensors() if self.kept is not None else None
        self._raise_agreed(
            attempt(self._write_epoch_files, weights, optimizer_state, completed, due, ema) if main else None
        )
        self.save(model, optimizer, progress)

    def _write_epoch_files(
        self, weights: dict, optimizer_state: dict | None, completed: int, due: bool, ema: dict | None = None
    ) -> None:
        """Main process: `epoch_N.pt` when due, `epoch_latest.pt` with --save-most-recent (with the EMA, if any).
        Under LoRA the adapters are merged (plain open_clip weights, the EMA's too) and the optimizer state, which
        is the adapters', left out."""
        options, scaler = self.options, self.accelerator.scaler
        weights, ema = open_clip_weights(weights, ema, self.record.lora)
        if self.record.lora:  # the optimizer state is the adapters', which the merge removed
            optimizer_state = None
        scaler_state = scaler.state_dict() if scaler is not None else None
        exported = open_clip_checkpoint(weights, optimizer_state, scaler_state, completed, self.record.name, ema)
        if due:
            save_torch(exported, os.path.join(self.directory, f"epoch_{completed}.pt"))
            if options.delete_previous_checkpoint:
                # open_clip removes epoch_{N-1}.pt, even when it never saved one (--save-frequency > 1)
                # and after an epoch that saved nothing; here: the older epoch files, once a new one exists.
                for older in _epoch_files(self.directory, before=completed):
                    os.remove(older)
        if options.save_most_recent:
            save_torch(exported, os.path.join(self.directory, "epoch_latest.pt"))


GROUP_SETTINGS = ("lr_scale", "weight_decay", "group_name", "use_fallback")  # this run's flags make them


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """An open_clip epoch file's optimizer state (moments, steps) into `optimizer`, its groups' settings kept as
    this run's flags made them: torch's load_state_dict would take the saved ones (an earlier --wd, another layer
    decay's lr_scale) silently. An epoch file records no flags to check them against."""
    settings = [{key: group[key] for key in GROUP_SETTINGS if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, settings):
        for key in GROUP_SETTINGS:
            group.pop(key, None)
        group.update(own)


def describe_changes(saved: dict, now: dict, prefix: str = "") -> str:
    """'key saved -> now, ...' for each key of `saved` whose value differs in `now`, nested dicts by their leaves.
    A "path" is not compared: the same data moved, or named another way ('shards' or 'shards/'), is the same data
    (its fingerprint says so)."""
    parts = []
    for key, before in saved.items():
        if key == "path":
            continue
        after = now.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            inner = describe_changes(before, after, f"{prefix}{key}.")
            parts += [inner] if inner else []
        elif before != after:
            parts.append(f"{prefix}{key} {before} -> {after}")
    return ", ".join(parts)


def save_torch(obj: dict, path: str) -> None:
    """torch.save, atomically (io/atomic.py): `path` holds the old file or the new one."""
    write_atomically(path, lambda partial: torch.save(obj, partial), needed_bytes=tensor_bytes(obj))


def state_bytes(model, optimizer) -> int:
    return tensor_bytes(model.state_dict()) + tensor_bytes(optimizer.state_dict())


def _epoch_files(directory: str, before: int) -> list[str]:
    matches = (re.fullmatch(r"epoch_(\d+)\.pt", name) for name in os.listdir(directory))
    return [os.path.join(directory, m.group(0)) for m in matches if m and int(m.group(1)) < before]


def _save_plain_weights(models: list, weights: list[dict], output_dir: str) -> None:
    """Accelerate's save pre-hook: store the weights under their plain names (see `plain_key`),
    contiguous (safetensors refuses channels_last convolution weights)."""
    for index, state in enumerate(weights):
        weights[index] = {plain_key(key): value.contiguous() for key, value in state.items()}


def rewind_jsonl(path: str, global_step: int) -> None:
    """Drop the records of steps at or after `global_step` (0-based `step` field): they were made
    after the checkpoint the run resumes from, and are made again. Torn lines go too."""
    if not os.path.isfile(path):
        return
    with open(path) as file:
        lines = file.readlines()
    kept = [line for line in lines if _record_step(line) < global_step]
    if len(kept) != len(lines):
        write_atomically(path, "".join(kept))
        log.info(
            "%s: dropped %d record(s) of steps from %d on, which are trained again",
            os.path.basename(path),
            len(lines) - len(kept),
            global_step,
        )


def _record_step(line: str) -> float:
    """The step of a jsonl record; a line torn by a kill in mid-write counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")

"""Writing a step checkpoint's files, in two parts, so that training can go on during the slow one.

In the step (every process, collective): under FSDP, Accelerate's save_state writes the shards
(torch.distributed.checkpoint); otherwise Accelerate's `save_accelerator_state` writes the small files
(each process's random states, the fp16 scaler) and the main process copies the weights and the
optimizer state to host memory (a `Snapshot`). After the step, in the background when `--async-save`:
the main process writes the snapshot as the files Accelerate's load_state reads (model.safetensors
under the weights' plain names, optimizer.bin), and every process hashes and flushes to disk the files
it wrote itself (`owner`). The manager then commits the folder: a manifest of everyone's hashes, then
the rename (checkpoint/manager.py). Nothing is read as a checkpoint before that commit.

Without FSDP the files are those Accelerate's own save_state writes for acc_clip's one model and one
optimizer (it prepares no scheduler or data loader with Accelerate); resume reads them with
Accelerate's load_state, whichever way they were written.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import Protocol

import torch

from acc_clip.checkpoint.folders import OPTIMIZER_FILE
from acc_clip.io.atomic import fsync_entry
from acc_clip.io.files import file_sha256
from acc_clip.io.sealed import list_files
from acc_clip.model.weights import WEIGHTS_FILE, plain_key
from acc_clip.runtime import parallel
from acc_clip.runtime.faults import fault_point

# The files a process writes for itself: its random states, its shards of a sharded save. Every other
# file of a checkpoint is the main process's.
OWN_FILE = re.compile(r"(?:^|/)(?:random_states_(\d+)\.pkl|__(\d+)_\d+\.distcp)$")


def owner(name: str) -> int:
    """The rank that wrote checkpoint file `name` (a '/'-separated path inside the folder)."""
    match = OWN_FILE.search(name)
    return int(match.group(1) or match.group(2)) if match else 0


def host_copy(value):
    """A copy on the host of a state (tensors in dicts, lists, tuples) that later steps cannot change."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(item) for item in value)
    return value


class KeptState(Protocol):
    """State a checkpoint keeps beside the weights (the EMA, model/ema.py), registered with
    CheckpointManager.keep: named tensors, plain or sharded like the weights (DTensors), loaded in place."""

    name: str  # its file (NAME.safetensors) or sharded folder (NAME/) in a step checkpoint, its manifest key

    def tensors(self) -> dict[str, torch.Tensor]: ...  # live: saved from, loaded into

    def whole_tensors(self) -> dict[str, torch.Tensor]: ...  # whole, on the CPU (a collective under FSDP)

    def copy_weights(self) -> None: ...  # start afresh from the weights (a checkpoint without it)


def save_sharded(kept: KeptState, folder: str) -> None:
    """Under FSDP, every process writes its shards of `kept` into `folder/NAME` (torch.distributed.checkpoint,
    as Accelerate writes the weights' shards): a resume on any number of processes reshards them."""
    import torch.distributed.checkpoint as dcp

    dcp.save({kept.name: kept.tensors()}, checkpoint_id=os.path.join(folder, kept.name))


def load_kept(kept: KeptState, folder: str, sharded: bool) -> None:
    """Load a step checkpoint's copy of `kept` into it, in place (resharded by torch.distributed.checkpoint
    under FSDP)."""
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.load({kept.name: kept.tensors()}, checkpoint_id=os.path.join(folder, kept.name))
        return
    from safetensors.torch import load_file

    saved, live = load_file(os.path.join(folder, f"{kept.name}.safetensors")), kept.tensors()
    if saved.keys() != live.keys():
        raise ValueError(f"its {kept.name} holds other tensors than this model's ({len(saved)} vs {len(live)})")
    with torch.no_grad():
        for name, tensor in live.items():
            tensor.copy_(saved[name])


@dataclass
class Snapshot:
    """The main process's copy of the weights (plain names, contiguous) and the optimizer state; empty on
    the other processes and under FSDP, where the shards were written in the step."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict | None = None
    kept: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # KeptState's tensors, by its name

    def write(self, folder: str) -> None:
        from safetensors.torch import save_file

        if self.weights:
            save_file(self.weights, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
        if self.optimizer is not None:
            torch.save(self.optimizer, os.path.join(folder, OPTIMIZER_FILE))
        for name, tensors in self.kept.items():
            save_file(tensors, os.path.join(folder, f"{name}.safetensors"), metadata={"format": "pt"})


def write_in_step(accelerator, model, optimizer, folder: str, kept: KeptState | None = None) -> Snapshot:
    """The part of a save made in the step (every process; see the module docstring), `kept` included."""
    if parallel.is_fsdp(accelerator):
        accelerator.save_state(folder)
        if kept is not None:
            save_sharded(kept, folder)
        return Snapshot()
    from accelerate.checkpointing import save_accelerator_state

    os.makedirs(folder, exist_ok=True)
    save_accelerator_state(
        folder,
        [],  # the weights and the optimizer state: the snapshot's
        [],
        [],
        [],
        accelerator.process_index,
        accelerator.step,
        accelerator.scaler,
        save_on_each_node=accelerator.project_configuration.save_on_each_node,
    )
    if not accelerator.is_main_process:
        return Snapshot()
    weights = {plain_key(key): value.contiguous() for key, value in parallel.full_state_dict(model).items()}
    kept_copy = {} if kept is None else {kept.name: host_copy({k: v.contiguous() for k, v in kept.tensors().items()})}
    return Snapshot(host_copy(weights), host_copy(optimizer.state_dict()), kept_copy)


def finish_files(snapshot: Snapshot, folder: str, rank: int, global_step: int) -> dict[str, tuple[int, str]]:
    """The slow part: write the snapshot, then hash and flush this process's own files. Returns
    {file: (size, SHA-256)} of those files."""
    fault_point("before_background_write", global_step)
    snapshot.write(folder)
    own = {}
    for name, size in list_files(folder).items():
        if owner(name) == rank:
            path = os.path.join(folder, name)
            fsync_entry(path)
            own[name] = (size, file_sha256(path))
    return own


class BackgroundFiles:
    """`finish_files` in a thread (or at once, `background=False`); `result()` waits for it and gives its
    hashes, or the exception it ended with."""

    def __init__(self, snapshot: Snapshot, folder: str, rank: int, global_step: int, *, background: bool):
        self.folder, self.global_step = folder, global_step
        self._hashes: dict[str, tuple[int, str]] | None = None
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        arguments = (snapshot, folder, rank, global_step)
        if background:
            self._thread = threading.Thread(target=self._run, args=arguments, name="checkpoint-writer", daemon=True)
            self._thread.start()
        else:
            self._run(*arguments)

    def _run(self, *arguments) -> None:
        try:
            self._hashes = finish_files(*arguments)
        except Exception as error:  # noqa: BLE001 - reported to every process by the manager
            self._failure = error

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def result(self) -> dict[str, tuple[int, str]] | BaseException:
        if self._thread is not None:
            self._thread.join()
        return self._failure if self._failure is not None else (self._hashes or {})

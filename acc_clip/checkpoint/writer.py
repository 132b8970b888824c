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


@dataclass
class Snapshot:
    """The main process's copy of the weights (plain names, contiguous) and the optimizer state; empty on
    the other processes and under FSDP, where the shards were written in the step."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict | None = None

    def write(self, folder: str) -> None:
        from safetensors.torch import save_file

        if self.weights:
            save_file(self.weights, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
        if self.optimizer is not None:
            torch.save(self.optimizer, os.path.join(folder, OPTIMIZER_FILE))


def write_in_step(accelerator, model, optimizer, folder: str) -> Snapshot:
    """The part of a save made in the step (every process; see the module docstring)."""
    if parallel.is_fsdp(accelerator):
        accelerator.save_state(folder)
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
    return Snapshot(host_copy(weights), host_copy(optimizer.state_dict()))


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

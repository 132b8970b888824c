"""The run folder `<logs>/<name>/` and the names of what a run writes there, defined once."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import socket
from datetime import datetime

from acc_clip.errors import ResourceError, UsageError
from acc_clip.io.atomic import write_atomically

CONFIG_FILE = "config.yaml"  # the resolved config
LOG_FILE = "out.log"  # the log, open_clip_train's name
METRICS_FILE = "metrics.jsonl"  # one record per optimizer step
RESULTS_FILE = "results.jsonl"  # one record per evaluation
SAMPLES_FILE = "samples.jsonl"  # --log-samples: the samples of every step (train/samples.py)
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
PARAM_GROUPS_FILE = "param_groups.json"  # every parameter's optimizer group, lr scale and weight decay
PROFILE_DIR = "profile"  # --profile-steps: one torch.profiler trace per process (train/profiling.py)
LOCK_FILE = "run.lock"  # "HOST PID" of the process writing to the run folder (take_run_lock)
RUN_ID_FILE = "run_id"  # this run's identity on remote storage: what it may overwrite, prune and fetch there
WANDB_ID_FILE = "wandb_id"  # the id of the run folder's wandb run, so that every resume continues that run
# A wandb run id (wandb refuses / \ # ? % : in one); a user may write an existing run's id there to continue it.
WANDB_ID = re.compile(r"[A-Za-z0-9_.\-]+")


def default_run_name(stamp: str, *, model: str, lr, batch_size: int, workers: int, precision: str) -> str:
    """open_clip_train's run name: date, model, lr, batch, workers, precision."""
    return "-".join(
        [
            stamp,
            f"model_{model.replace('/', '-').replace(':', '-')}",
            f"lr_{lr}",
            f"b_{batch_size}",
            f"j_{workers}",
            f"p_{precision}",
        ]
    )


def agreed_stamp(accelerator) -> str:
    """The start time as a run name's date, the main process's on every process."""
    from accelerate.utils import broadcast_object_list

    stamp = [datetime.now().strftime("%Y_%m_%d-%H_%M_%S")]
    broadcast_object_list(stamp)
    return stamp[0]


def run_folder(logs: str, name: str, *, resuming: bool, accelerator) -> str:
    """`<logs>/<name>/`, made (and locked) on the main process."""
    path = os.path.join(logs, name)
    if accelerator.is_main_process:
        if os.path.exists(os.path.join(path, METRICS_FILE)) and not resuming:
            raise UsageError(f"{path} already holds a run: pass --resume latest to continue it, or a new --name")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:  # --logs is a file, or not writable
            raise UsageError(
                f"--logs {logs} --name {name}: cannot make the run folder {path} ({error.strerror or error})"
            ) from None
        take_run_lock(path)
    accelerator.wait_for_everyone()
    return path


def _this_process() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def take_run_lock(path: str) -> None:
    """Hold `<run>/run.lock` while this process writes to the run folder, so that a second run with the
    same name (a repeated command, another machine on the same file system) cannot delete this one's
    partial saves or append to its logs. A lock whose process is gone on this host (a kill -9, a crash)
    is stale and taken over, saying so; one held from another host cannot be checked from here and is
    refused, saying how to clear it. Released when the process exits (and by release_run_lock)."""
    lock = os.path.join(path, LOCK_FILE)
    me = _this_process()
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            host, _, pid = holder.partition(" ")
            if holder == me:  # this process's own (a second run inside one Python process)
                break
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                logging.getLogger(__name__).warning("%s: taking over the lock of process %s, which is gone", path, pid)
                _remove_if_held_by(lock, holder)
                continue
            raise ResourceError(
                f"{path} is in use by another run (process {pid or '?'} on {host or '?'}, per {lock}): "
                "wait for it to end or pick another --name; if that process is gone, delete the lock"
            ) from None
        with os.fdopen(descriptor, "w") as file:
            file.write(me)
        break
    atexit.register(release_run_lock, path)


def _read_holder(lock: str) -> str:
    try:
        with open(lock) as file:
            return file.read().strip()
    except (FileNotFoundError, NotADirectoryError):  # no lock; or the run folder's name is a file, refused earlier
        return ""


def _remove_if_held_by(lock: str, holder: str) -> None:
    if _read_holder(lock) == holder:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)


def release_run_lock(path: str) -> None:
    """Give up `<run>/run.lock` if this process holds it."""
    _remove_if_held_by(os.path.join(path, LOCK_FILE), _this_process())


def wandb_run_id(run_dir: str) -> str:
    """The id of this run folder's wandb run: made on the first start, read back on every later one.
    Call on the main process only (Accelerate starts trackers there)."""
    path = os.path.join(run_dir, WANDB_ID_FILE)
    try:
        with open(path) as file:
            run_id = file.read().strip()
    except FileNotFoundError:
        run_id = secrets.token_hex(6)  # as wandb's own ids: short, random, lowercase letters and digits
        write_atomically(path, run_id + "\n")
        return run_id
    if not WANDB_ID.fullmatch(run_id):
        raise UsageError(
            f"{path} holds {run_id!r}, not a wandb run id (letters, digits, '_', '-', '.'): "
            "fix it, or delete it to start a new wandb run"
        )
    return run_id


def run_id(run_dir: str) -> str:
    """The id of the run in this folder, made on its first start (or taken over with `adopt_run_id`).
    Main process only."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    try:
        with open(path) as file:
            found = file.read().strip()
    except FileNotFoundError:
        found = ""
    if found:
        return found
    made = secrets.token_hex(8)
    write_atomically(path, made + "\n")
    return made


def adopt_run_id(run_dir: str, adopted: str) -> None:
    """Continue the run `adopted` in this folder (a machine that lost its local copy resuming from remote)."""
    write_atomically(os.path.join(run_dir, RUN_ID_FILE), adopted + "\n")

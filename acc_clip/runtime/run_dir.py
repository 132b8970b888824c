"""The run folder `<logs>/<name>/` and the names of what a run writes there, defined once."""

from __future__ import annotations

import os
import re
import secrets
from datetime import datetime

from acc_clip.errors import AccClipError

CONFIG_FILE = "config.yaml"  # the resolved config
LOG_FILE = "out.log"  # the log, open_clip_train's name
METRICS_FILE = "metrics.jsonl"  # one record per optimizer step
RESULTS_FILE = "results.jsonl"  # one record per evaluation
SAMPLES_FILE = "samples.jsonl"  # the opt-in debug record of samples per step (checkpoint/debug.py)
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id"  # the id of the run folder's wandb run, so that every resume continues that run
# A wandb run id (wandb refuses / \ # ? % : in one); a user may write an existing run's id there to continue it.
WANDB_ID = re.compile(r"[A-Za-z0-9_.\-]+")


def default_run_name(config, stamp: str) -> str:
    """open_clip_train's run name: date, model, lr, batch, workers, precision."""
    return "-".join([stamp, f"model_{config.model.replace('/', '-').replace(':', '-')}", f"lr_{config.lr}",
                     f"b_{config.batch_size}", f"j_{config.workers}", f"p_{config.precision}"])


def run_folder(config, accelerator) -> str:
    """`<logs>/<name>/`, named once on the main process and shared, as open_clip names its runs."""
    from accelerate.utils import broadcast_object_list

    if config.name is None:
        stamp = [datetime.now().strftime("%Y_%m_%d-%H_%M_%S")]
        broadcast_object_list(stamp)
        config.name = default_run_name(config, stamp[0])
    path = os.path.join(config.logs, config.name)
    if accelerator.is_main_process:
        if os.path.exists(os.path.join(path, METRICS_FILE)) and config.resume is None:
            raise AccClipError(f"{path} already holds a run: pass --resume latest to continue it, or a new --name")
        os.makedirs(path, exist_ok=True)
    accelerator.wait_for_everyone()
    return path


def write_atomically(path: str, text: str) -> None:
    """`path` holds all of `text` or does not exist: a crash mid-write leaves no half-written file."""
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w") as file:
            file.write(text)
        os.replace(temporary, path)  # same folder, so a rename
    except OSError as error:
        raise AccClipError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


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
        raise AccClipError(f"{path} holds {run_id!r}, not a wandb run id (letters, digits, '_', '-', '.'): "
                           "fix it, or delete it to start a new wandb run")
    return run_id

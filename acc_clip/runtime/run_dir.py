"""The run folder `<logs>/<name>/` and the names of what a run writes there, defined once."""

from __future__ import annotations

import os
from datetime import datetime

from acc_clip.errors import AccClipError

CONFIG_FILE = "config.yaml"  # the resolved config
LOG_FILE = "out.log"  # the log, open_clip_train's name
METRICS_FILE = "metrics.jsonl"  # one record per optimizer step
RESULTS_FILE = "results.jsonl"  # one record per evaluation
SAMPLES_FILE = "samples.jsonl"  # the opt-in debug record of samples per step (checkpoint/debug.py)
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"


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

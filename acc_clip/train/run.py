"""The start of a training run: the device plan, the Accelerator, the run folder with its log, its
config.yaml and its trackers."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

import acc_clip
from acc_clip.config.parsing import to_yaml
from acc_clip.runtime.device import DevicePlan, check_bn_sync, check_compile, make_accelerator, plan_device
from acc_clip.runtime.run_dir import CONFIG_FILE, LOG_FILE, agreed_stamp, default_run_name, run_folder
from acc_clip.runtime.slurm import batch_script_warning, place_from_slurm
from acc_clip.train.config import TrainConfig
from acc_clip.train.metrics import setup_logging, start_trackers, trackers

log = logging.getLogger(__name__)


@dataclass
class Run:
    plan: DevicePlan
    accelerator: Any
    run_dir: str


def copy_codebase(run_dir: str) -> None:
    """--copy-codebase: the acc_clip package as it ran, in <run>/code/acc_clip (open_clip_train copies its own)."""
    shutil.copytree(
        os.path.dirname(acc_clip.__file__),
        os.path.join(run_dir, "code", "acc_clip"),
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )


def limit_cpu_threads(plan: DevicePlan, workers: int, world_size: int) -> None:
    """On the CPU, leave a core to each loader worker: torch's OpenMP threads spin while they wait for
    one another, and sharing cores with busy workers (or other jobs) that can make a step many times
    slower (docs/performance.md). OMP_NUM_THREADS, when set, decides instead."""
    if plan.kind != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // world_size - workers))
    log.info(
        "CPU: %d compute thread(s) per process (%d cores, %d process(es), %d loader workers each; "
        "OMP_NUM_THREADS overrides)",
        torch.get_num_threads(),
        cores,
        world_size,
        workers,
    )


def name_run(config: TrainConfig, accelerator) -> str:
    """--name, or open_clip_train's default name from the start time (the main process's, on every process)."""
    if config.logging.name is None:
        config.logging.name = default_run_name(
            agreed_stamp(accelerator),
            model=config.model.model,
            lr=config.optimizer.lr,
            batch_size=config.data.batch_size,
            workers=config.data.workers,
            precision=config.runtime.precision,
        )
    return config.logging.name


def start_run(config: TrainConfig, notices: list[str]) -> Run:
    slurm = place_from_slurm()  # srun's tasks -> RANK, WORLD_SIZE, ...: read by the plan and the Accelerator
    runtime, logging_options = config.runtime, config.logging
    plan = plan_device(runtime.device, runtime.precision, backend=runtime.dist_backend)
    check_bn_sync(plan, runtime.use_bn_sync)
    check_compile(plan, runtime.compiling())
    # project_dir is refined to the run folder once the run is named (start_trackers).
    accelerator = make_accelerator(
        plan,
        cudnn_benchmark=runtime.cudnn_benchmark,
        static_graph=runtime.ddp_static_graph,
        fsdp=runtime.fsdp_flags(),
        log_with=trackers(logging_options.report_to) or None,
        project_dir=logging_options.logs,
    )
    name = name_run(config, accelerator)
    run_dir = run_folder(
        logging_options.logs, name, resuming=config.checkpoint.resume is not None, accelerator=accelerator
    )
    # --log-local: every process keeps its own log (open_clip_train's out-RANK.log); else the main process, out.log.
    rank = accelerator.process_index
    log_file = (
        os.path.join(run_dir, f"out-{rank}.log")
        if logging_options.log_local
        else os.path.join(run_dir, LOG_FILE)
        if accelerator.is_main_process
        else None
    )
    setup_logging(log_file, accelerator.is_main_process or logging_options.log_local, debug=logging_options.debug)
    log.info(
        "acc_clip run %s: %s, %d process(es), precision %s",
        name,
        plan.describe(),
        accelerator.num_processes,
        runtime.precision,
    )
    if slurm is not None:
        log.info("%s", slurm.describe())
    limit_cpu_threads(plan, config.data.workers, accelerator.num_processes)
    for notice in [*notices, *filter(None, [batch_script_warning(os.environ)])]:
        log.warning(notice)
    if accelerator.is_main_process:
        to_yaml(config, os.path.join(run_dir, CONFIG_FILE))
        log.info("optimizer %s", config.optimizer.describe())
        if logging_options.copy_codebase:
            copy_codebase(run_dir)
    hyperparameters = {k: v for k, v in config.flat().items() if isinstance(v, (int, float, str, bool))}
    start_trackers(accelerator, logging_options, run_dir, hyperparameters)
    return Run(plan, accelerator, run_dir)

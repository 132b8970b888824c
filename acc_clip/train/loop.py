"""The training loop. Runs as `acc-clip train ...`, `python -m acc_clip.train ...` or
`accelerate launch [--config_file launch/single_card.yaml] -m acc_clip.train ...`.

Each concern lives in its own module (config, device, model, data, loss, step, checkpoint, metrics,
eval); this file composes them and reads top to bottom.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import sys
import time

import torch

from acc_clip.checkpoint.debug import SampleLog
from acc_clip.checkpoint.manager import CheckpointManager
from acc_clip.config import TrainConfig, parse_config, save_config
from acc_clip.data import build_train_data, check_bad_fraction
from acc_clip.data.pixels import decode_encoded_batch, model_input, train_transform
from acc_clip.errors import AccClipError, user_error_exit_code
from acc_clip.evaluation.evaluator import Evaluator, format_metrics
from acc_clip.loss import create_objective
from acc_clip.train.metrics import MetricsLogger, StepRecord, setup_logging
from acc_clip.model.build import create_lr_schedule, create_model, create_optimizer, uses_channels_last
from acc_clip.runtime import parallel
from acc_clip.runtime.device import check_bn_sync, host_process_group, make_accelerator, peak_memory_bytes, plan_device
from acc_clip.runtime.run_dir import (CONFIG_FILE, LOG_FILE, TENSORBOARD_DIR, release_run_lock, run_folder,
                                     wandb_run_id)
from acc_clip.runtime.signals import PREEMPTED_EXIT_CODE, StopSignal
from acc_clip.runtime.slurm import batch_script_warning, place_from_slurm
from acc_clip.train.step import agree_batch_sizes, train_step

log = logging.getLogger(__name__)


def trackers(report_to: str) -> list[str]:
    """`--report-to tensorboard|wandb|all` as Accelerate tracker names."""
    names = {part.strip() for part in report_to.split(",") if part.strip()}
    if "all" in names:
        names = (names - {"all"}) | {"tensorboard", "wandb"}
    unknown = names - {"tensorboard", "wandb"}
    if unknown:
        raise AccClipError(f"--report-to {report_to!r}: unknown tracker {sorted(unknown)[0]!r}; "
                           "expected tensorboard, wandb or all")
    return sorted(names)


def wandb_init_kwargs(config: TrainConfig, run_dir: str) -> dict:
    """wandb.init's arguments: one wandb run per run folder, continued by every resume of it, as
    open_clip_train's `wandb.init(id=..., resume='auto')`. "allow" resumes the run when wandb knows the id
    and starts it under that id when not (the first start, or a run wandb never received)."""
    return {"name": config.name, "notes": config.wandb_notes, "dir": run_dir, "id": wandb_run_id(run_dir),
            "resume": "allow"}


def start_trackers(accelerator, config: TrainConfig, run_dir: str) -> None:
    if not config.report_to:
        return
    # TensorBoard events go to <run>/tensorboard/<project>/; wandb's project is --wandb-project-name.
    accelerator.project_configuration.project_dir = run_dir
    accelerator.project_configuration.logging_dir = os.path.join(run_dir, TENSORBOARD_DIR)
    hyperparameters = {k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))}
    # Accelerate starts trackers on the main process only: the wandb id file is read or made there alone.
    wandb = "wandb" in trackers(config.report_to) and accelerator.is_main_process
    accelerator.init_trackers(config.wandb_project_name, config=hyperparameters,
                              init_kwargs={"wandb": wandb_init_kwargs(config, run_dir)} if wandb else {})


def report_evaluation(results: dict, metrics: MetricsLogger, *, epoch: int, step: int, when: str) -> None:
    if not results:
        return
    log.info("Eval %s (epoch %d, step %d): %s", when, epoch, step, format_metrics(results))
    metrics.write_result({"epoch": epoch, "step": step, **results})


def evaluate(evaluator: Evaluator, model, completed_epochs: int, **when) -> dict:
    """The evaluator's metrics on whole weights: under FSDP they are gathered once for the pass, so
    each process encodes its own rows without collectives (runtime/parallel.gathered)."""
    if not evaluator.enabled:
        return {}
    with parallel.gathered(model):
        return evaluator.run(model, completed_epochs, **when)


def describe_optimizer(config: TrainConfig) -> str:
    """The optimizer settings in force, open_clip's model-derived defaults included."""
    given = {"lr": config.lr, "betas": (config.beta1, config.beta2) if config.beta1 is not None else None,
             "eps": config.eps, "weight decay": config.wd, "momentum": config.momentum}
    return (f"{config.opt}: " + ", ".join(f"{k} {v}" for k, v in given.items() if v is not None) +
            (" (timm's defaults for the rest)" if config.uses_timm_optimizer else ""))


def copy_codebase(run_dir: str) -> None:
    """--copy-codebase: the acc_clip package as it ran, in <run>/code/acc_clip (open_clip_train copies its own)."""
    import shutil

    import acc_clip

    shutil.copytree(os.path.dirname(acc_clip.__file__), os.path.join(run_dir, "code", "acc_clip"),
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)


def to_device(batch, image_transform, device, channels_last: bool, input_dtype=None):
    """Images and texts on the device; images in `input_dtype` when --precision casts the weights."""
    images = model_input(batch.images, image_transform, device, channels_last)
    return images if input_dtype is None else images.to(input_dtype), batch.texts.to(device, non_blocking=True)


def limit_cpu_threads(plan, workers: int, world_size: int) -> None:
    """On the CPU, leave a core to each loader worker: torch's OpenMP threads spin while they wait for
    one another, and sharing cores with busy workers (or other jobs) that can make a step many times
    slower (docs/performance.md). OMP_NUM_THREADS, when set, decides instead."""
    if plan.kind != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // world_size - workers))
    log.info("CPU: %d compute thread(s) per process (%d cores, %d process(es), %d loader workers each; "
             "OMP_NUM_THREADS overrides)", torch.get_num_threads(), cores, world_size, workers)


def start_run(config: TrainConfig, notices: list[str]):
    """The device plan, the Accelerator, the run folder with its log, config and trackers."""
    slurm = place_from_slurm()  # srun's tasks -> RANK, WORLD_SIZE, ...: read by the plan and the Accelerator
    plan = plan_device(config.device, config.precision, backend=config.dist_backend)
    check_bn_sync(plan, config.use_bn_sync)
    # project_dir is refined to the run folder once the run is named (start_trackers).
    accelerator = make_accelerator(plan, cudnn_benchmark=config.cudnn_benchmark, static_graph=config.ddp_static_graph,
                                   log_with=trackers(config.report_to) or None, project_dir=config.logs)
    run_dir = run_folder(config, accelerator)
    # --log-local: every process keeps its own log (open_clip_train's out-RANK.log); else the main process, out.log.
    rank = accelerator.process_index
    log_file = (os.path.join(run_dir, f"out-{rank}.log") if config.log_local else
                os.path.join(run_dir, LOG_FILE) if accelerator.is_main_process else None)
    setup_logging(log_file, accelerator.is_main_process or config.log_local, debug=config.debug)
    log.info("acc_clip run %s: %s, %d process(es), precision %s", config.name, plan.describe(),
             accelerator.num_processes, config.precision)
    if slurm is not None:
        log.info("%s", slurm.describe())
    limit_cpu_threads(plan, config.workers, accelerator.num_processes)
    for notice in [*notices, *filter(None, [batch_script_warning(os.environ)])]:
        log.warning(notice)
    if accelerator.is_main_process:
        save_config(config, os.path.join(run_dir, CONFIG_FILE))
        log.info("optimizer %s", describe_optimizer(config))
        if config.copy_codebase:
            copy_codebase(run_dir)
    start_trackers(accelerator, config, run_dir)
    return plan, accelerator, run_dir


def prepare_model(config: TrainConfig, model: torch.nn.Module, accelerator, plan):
    """Memory layout, optimizer, then the wrapping for several processes (runtime/parallel.py)."""
    channels_last = uses_channels_last(model, config.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, config, plan.kind)
    model, optimizer = parallel.prepare(accelerator, model, optimizer, sync_batch_norm=config.use_bn_sync,
                                        compile_model=config.torchcompile)
    return model, optimizer, channels_last


def train(config: TrainConfig, notices: list[str] = ()) -> int:
    plan, accelerator, run_dir = start_run(config, notices)
    host_group = host_process_group(accelerator)  # ranks agree on batch sizes and on stopping over it
    rank, world_size = accelerator.process_index, accelerator.num_processes

    bundle = create_model(config)  # seeds the RNGs with config.seed first, as open_clip_train does
    torch.manual_seed(config.seed + rank)
    # uint8 crops from the workers, normalised on the device (or decoded there): acc_clip/data/pixels.py
    image_transform = train_transform(bundle.preprocess_train, decode_on_device=config.decode_on_device,
                                      device=accelerator.device)
    data = build_train_data(config, image_transform, bundle.tokenizer, rank=rank, world_size=world_size,
                            pin_memory=plan.pin_memory if config.pin_memory is None else config.pin_memory)
    if data.batches_per_epoch < config.accum_freq:
        raise AccClipError(f"{data.batches_per_epoch} micro-batches per epoch cannot make one step of "
                           f"--accum-freq {config.accum_freq}")
    steps_per_epoch = data.batches_per_epoch // config.accum_freq
    model, optimizer, channels_last = prepare_model(config, bundle.model, accelerator, plan)
    schedule = create_lr_schedule(optimizer, config, steps_per_epoch)
    objective = create_objective(config, rank, world_size, accelerator.device, accelerator.autocast)
    global_batch = config.batch_size * config.accum_freq * world_size
    metrics = MetricsLogger(run_dir if accelerator.is_main_process else None, config.log_every_n_steps,
                            steps_per_epoch, global_batch, data.num_samples, world_size,
                            accelerator=accelerator, show_progress=sys.stderr.isatty())
    saver = CheckpointManager(run_dir, config, accelerator)
    progress = saver.resume(model, optimizer, steps_per_epoch)
    if progress.step_in_epoch > steps_per_epoch:
        raise AccClipError(f"the checkpoint stopped after step {progress.step_in_epoch} of epoch {progress.epoch}, "
                           f"but this run has {steps_per_epoch} steps per epoch: resume with the data, batch size "
                           "and number of processes it was saved with")
    evaluator = Evaluator(config, bundle.preprocess_val, bundle.tokenizer, accelerator, objective)
    if evaluator.enabled and progress.global_step == 0:
        report_evaluation(evaluate(evaluator, model, 0, force=True), metrics, epoch=0, step=0, when="before training")
    stop = StopSignal.install()
    sample_log = SampleLog.from_env(run_dir, rank)  # debug record for resume tests; off by default
    samples_read = samples_bad = samples_trimmed = 0
    max_steps = config.max_steps or math.inf

    for epoch in range(progress.epoch, config.epochs):
        model.train()
        metrics.start_epoch(epoch, progress.step_in_epoch)
        # Step times tile the epoch, as open_clip_train's do: logging and saving count in the next step.
        start = time.perf_counter()
        batches = iter(data.batches(epoch, start_batch=progress.step_in_epoch * config.accum_freq))
        for step_in_epoch in range(progress.step_in_epoch, steps_per_epoch):
            if progress.global_step >= max_steps:
                break
            micro_batches = [decode_encoded_batch(next(batches), image_transform, accelerator.device)
                             for _ in range(config.accum_freq)]
            samples_read += sum(len(b.indices) + b.num_bad for b in micro_batches)
            samples_bad += sum(b.num_bad for b in micro_batches)
            if (error := check_bad_fraction(samples_bad, samples_read, config.max_bad_fraction)) is not None:
                raise AccClipError(error)
            micro_batches, trimmed = agree_batch_sizes(micro_batches, host_group)
            samples_trimmed += trimmed
            log.debug("step %d: micro-batches of %s samples, %d cut", progress.global_step,
                      [len(b.indices) for b in micro_batches], trimmed)
            device_batches = [to_device(b, image_transform, accelerator.device, channels_last, plan.input_dtype)
                              for b in micro_batches]
            data_time = time.perf_counter() - start
            lr = schedule(progress.global_step)
            losses = train_step(model, device_batches, objective, accelerator, optimizer, config.grad_clip_norm)
            progress.advance(step_in_epoch + 1, global_batch)
            end = time.perf_counter()
            metrics.record(StepRecord(progress.global_step - 1, epoch, step_in_epoch + 1, losses,
                                      parallel.logit_scale(model), lr, data_time,
                                      end - start, progress.samples_seen))
            start = end
            if sample_log is not None:
                sample_log.record(progress.global_step - 1, epoch, micro_batches)
            stopping = stop.agreed(host_group)  # every rank stops after the same step
            if saver.step_save_due(progress) or stopping:
                metrics.flush()
                saver.save(model, optimizer, progress)
            if stopping:
                log.warning("stopping on %s after step %d; resume with --resume latest", stop.signal_name,
                            progress.global_step)
                return PREEMPTED_EXIT_CODE
        metrics.end_epoch()
        if progress.step_in_epoch == steps_per_epoch:
            progress.finish_epoch(epoch)
            log.info("epoch %d done: %d steps, %d samples skipped so far as missing or corrupt, %d cut on this "
                     "process to keep the processes' batches equal", epoch, progress.global_step, samples_bad,
                     samples_trimmed)
            saver.end_of_epoch(model, optimizer, progress)
            report_evaluation(evaluate(evaluator, model, epoch + 1, last=epoch + 1 == config.epochs), metrics,
                              epoch=epoch + 1, step=progress.global_step, when=f"after epoch {epoch}")
        if progress.global_step >= max_steps:
            break
    peak = peak_memory_bytes(plan)
    log.info("training done: %d steps%s", progress.global_step,
             f", peak memory {peak / 2**30:.2f} GiB" if peak else "")
    accelerator.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    config, notices = parse_config(sys.argv[1:] if argv is None else argv)
    try:
        return train(config, notices)
    finally:
        # Loader workers ignore SIGTERM (the main process saves first), so the interpreter's exit
        # could not end them after an error: end them here, on every way out, without torch's
        # SIGCHLD handler reporting their deaths as a second error.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            child.kill()
        if config.name is not None:  # the run folder's lock, if this process took it (run_dir.take_run_lock)
            release_run_lock(os.path.join(config.logs, config.name))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AccClipError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(user_error_exit_code())

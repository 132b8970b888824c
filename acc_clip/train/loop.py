"""The training loop. Runs as `acc-clip train ...`, `python -m acc_clip.train ...` or
`accelerate launch [--config_file launch/single_card.yaml] -m acc_clip.train ...`.

Each concern lives in its own module, built from its own section of the config (train/config.py);
`train` composes them and reads top to bottom: start the run, build model, data, objective, metrics,
checkpoints and evaluation, resume, then for each optimizer step read `--accum-freq` micro-batches,
balance them across processes (train/balance.py), run `train_step`, record, save when due or when asked to stop.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence

import torch
from torch.profiler import record_function

from acc_clip.checkpoint.manager import CheckpointManager, RunRecord
from acc_clip.data import build_train_data, check_bad_fraction
from acc_clip.data.pixels import decode_encoded_batch, model_input, train_transform
from acc_clip.data.source import Segment, TrainData
from acc_clip.errors import DataError, UsageError
from acc_clip.evaluation.evaluator import Evaluator, format_metrics
from acc_clip.loss import create_objective, model_overrides, objective_identity
from acc_clip.model.build import create_model, uses_channels_last
from acc_clip.model.ema import WeightsEma
from acc_clip.model.flops import count_train_flops, describe, image_height_width
from acc_clip.model.lora import apply_lora, lora_record
from acc_clip.model.optim import create_lr_schedule, create_optimizer
from acc_clip.model.options import recorded
from acc_clip.model.param_groups import record_param_groups
from acc_clip.runtime import parallel, throughput
from acc_clip.runtime.device import host_process_group
from acc_clip.runtime.memory import MemoryMeter
from acc_clip.runtime.run_dir import release_run_lock
from acc_clip.runtime.signals import PREEMPTED_EXIT_CODE, StopSignal, parse_stop_signals
from acc_clip.train.balance import Balancer
from acc_clip.train.compiled import step_function
from acc_clip.train.config import TrainConfig, parse_train_config
from acc_clip.train.metrics import MetricsLogger, StepRecord, Throughput
from acc_clip.train.micro_batch import Trial, choose_split
from acc_clip.train.profiling import DATA, SAVE, step_profiler
from acc_clip.train.run import start_run
from acc_clip.train.samples import SampleLog

log = logging.getLogger(__name__)


def report_evaluation(results: dict, metrics: MetricsLogger, *, epoch: int, step: int, when: str) -> None:
    if not results:
        return
    log.info("Eval %s (epoch %d, step %d): %s", when, epoch, step, format_metrics(results))
    metrics.write_result({"epoch": epoch, "step": step, **results})


def evaluate(evaluator: Evaluator, model, completed_epochs: int, ema: WeightsEma | None = None, **when) -> dict:
    """The evaluator's metrics on whole weights: under FSDP they are gathered once for the pass, so
    each process encodes its own rows without collectives (runtime/parallel.gathered). With --ema-decay the
    same metrics on the EMA of the weights follow, prefixed `ema_`."""
    if not evaluator.enabled:
        return {}
    with parallel.gathered(model):
        results = evaluator.run(model, completed_epochs, **when)
    if ema is not None and results:
        with ema.in_place_of(model), parallel.gathered(model):  # the EMA in the weights' place, then put back
            results |= {f"ema_{key}": value for key, value in evaluator.run(model, completed_epochs, **when).items()}
    return results


def to_device(batch, image_transform, device, channels_last: bool, input_dtype=None):
    """Images and texts on the device; images in `input_dtype` when --precision casts the weights."""
    images = model_input(batch.images, image_transform, device, channels_last)
    return images if input_dtype is None else images.to(input_dtype), batch.texts.to(device, non_blocking=True)


def prepare_model(config: TrainConfig, model: torch.nn.Module, accelerator, plan, run_dir: str):
    """Memory layout, optimizer (its groups recorded by name before any wrapping swaps the parameters),
    then the wrapping for several processes (runtime/parallel.py)."""
    channels_last = uses_channels_last(model, config.model.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, config.optimizer, plan.kind)
    if accelerator.is_main_process:
        record_param_groups(run_dir, model, optimizer, config.optimizer)  # param_groups.json, a summary in the log
    model, optimizer = parallel.prepare(
        accelerator,
        model,
        optimizer,
        sync_batch_norm=config.runtime.use_bn_sync,
        compile_model=config.runtime.compiling(),
    )
    return model, optimizer, channels_last


def input_sizes(model: torch.nn.Module, tokenizer) -> tuple[tuple[int, int], int] | None:
    """The model's image size (height, width) and the tokenizer's context length; None where unknown."""
    image_size = getattr(getattr(model, "visual", None), "image_size", None)
    context_length = getattr(tokenizer, "context_length", None)
    if image_size is None or context_length is None:
        return None
    return image_height_width(image_size), int(context_length)


def measure_throughput(config: TrainConfig, model: torch.nn.Module, tokenizer, kind: str) -> Throughput | None:
    """The model's FLOPs per sample (counted once, on the meta device) and the device's peak, for the
    metrics' TFLOP/s and MFU; None, said in one line, where the model's input sizes are not known."""
    sizes = input_sizes(model, tokenizer)
    if sizes is None:
        log.info("no FLOP count: the model does not say its input size; no TFLOP/s or MFU in the metrics")
        return None
    image_size, context_length = sizes
    try:
        flops = count_train_flops(model, image_size=image_size, context_length=context_length)
    except (RuntimeError, ValueError) as error:  # a model the meta device cannot run: the run goes on without
        log.warning("no FLOP count, so no TFLOP/s or MFU in the metrics: %s", error)
        return None
    name, dtype = throughput.device_name(kind), throughput.compute_dtype(kind, config.runtime.precision)
    peak = config.logging.peak_tflops or throughput.peak_tflops(name, dtype)
    source = "--peak-tflops" if config.logging.peak_tflops else f"{name}, {dtype}"
    log.info(
        "model: %s; %s",
        describe(flops),
        f"MFU against a peak of {peak:g} TFLOP/s ({source})"
        if peak
        else f"no MFU: the peak of {name} at {dtype} is not in acc_clip's table (set --peak-tflops)",
    )
    return Throughput(flops.total, peak)


def settle_micro_batch(config: TrainConfig, bundle, objective, accelerator, input_dtype, host_group) -> None:
    """--auto-micro-batch: probe the largest micro-batch that fits (train/micro_batch.py) and train
    --batch-size as that many micro-batches: config.data.batch_size and config.training.accum_freq become
    the split, as if given by hand."""
    if parallel.is_fsdp(accelerator):
        raise UsageError(
            "--auto-micro-batch under FSDP: not supported (the probe's forward gathers weights across the "
            "processes, and one process out of memory would leave the others waiting); set --accum-freq"
        )
    sizes = input_sizes(bundle.model, bundle.tokenizer)
    if sizes is None:
        raise UsageError("--auto-micro-batch: this model does not say its input size; set --accum-freq instead")
    (height, width), context_length = sizes
    model = bundle.model.to(accelerator.device)
    trial = Trial(
        model,
        objective,
        image_shape=(3, height, width),
        context_length=context_length,
        device=accelerator.device,
        autocast=accelerator.autocast,
        input_dtype=input_dtype,
    )
    step_batch = config.data.batch_size
    micro_batch, accum_freq = choose_split(step_batch, trial, host_group)
    config.data.batch_size, config.training.accum_freq = micro_batch, accum_freq
    log.info(
        "--auto-micro-batch: %d samples per process and step, as %d micro-batch(es) of %d (the largest that fits)",
        step_batch,
        accum_freq,
        micro_batch,
    )


def run_record(config: TrainConfig, data: TrainData | None = None) -> RunRecord:
    """What the checkpoints record of this run besides its progress."""
    return RunRecord(
        name=str(config.logging.name),
        epochs=config.training.epochs,
        model=config.model.model,
        model_options=recorded(config.model),
        objective=objective_identity(config),
        precision=config.runtime.precision,
        seed=config.runtime.seed,
        batch_size=config.data.batch_size,
        accum_freq=config.training.accum_freq,
        auto_micro_batch=config.training.auto_micro_batch,
        train_data=config.data.train_data,
        order=data.order if data is not None else {},
        layout=data.layout if data is not None else {},
        elastic=data.elastic if data is not None else True,
        optimizer_groups=config.optimizer.group_identity(),
        ema=config.ema.settings(),
        lora=lora_record(config.lora),
    )


def train(config: TrainConfig, notices: Sequence[str] = ()) -> int:  # noqa: PLR0915 - the loop, on one screen
    # First: a stop during the start-up (model, data, resume) ends the run before its first step, with 75.
    stop = StopSignal.install(parse_stop_signals(config.training.stop_signals))
    run = start_run(config, list(notices))
    plan, accelerator, run_dir = run.plan, run.accelerator, run.run_dir
    host_group = host_process_group(accelerator)  # ranks agree on batch sizes and on stopping over it
    rank, world_size = accelerator.process_index, accelerator.num_processes
    seed = config.runtime.seed

    bundle = create_model(config.model, precision=config.runtime.precision, seed=seed, **model_overrides(config))
    # --lora-rank: peft's adapters in the model, its base frozen, before anything counts or optimizes its parameters
    apply_lora(bundle.model, config.lora, fsdp=parallel.is_fsdp(accelerator))
    torch.manual_seed(seed + rank)  # create_model seeded the RNGs with `seed` first, as open_clip_train does
    objective = create_objective(config, rank, world_size, accelerator.device, accelerator.autocast)
    if config.training.auto_micro_batch:
        settle_micro_batch(config, bundle, objective, accelerator, plan.input_dtype, host_group)
    accum_freq = config.training.accum_freq
    # uint8 crops from the workers, normalised on the device (or decoded there): acc_clip/data/pixels.py
    image_transform = train_transform(
        bundle.preprocess_train, decode_on_device=config.data.decode_on_device, device=accelerator.device
    )
    pin_memory = plan.pin_memory if config.data.pin_memory is None else config.data.pin_memory
    data = build_train_data(
        config, image_transform, bundle.tokenizer, seed=seed, rank=rank, world_size=world_size, pin_memory=pin_memory
    )
    if data.batches_per_epoch < accum_freq:
        raise UsageError(
            f"{data.batches_per_epoch} micro-batches per epoch cannot make one step of --accum-freq {accum_freq}"
        )
    steps_per_epoch = data.batches_per_epoch // accum_freq
    # Only the main process records metrics: the others need no count.
    speed = (
        measure_throughput(config, bundle.model, bundle.tokenizer, plan.kind) if accelerator.is_main_process else None
    )
    model, optimizer, channels_last = prepare_model(config, bundle.model, accelerator, plan, run_dir)
    schedule = create_lr_schedule(
        optimizer, config.optimizer, epochs=config.training.epochs, steps_per_epoch=steps_per_epoch
    )
    step = step_function(config.runtime.compiling(), model, objective)  # train_step, or compiled (--torchcompile)
    global_batch = config.data.batch_size * accum_freq * world_size
    metrics = MetricsLogger(
        run_dir if accelerator.is_main_process else None,
        config.logging.log_every_n_steps,
        steps_per_epoch,
        global_batch,
        data.num_samples,
        world_size,
        accelerator=accelerator,
        show_progress=sys.stderr.isatty(),
        metric_every_n_steps=config.logging.log_metric_every_n_steps,
        loss_ema_samples=config.logging.train_loss_ema_samples,
        throughput=speed,
    )
    memory = MemoryMeter(plan.kind)
    saver = CheckpointManager(run_dir, config.checkpoint, run_record(config, data), accelerator)
    # --ema-decay: an EMA of the (sharded) weights, kept in checkpoints and evaluated beside them (model/ema.py)
    ema = WeightsEma(model, config.ema, sharded=parallel.is_fsdp(accelerator)) if config.ema.enabled else None
    if ema is not None:
        saver.keep(ema)
    progress = saver.resume(model, optimizer, steps_per_epoch)
    evaluator = Evaluator(config, bundle.preprocess_val, bundle.tokenizer, accelerator, objective)
    if evaluator.enabled and progress.global_step == 0:
        report_evaluation(
            evaluate(evaluator, model, 0, ema, force=True), metrics, epoch=0, step=0, when="before training"
        )
    if stop.agreed(host_group):
        log.warning("stopping on %s before the first step; resume with --resume latest", stop.signal_name)
        accelerator.end_training()
        return PREEMPTED_EXIT_CODE
    sample_log = SampleLog(run_dir, rank) if config.logging.log_samples else None
    samples_read = samples_bad = 0
    balancer = Balancer(host_group, rank, world_size)  # equal batches on every process, good samples carried
    max_steps = config.training.max_steps or math.inf
    profiler = step_profiler(config.profiling, run_dir, rank, plan.kind, progress.global_step)

    for epoch in range(progress.epoch, config.training.epochs):
        model.train()
        # The position is kept in samples (data/order.py): after a resume on another layout the epoch's remaining
        # samples make its remaining steps, so its step count differs from a whole epoch's.
        done = [Segment(segment["layout"], segment["batches"]) for segment in progress.segments]
        epoch_batches = data.batches(epoch, done)
        progress.enter_layout(data.layout)
        epoch_steps = metrics.steps_per_epoch = progress.step_in_epoch + len(epoch_batches) // accum_freq
        metrics.start_epoch(epoch, progress.step_in_epoch)
        # Step times tile the epoch, as open_clip_train's do: logging and saving count in the next step.
        start = time.perf_counter()
        batches = iter(epoch_batches)
        for step_in_epoch in range(progress.step_in_epoch, epoch_steps):
            if progress.global_step >= max_steps:
                break
            profiler.begin_step(progress.global_step)
            with record_function(DATA):
                micro_batches = [
                    decode_encoded_batch(next(batches), image_transform, accelerator.device) for _ in range(accum_freq)
                ]
            samples_read += sum(len(b.indices) + b.num_bad for b in micro_batches)
            samples_bad += sum(b.num_bad for b in micro_batches)
            if (error := check_bad_fraction(samples_bad, samples_read, config.data.max_bad_fraction)) is not None:
                raise DataError(error)
            micro_batches = balancer.balance(micro_batches)
            log.debug(
                "step %d: micro-batches of %s samples", progress.global_step, [len(b.indices) for b in micro_batches]
            )
            with record_function(DATA):
                device_batches = [
                    to_device(b, image_transform, accelerator.device, channels_last, plan.input_dtype)
                    for b in micro_batches
                ]
            data_time = time.perf_counter() - start
            lr = schedule(progress.global_step)
            losses = step(model, device_batches, objective, accelerator, optimizer, config.optimizer.grad_clip_norm)
            progress.advance(step_in_epoch + 1, global_batch, accum_freq)
            if ema is not None:
                ema.update(progress.global_step)  # once per optimizer step, after it
            end = time.perf_counter()
            metrics.record(
                StepRecord(
                    progress.global_step - 1,
                    epoch,
                    step_in_epoch + 1,
                    losses,
                    parallel.logit_scale(model),
                    lr,
                    data_time,
                    end - start,
                    progress.samples_seen,
                    memory.step_figures(),
                )
            )
            start = end
            if sample_log is not None:
                sample_log.record(progress.global_step - 1, epoch, micro_batches)
            if evaluator.due_at_step(progress.global_step) and step_in_epoch + 1 < epoch_steps:
                step_results = evaluate(evaluator, model, epoch, ema, force=True)  # an epoch's last step: below
                report_evaluation(step_results, metrics, epoch=epoch, step=progress.global_step, when="by steps")
            saver.poll(host_group)  # commits a save whose files were written meanwhile (--async-save)
            stopping = stop.agreed(host_group)  # every rank stops after the same step
            if saver.step_save_due(progress, host_group) or stopping:
                balancer.note_save(progress.global_step)
                metrics.flush()
                with record_function(SAVE):
                    saver.save(model, optimizer, progress)
            if stopping:
                profiler.close()  # a window cut short is written as far as it got
                saver.complete()
                log.warning(
                    "stopping on %s after step %d; resume with --resume latest", stop.signal_name, progress.global_step
                )
                accelerator.end_training()  # gloo's threads outliving the interpreter can abort the exit (SIGABRT)
                return PREEMPTED_EXIT_CODE
        metrics.end_epoch()
        if progress.step_in_epoch == epoch_steps:
            progress.finish_epoch(epoch)
            carried, untrained = balancer.end_epoch(epoch)
            log.info(
                "epoch %d done: %d steps, %d samples skipped so far as missing or corrupt on this process; over "
                "all processes %d carried into a later step to keep the processes' batches equal, %d left untrained",
                epoch,
                progress.global_step,
                samples_bad,
                carried,
                untrained,
            )
            with record_function(SAVE):
                saver.end_of_epoch(model, optimizer, progress)
            report_evaluation(
                evaluate(
                    evaluator,
                    model,
                    epoch + 1,
                    ema,
                    last=epoch + 1 == config.training.epochs,
                    force=evaluator.due_at_step(progress.global_step),
                ),
                metrics,
                epoch=epoch + 1,
                step=progress.global_step,
                when=f"after epoch {epoch}",
            )
        if progress.global_step >= max_steps:
            break
    profiler.close()
    saver.complete()
    peak = memory.run_peak_bytes / 2**30
    where = "device memory" if plan.kind in ("cuda", "sdaa") else "host memory at a step's end"
    log.info("training done: %d steps%s", progress.global_step, f", peak {where} {peak:.2f} GiB" if peak else "")
    accelerator.end_training()
    return 0


def main(argv: list[str]) -> int:
    """The `train` command."""
    config, notices = parse_train_config(argv)
    try:
        return train(config, notices)
    finally:
        # Loader workers ignore SIGTERM (the main process saves first), so the interpreter's exit
        # could not end them after an error: end them here, on every way out, without torch's
        # SIGCHLD handler reporting their deaths as a second error.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            child.kill()
        if config.logging.name is not None:  # the run folder's lock, if this process took it (run_dir.take_run_lock)
            release_run_lock(os.path.join(config.logging.logs, config.logging.name))

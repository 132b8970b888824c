"""The training loop. Runs as `acc-clip train ...`, `python -m acc_clip.train ...` or
`accelerate launch [--config_file launch/single_card.yaml] -m acc_clip.train ...`.

Each concern lives in its own module (config, device, model, data, loss, step, checkpoint, metrics,
eval); this file composes them and reads top to bottom.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from datetime import datetime

import torch

from acc_clip import checkpoint
from acc_clip.config import TrainConfig, parse_config, save_config
from acc_clip.data import build_train_data, check_bad_fraction
from acc_clip.device import make_accelerator, peak_memory_bytes, plan_device
from acc_clip.errors import AccClipError, user_error_exit_code
from acc_clip.loss import create_loss
from acc_clip.metrics import MetricsLogger, StepRecord, setup_logging
from acc_clip.model import create_lr_schedule, create_model, create_optimizer
from acc_clip.step import train_step

log = logging.getLogger("acc_clip")


def run_folder(config: TrainConfig, accelerator) -> str:
    """`<logs>/<name>/`, named once on the main process and shared, as open_clip names its runs."""
    from accelerate.utils import broadcast_object_list

    if config.name is None:
        stamp = [datetime.now().strftime("%Y_%m_%d-%H_%M_%S")]
        broadcast_object_list(stamp)
        config.name = "-".join([stamp[0], f"model_{config.model.replace('/', '-').replace(':', '-')}",
                                f"lr_{config.lr}", f"b_{config.batch_size}", f"j_{config.workers}",
                                f"p_{config.precision}"])
    path = os.path.join(config.logs, config.name)
    if accelerator.is_main_process:
        if os.path.exists(os.path.join(path, "metrics.jsonl")) and config.resume is None:
            raise AccClipError(f"{path} already holds a run: pass --resume latest to continue it, or a new --name")
        os.makedirs(path, exist_ok=True)
    accelerator.wait_for_everyone()
    return path


def to_device(batch, device, channels_last: bool):
    images = batch.images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch.texts.to(device, non_blocking=True)


def train(config: TrainConfig, notices: list[str] = ()) -> int:
    plan = plan_device(config.device, config.precision)
    accelerator = make_accelerator(plan)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    run_dir = run_folder(config, accelerator)
    setup_logging(os.path.join(run_dir, "out.log") if accelerator.is_main_process else None,
                  accelerator.is_main_process)
    log.info("acc_clip run %s: %s, %d process(es), precision %s", config.name, plan.describe(), world_size,
             config.precision)
    for notice in notices:
        log.warning(notice)
    if accelerator.is_main_process:
        save_config(config, os.path.join(run_dir, "config.yaml"))

    bundle = create_model(config)  # seeds the RNGs with config.seed first, as open_clip_train does
    torch.manual_seed(config.seed + rank)
    data = build_train_data(config, bundle.preprocess_train, bundle.tokenizer, rank=rank, world_size=world_size,
                            pin_memory=plan.pin_memory)
    if data.batches_per_epoch < config.accum_freq:
        raise AccClipError(f"{data.batches_per_epoch} micro-batches per epoch cannot make one step of "
                           f"--accum-freq {config.accum_freq}")
    steps_per_epoch = data.batches_per_epoch // config.accum_freq
    model = bundle.model
    if config.use_bn_sync and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, config, plan.kind)
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.torchcompile:
        model = torch.compile(model)
    schedule = create_lr_schedule(optimizer, config, steps_per_epoch)
    loss_fn = create_loss(config, rank, world_size)
    global_batch = config.batch_size * config.accum_freq * world_size
    metrics = MetricsLogger(run_dir if accelerator.is_main_process else None, config.log_every_n_steps,
                            steps_per_epoch, global_batch, data.num_samples, world_size,
                            accelerator=accelerator, show_progress=sys.stderr.isatty())
    saver = checkpoint.CheckpointManager(run_dir, config, accelerator)
    progress = saver.resume(model, optimizer, steps_per_epoch)
    stop = checkpoint.StopSignal.install()
    samples_read = samples_bad = 0
    max_steps = config.max_steps or math.inf

    for epoch in range(progress.epoch, config.epochs):
        model.train()
        metrics.start_epoch(epoch, progress.step_in_epoch)
        batches = iter(data.batches(epoch, start_batch=progress.step_in_epoch * config.accum_freq))
        for step_in_epoch in range(progress.step_in_epoch, steps_per_epoch):
            if progress.global_step >= max_steps:
                break
            start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(config.accum_freq)]
            samples_read += sum(len(b.indices) + b.num_bad for b in micro_batches)
            samples_bad += sum(b.num_bad for b in micro_batches)
            if (error := check_bad_fraction(samples_bad, samples_read, config.max_bad_fraction)) is not None:
                raise AccClipError(error)
            device_batches = [to_device(b, accelerator.device, config.channels_last) for b in micro_batches]
            data_time = time.perf_counter() - start
            lr = schedule(progress.global_step)
            loss = train_step(model, device_batches, loss_fn, accelerator, optimizer, config.grad_clip_norm)
            progress.advance(step_in_epoch + 1, global_batch)
            metrics.record(StepRecord(progress.global_step - 1, epoch, step_in_epoch + 1, loss,
                                      accelerator.unwrap_model(model).logit_scale.detach(), lr, data_time,
                                      time.perf_counter() - start, progress.samples_seen))
            if saver.step_save_due(progress) or stop.requested:
                metrics.flush()
                saver.save(model, optimizer, progress)
            if stop.requested:
                log.warning("stopping on %s after step %d; resume with --resume latest", stop.signal_name,
                            progress.global_step)
                return checkpoint.PREEMPTED_EXIT_CODE
        metrics.end_epoch()
        if progress.step_in_epoch == steps_per_epoch:
            progress.finish_epoch(epoch)
            log.info("epoch %d done: %d steps, %d samples skipped so far as missing or corrupt", epoch,
                     progress.global_step, samples_bad)
            saver.end_of_epoch(model, optimizer, progress)
        if progress.global_step >= max_steps:
            break
    peak = peak_memory_bytes(plan)
    log.info("training done: %d steps%s", progress.global_step,
             f", peak memory {peak / 2**30:.2f} GiB" if peak else "")
    accelerator.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    config, notices = parse_config(sys.argv[1:] if argv is None else argv)
    return train(config, notices)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AccClipError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(user_error_exit_code())

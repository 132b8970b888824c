"""What a run reports: an open_clip-style log line every N steps, a progress bar on a terminal,
`metrics.jsonl` with one record per optimizer step, and Accelerate's trackers.

Per-step values stay on the device until a log line is due, then are read in one go: reading a
loss every step would stall the host on the accelerator each step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from acc_clip.config.schema import (
    NON_NEGATIVE,
    PLAIN_NAME,
    POSITIVE,
    POSITIVE_FINITE,
    WRITABLE_FOLDER,
    Needs,
    Section,
    option,
)
from acc_clip.errors import DivergedError, UsageError
from acc_clip.runtime.run_dir import METRICS_FILE, RESULTS_FILE, TENSORBOARD_DIR, wandb_run_id

log = logging.getLogger(__name__)
TRACKERS = ("tensorboard", "wandb")
WANDB = Needs("wandb among --report-to", lambda s: "wandb" in trackers(s.report_to))
TRACKER = Needs("a tracker (--report-to)", lambda s: bool(trackers(s.report_to)))


@dataclass
class LoggingOptions(Section):
    """Where a run writes (its folder under --logs) and what it reports there and to trackers."""

    title: ClassVar[str] = "logging"
    logs: str = option("./logs/", "folder holding one sub-folder per run", domain=WRITABLE_FOLDER, train_only=True)
    name: str | None = option(
        None,
        "run name, a folder under --logs (default: date, model, lr, batch size, workers, precision)",
        domain=PLAIN_NAME,
        train_only=True,
    )
    log_every_n_steps: int = option(100, "log a line every N optimizer steps", domain=POSITIVE, train_only=True)
    log_metric_every_n_steps: int = option(
        10,
        "send the step's figures to the trackers every N optimizer steps (and at every log line), as open_clip "
        "main does; metrics.jsonl keeps every step",
        domain=POSITIVE,
        train_only=True,
    )
    train_loss_ema_samples: int = option(
        50_000,
        "the log line's loss in parentheses: its moving average over about this many samples (each step "
        "weighs exp(-samples/N)), as open_clip main's; 0: the mean since the epoch began (open_clip_train 3.3's)",
        domain=NON_NEGATIVE,
        train_only=True,
    )
    peak_tflops: float | None = option(
        None,
        "the device's peak TFLOP/s at the run's precision, for MFU (default: from acc_clip's table of "
        "common accelerators; no MFU where the device is not in it)",
        domain=POSITIVE_FINITE,
        train_only=True,
    )
    log_local: bool = option(
        False, "every process writes its own log, out-RANK.log (default: the main process, out.log)", train_only=True
    )
    log_samples: bool = option(
        False,
        "record which samples every optimizer step trained on, in "
        "<run>/samples.jsonl (step, epoch, rank, sample ids): for debugging a loss "
        "spike, or checking what a resumed run saw",
        train_only=True,
    )
    debug: bool = option(False, "debug-level logging", train_only=True)
    copy_codebase: bool = option(
        False, "copy the acc_clip package into the run folder (code/), to rerun it as it was", train_only=True
    )
    report_to: str = option("", "trackers: tensorboard, wandb, all, or empty", train_only=True)
    wandb_notes: str = option("", "wandb run notes", needs=WANDB, train_only=True)
    wandb_project_name: str = option(
        "open-clip", "the trackers' project (wandb's project, TensorBoard's folder)", needs=TRACKER, train_only=True
    )

    def check(self) -> None:
        trackers(self.report_to)


def trackers(report_to: str) -> list[str]:
    """`--report-to tensorboard|wandb|all` as Accelerate tracker names."""
    names = {part.strip() for part in report_to.split(",") if part.strip()}
    if "all" in names:
        names = (names - {"all"}) | set(TRACKERS)
    unknown = names - set(TRACKERS)
    if unknown:
        raise UsageError(
            f"--report-to {report_to!r}: unknown tracker {sorted(unknown)[0]!r}; expected tensorboard, wandb or all"
        )
    return sorted(names)


def wandb_init_kwargs(options: LoggingOptions, run_dir: str) -> dict:
    """wandb.init's arguments: one wandb run per run folder, continued by every resume of it, as
    open_clip_train's `wandb.init(id=..., resume='auto')`. "allow" resumes the run when wandb knows the id
    and starts it under that id when not (the first start, or a run wandb never received)."""
    return {
        "name": options.name,
        "notes": options.wandb_notes,
        "dir": run_dir,
        "id": wandb_run_id(run_dir),
        "resume": "allow",
    }


def start_trackers(accelerator, options: LoggingOptions, run_dir: str, hyperparameters: dict) -> None:
    if not options.report_to:
        return
    # TensorBoard events go to <run>/tensorboard/<project>/; wandb's project is --wandb-project-name.
    accelerator.project_configuration.project_dir = run_dir
    accelerator.project_configuration.logging_dir = os.path.join(run_dir, TENSORBOARD_DIR)
    # Accelerate starts trackers on the main process only: the wandb id file is read or made there alone.
    wandb = "wandb" in trackers(options.report_to) and accelerator.is_main_process
    accelerator.init_trackers(
        options.wandb_project_name,
        config=hyperparameters,
        init_kwargs={"wandb": wandb_init_kwargs(options, run_dir)} if wandb else {},
    )


def telemetry(row: dict) -> str:
    """The log line's tail after open_clip's fields: how close the step came to the device's limits."""
    parts = [f"data {100 * row['data_share']:.0f}%"]
    if "tflops_per_device" in row:
        parts.append(f"{row['tflops_per_device']:#.3g} TFLOP/s/device")
    if "mfu" in row:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    if "memory_peak_gib" in row:
        reserved = f" (reserved {row['memory_reserved_gib']:.2f})" if "memory_reserved_gib" in row else ""
        parts.append(f"memory {row['memory_peak_gib']:.2f} GiB{reserved}")
    elif "host_resident_gib" in row:
        parts.append(f"host memory {row['host_resident_gib']:.2f} GiB")
    if row.get("alloc_retries"):
        parts.append(f"{row['alloc_retries']} allocator retries")
    return " | " + ", ".join(parts)


def setup_logging(log_file: str | None, is_main: bool, debug: bool = False) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    formatter = logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", datefmt="%Y-%m-%d,%H:%M:%S")
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(logging.DEBUG if debug else logging.INFO if is_main else logging.WARNING)


@dataclass
class StepRecord:
    step: int
    epoch: int
    step_in_epoch: int  # optimizer steps done in this epoch, this one included
    losses: dict[str, torch.Tensor]  # "loss" (the total trained on), then the objective's named parts
    logit_scale: torch.Tensor  # the model's parameter: the log of the factor on the logits
    lr: float
    data_time: float
    batch_time: float
    samples_seen: int
    memory: dict[str, float] = field(default_factory=dict)  # runtime/memory.MemoryMeter's figures for the step


@dataclass(frozen=True)
class Throughput:
    """What turns a step's time into achieved TFLOP/s per device and MFU."""

    flops_per_sample: float  # the model's forward and backward (model/flops.py)
    peak_tflops: float | None  # the device's peak at the run's precision; None: unknown, no MFU

    def figures(self, samples_per_device: float, seconds: float) -> dict[str, float]:
        achieved = self.flops_per_sample * samples_per_device / max(seconds, 1e-9) / 1e12
        figures = {"flops_per_sample": self.flops_per_sample, "tflops_per_device": achieved}
        if self.peak_tflops is not None:
            figures["mfu"] = achieved / self.peak_tflops
        return figures


class LossAverage:
    """The log line's loss in parentheses. With a horizon of N samples, a moving average in which a step of
    n samples weighs 1 - exp(-n/N) (open_clip main's --train-loss-ema-samples), kept across epochs and
    seeded by the first loss; with N = 0, the mean of the epoch's steps (open_clip_train 3.3's)."""

    def __init__(self, horizon_samples: int):
        self.horizon = horizon_samples
        self.value: float | None = None
        self._sum, self._count = 0.0, 0

    def start_epoch(self) -> None:
        self._sum, self._count = 0.0, 0

    def update(self, loss: float, samples: int) -> None:
        self._sum, self._count = self._sum + loss, self._count + 1
        if self.horizon == 0:
            self.value = self._sum / self._count
            return
        weight = 1.0 - math.exp(-samples / self.horizon)
        self.value = loss if self.value is None else self.value + weight * (loss - self.value)


@dataclass
class MetricsLogger:
    run_dir: str | None  # None on non-main processes: they record nothing
    log_every_n_steps: int
    steps_per_epoch: int
    global_batch_size: int  # samples per optimizer step, all processes and micro-batches
    samples_per_epoch: int
    world_size: int
    accelerator: Any = None  # for trackers; None: no trackers
    show_progress: bool = False
    metric_every_n_steps: int = 1  # steps between the trackers' records (--log-metric-every-n-steps)
    loss_ema_samples: int = 0  # --train-loss-ema-samples
    throughput: Throughput | None = None  # None: no FLOP count, no TFLOP/s or MFU
    _pending: list[StepRecord] = field(default_factory=list)
    _average: LossAverage = field(init=False)  # from loss_ema_samples
    _progress: Any = None

    def __post_init__(self) -> None:
        self._average = LossAverage(self.loss_ema_samples)

    def start_epoch(self, epoch: int, first_step: int) -> None:
        self._average.start_epoch()
        if self.show_progress and self.run_dir is not None:
            from tqdm import tqdm

            self._progress = tqdm(
                total=self.steps_per_epoch,
                initial=first_step,
                desc=f"epoch {epoch}",
                unit="step",
                dynamic_ncols=True,
                leave=False,
            )

    def _is_line_step(self, step_in_epoch: int) -> bool:
        return (step_in_epoch - 1) % self.log_every_n_steps == 0 or step_in_epoch == self.steps_per_epoch

    def _is_metric_step(self, step_in_epoch: int) -> bool:
        return (step_in_epoch - 1) % self.metric_every_n_steps == 0 or self._is_line_step(step_in_epoch)

    def record(self, record: StepRecord) -> None:
        if self.run_dir is None:
            return
        self._pending.append(record)
        if self._progress is not None:
            self._progress.update(1)
        if self._is_metric_step(record.step_in_epoch):
            self.flush()

    def _row(self, record: StepRecord, loss: float, scale: float) -> dict:
        """metrics.jsonl's record of one step."""
        row = {
            "step": record.step,
            "epoch": record.epoch,
            "loss": loss,
            "lr": record.lr,
            # open_clip's "Logit Scale": the factor on the logits (1/temperature), 14.286 at initialisation
            "logit_scale": math.exp(scale),
            "samples_per_second": self.global_batch_size / max(record.batch_time, 1e-9),
            "data_time": record.data_time,
            "batch_time": record.batch_time,
            "data_share": record.data_time / max(record.batch_time, 1e-9),  # of the step spent waiting for data
            "samples_seen": record.samples_seen,
        }
        if self.throughput is not None:
            row.update(self.throughput.figures(self.global_batch_size / self.world_size, record.batch_time))
        row.update(record.memory)
        return row

    def flush(self) -> None:
        if not self._pending:
            return
        names = list(self._pending[0].losses)
        # One device-to-host copy for every pending value.
        values = (
            torch.stack(
                [torch.stack([r.losses[n].float() for n in names] + [r.logit_scale.float()]) for r in self._pending]
            )
            .cpu()
            .tolist()
        )
        rows = []
        for record, (loss, *parts, scale) in zip(self._pending, values):
            if not math.isfinite(loss):
                self._pending.clear()
                raise DivergedError(
                    f"the loss is {loss} at step {record.step} (epoch {record.epoch}): stopping; "
                    "the last checkpoint saved before it is kept (resume with --resume latest, "
                    "perhaps with a lower --lr or --grad-clip-norm)"
                )
            rows.append(self._row(record, loss, scale))
            if len(parts) > 1:  # an objective of several parts logs each beside the total
                rows[-1].update(zip(names[1:], parts))
            self._average.update(loss, self.global_batch_size)
        with open(os.path.join(str(self.run_dir), METRICS_FILE), "a") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
        pending, last = self._pending[:], rows[-1]
        self._pending.clear()
        if self._is_line_step(pending[-1].step_in_epoch):
            self._log_line(last, pending[-1].step_in_epoch)
        if self.accelerator is not None and self.accelerator.trackers:
            for record, row in zip(pending, rows):
                if self._is_metric_step(record.step_in_epoch):
                    self.accelerator.log(
                        {f"train/{k}": v for k, v in row.items() if k not in ("step", "epoch")}, step=row["step"]
                    )

    def _log_line(self, row: dict, step_in_epoch: int) -> None:
        digits = math.ceil(math.log10(self.samples_per_epoch + 1))
        seen = step_in_epoch * self.global_batch_size
        percent = 100.0 * step_in_epoch / self.steps_per_epoch
        per_second = row["samples_per_second"]
        # The objective's named parts, as open_clip_train logs them (e.g. "Caption_loss: 4.1234"), before the total.
        parts = "".join(f"{k.capitalize()}: {v:#.5g} " for k, v in row.items() if k.endswith("_loss"))
        message = (
            f"Train Epoch: {row['epoch']} [{seen:>{digits}}/{self.samples_per_epoch} ({percent:.0f}%)] "
            f"Data (t): {row['data_time']:.3f} Batch (t): {row['batch_time']:.3f}, {per_second:#g}/s, "
            f"{per_second / self.world_size:#g}/s/gpu LR: {row['lr']:5f} Logit Scale: {row['logit_scale']:.3f} "
            f"{parts}Loss: {row['loss']:#.5g} ({self._average.value:#.5g}){telemetry(row)}"
        )
        log.info(message)
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{row['loss']:.4f}")

    def end_epoch(self) -> None:
        self.flush()
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def write_result(self, record: dict) -> None:
        """One line per evaluation in results.jsonl, as open_clip_train writes."""
        if self.run_dir is None:
            return
        with open(os.path.join(self.run_dir, RESULTS_FILE), "a") as file:
            file.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(
                {
                    f"val/{k}": v
                    for k, v in record.items()
                    if isinstance(v, (int, float)) and k not in ("epoch", "step")
                },
                step=record.get("step"),
            )

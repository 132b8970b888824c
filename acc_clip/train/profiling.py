"""--profile-steps A:B: a torch.profiler trace of optimizer steps A to B, on every process, in <run>/profile/.

Steps are numbered as metrics.jsonl numbers them (its `step`, from 0), both ends included, so a slow step
found there is profiled by giving its number. Each process writes one Chrome-trace JSON file, named as
torch's `tensorboard_trace_handler` names it (`rank<R>.<time ns>.pt.trace.json`), which TensorBoard's
profiler plugin (torch-tb-profiler) and Perfetto both open. Inside each step's `ProfilerStep#N` span the
phases below are spans of their own (record_function). A step's span runs from the start of its data
reading to the start of the next step, so it holds its own save and, after an epoch's last step, the epoch's
save and evaluation.

The step before A is torch's warm-up (the profiler starts and drops what it sees, so its start-up cost stays
out of the trace). torch labels steps by its own count, from the process's first step: in a run resumed at
step R, step N is `ProfilerStep#(N-R)` (said at start-up); its counter is not settable through its API.

Without the flag no profiler exists: the phases' record_function markers cost a few microseconds each and
change nothing else. With it, until the window is over, torch's `step()` adds a few microseconds a step.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from acc_clip.config.schema import Domain, Section, option
from acc_clip.runtime.run_dir import PROFILE_DIR

log = logging.getLogger(__name__)

# The phases of a step, one name each, as they appear in the trace.
DATA = "data"  # the loader's next batches, decoding on the device, agreeing on sizes, the copy to the device
FORWARD = "forward"  # the model's (and a distillation teacher's) forward pass with gradient
FORWARD_NO_GRAD = "forward_no_grad"  # --accum-freq > 1: the pass that caches every micro-batch's features
LOSS = "loss"
BACKWARD = "backward"
OPTIMIZER = "optimizer"  # gradient clipping, the update, zeroing the gradients
SAVE = "save"  # a step checkpoint, or an epoch's checkpoints
PHASES = (DATA, FORWARD, FORWARD_NO_GRAD, LOSS, BACKWARD, OPTIMIZER, SAVE)

_WINDOW = re.compile(r"(\d+):(\d+)", re.ASCII)


def parse_window(text: str) -> tuple[int, int] | None:
    """(A, B) from "A:B" with 0 <= A <= B; None for anything else."""
    match = _WINDOW.fullmatch(text)
    if match is None:
        return None
    first, last = int(match[1]), int(match[2])
    return (first, last) if first <= last else None


# YAML 1.1 reads an unquoted 2:3 as the base-60 number 123, hence the hint.
STEP_WINDOW = Domain(
    "A:B, optimizer steps numbered as in metrics.jsonl (from 0), A <= B, both profiled (in YAML quoted: '2:3')",
    lambda v: parse_window(v) is not None,
    ("3:2", "2", "2:", "a:b", ""),
)


@dataclass
class ProfilingOptions(Section):
    title: ClassVar[str] = "profiling"
    profile_steps: str | None = option(
        None,
        "write a torch.profiler trace of optimizer steps A to B (A:B, both included, numbered as metrics.jsonl's "
        "step) into <run>/profile/, one file per process, with the step's phases named; opens in TensorBoard "
        "(torch-tb-profiler) or ui.perfetto.dev",
        domain=STEP_WINDOW,
        train_only=True,
    )

    @property
    def window(self) -> tuple[int, int] | None:
        return None if self.profile_steps is None else parse_window(self.profile_steps)


def activities(device_kind: str) -> list[ProfilerActivity]:
    """The host always; the device's kernels where torch's profiler can see them (CUDA, XPU). Other devices
    (SDAA, NPU, MPS) get the host side only: their profilers are their vendors' own."""
    wanted = [
        ProfilerActivity.CPU,
        *{"cuda": [ProfilerActivity.CUDA], "xpu": [ProfilerActivity.XPU]}.get(device_kind, []),
    ]
    supported = torch.profiler.supported_activities()
    return [activity for activity in wanted if activity in supported]


def scheduled(step: int, window: tuple[int, int] | None) -> ProfilerAction:
    """What torch's profiler does during `step`: warm up the step before the window, record the window."""
    if window is None:
        return ProfilerAction.NONE
    first, last = window
    if step == last:
        return ProfilerAction.RECORD_AND_SAVE  # the trace is written when the next step begins, or at close()
    if first <= step < last:
        return ProfilerAction.RECORD
    return ProfilerAction.WARMUP if step == first - 1 else ProfilerAction.NONE


class StepProfiler:
    """The profiler of one process over a run: `begin_step(step)` at the start of every optimizer step,
    `close()` when training ends or stops. Does nothing without a window, or once the window is over."""

    def __init__(self, window: tuple[int, int] | None, run_dir: str, rank: int, device_kind: str, first_step: int):
        # A run resumed inside the window profiles the steps left; one resumed after it, none.
        self.window = None if window is None or first_step > window[1] else (max(window[0], first_step), window[1])
        self.folder = os.path.join(run_dir, PROFILE_DIR)
        self.rank, self.device_kind = rank, device_kind
        self._step = first_step  # the step being trained, read by the schedule
        self._stack: ExitStack | None = None
        self._profiler: Any = None
        self._written = False

    def action(self, _count: int = 0) -> ProfilerAction:
        """torch's schedule, by the loop's step number rather than torch's own count, which starts at this
        process's first step (not step 0 in a resumed run)."""
        return scheduled(self._step, self.window)

    def begin_step(self, step: int) -> None:
        if self.window is None:
            return
        self._step = step
        if self._stack is None:
            self._start()
        else:
            self._profiler.step()  # ends the previous step's span; after the window's last step, writes the trace
        if step > self.window[1]:
            self.close()

    def _start(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        # An interpreter that exits with the profiler recording crashes (SIGSEGV, torch 2.14), which would
        # replace the exit status of an error raised inside the window: close it first on every way out.
        atexit.register(self.close)
        self._stack = ExitStack()
        self._profiler = self._stack.enter_context(
            torch.profiler.profile(
                activities=activities(self.device_kind),
                schedule=self.action,
                on_trace_ready=self._write,
                record_shapes=False,  # it holds references to the inputs, and bloats the trace
                profile_memory=True,  # TensorBoard's memory view; a few steps' allocations cost little
            )
        )

    def _write(self, profiler) -> None:
        assert self.window is not None
        worker = f"rank{self.rank}"
        before = set(os.listdir(self.folder))
        torch.profiler.tensorboard_trace_handler(self.folder, worker_name=worker)(profiler)
        # Its name has a timestamp; the other processes write theirs into the same folder meanwhile.
        written = sorted(set(os.listdir(self.folder)) - before)
        written = [os.path.join(self.folder, name) for name in written if name.startswith(worker + ".")]
        self._written = True
        first, last = self.window
        log.info("profile of steps %d..%d written to %s", first, min(self._step, last), ", ".join(written))

    def close(self) -> None:
        """Ends the profiler; a window cut short (the run ended or stopped inside it) is written as far as it got."""
        if self._stack is not None:
            atexit.unregister(self.close)
            self._stack.close()
            self._stack = None
        if self.window is not None and not self._written:
            log.warning("--profile-steps: the run's last step was %d: nothing profiled", self._step)
        self.window = None  # once only


def step_profiler(
    options: ProfilingOptions, run_dir: str, rank: int, device_kind: str, first_step: int
) -> StepProfiler:
    """The run's StepProfiler, announced in one line."""
    profiler = StepProfiler(options.window, run_dir, rank, device_kind, first_step)
    if profiler.window is not None:
        log.info(
            "--profile-steps %s: tracing steps %d..%d on every process into %s%s",
            options.profile_steps,
            *profiler.window,
            profiler.folder,
            f" (ProfilerStep#N in a trace is step N + {first_step}: torch counts from the run's first step)"
            if first_step
            else "",
        )
    elif options.window is not None:
        log.info(
            "--profile-steps %s: this run starts at step %d, after them: nothing is profiled",
            options.profile_steps,
            first_step,
        )
    return profiler

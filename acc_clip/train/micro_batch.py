"""--auto-micro-batch: the largest micro-batch that fits in device memory, found at start-up.

--batch-size is then each process's batch per optimizer step, B. It is trained as k equal micro-batches of
B/k samples with contrastive-exact accumulation (train/step.py), for the smallest k whose micro-batch
fits: k runs through B's divisors upwards, each size tried with a forward and a backward on stand-in
inputs, and an out-of-memory error moves on to the next. Because accumulation here is exact, the update
of a step is the one full batch of B would give, whatever k fitted (tests/integration/test_micro_batch.py
holds it to 1e-5): the probe chooses speed and memory, never the result. Batch norm is the exception, as under
--accum-freq: a ResNet normalises each micro-batch by that micro-batch's statistics.

A resumed run probes again. The split is recorded in each checkpoint (batch_size, accum_freq,
auto_micro_batch in the manifest's data): a resume inside an epoch whose probe chose another split is
refused as a changed --accum-freq would be, since the epoch's order is kept in micro-batches.

The trial runs the model and the objective's targets (a distillation teacher) at the micro-batch size
and backpropagates a stand-in loss through every output that has a gradient. What the trial does not hold
comes on top: the optimizer's state (AdamW: twice the trained weights), made by the first step, and the
loss's logits against the whole global batch. Nothing of the trial stays: gradients are dropped, batch
norm's statistics and every random stream are put back, so a run that probed trains exactly as the same
run with --batch-size B/k --accum-freq k.

Every process probes; they agree after each size (the host group's vote), so all take the same k.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

from acc_clip.errors import ResourceError
from acc_clip.loss import Objective, model_rows
from acc_clip.runtime.device import host_vote

log = logging.getLogger(__name__)


def splits(step_batch: int) -> list[int]:
    """The numbers of equal micro-batches a batch of `step_batch` splits into, fewest first."""
    return [k for k in range(1, step_batch + 1) if step_batch % k == 0]


def is_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory error, or another device's reported as a RuntimeError (Accelerate's list)."""
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, Exception) and should_reduce_batch_size(error)
    )


def release_device_memory() -> None:
    """What a failed trial held: Python's references first, then the allocator's cache."""
    from accelerate.utils.memory import clear_device_cache

    gc.collect()
    clear_device_cache()


def fits(trial: Callable[[int], None], micro_batch: int, host_group) -> bool:
    """Whether `trial(micro_batch)` ran without running out of memory on every process (a vote: every
    process calls this with the same size)."""
    try:
        trial(micro_batch)
        fitted = True
    except Exception as error:  # noqa: BLE001 - out of memory is told apart below; anything else is raised
        if not is_out_of_memory(error):
            raise
        fitted = False
    release_device_memory()
    return host_vote(fitted, host_group, every=True)


def choose_split(step_batch: int, trial: Callable[[int], None], host_group) -> tuple[int, int]:
    """(micro-batch, accum_freq): the fewest equal micro-batches of `step_batch` whose size fits."""
    for accum_freq in splits(step_batch):
        micro_batch = step_batch // accum_freq
        if fits(trial, micro_batch, host_group):
            return micro_batch, accum_freq
        log.info("--auto-micro-batch: %d samples do not fit in memory on some process", micro_batch)
    raise ResourceError(
        "--auto-micro-batch: not even one sample fits in device memory on some process; use a smaller "
        "model, --grad-checkpointing or another --precision"
    )


class Trial:
    """A forward and backward of `model` at a micro-batch size, leaving no trace (see the module's text)."""

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        *,
        image_shape,
        context_length: int,
        device,
        autocast,
        input_dtype=None,
    ):
        self.model, self.objective, self.autocast = model, objective, autocast
        self.image_shape, self.context_length = tuple(image_shape), context_length
        self.device, self.input_dtype = torch.device(device), input_dtype or torch.float32

    def __call__(self, micro_batch: int) -> None:
        buffers = {name: value.clone() for name, value in self.model.named_buffers()}
        try:
            with torch.random.fork_rng(devices=self._rng_devices(), device_type=self.device.type):
                self._forward_backward(micro_batch)
        finally:
            for parameter in self.model.parameters():
                parameter.grad = None
            with torch.no_grad():
                for name, value in self.model.named_buffers():
                    value.copy_(buffers[name])

    def _rng_devices(self) -> list:
        return [] if self.device.type == "cpu" else [self.device]

    def _forward_backward(self, micro_batch: int) -> None:
        images = torch.zeros((micro_batch, *self.image_shape), dtype=self.input_dtype, device=self.device)
        texts = torch.zeros((micro_batch, self.context_length), dtype=torch.long, device=self.device)
        with self.autocast():
            rows = model_rows(self.objective, self.model, images, texts)
            with_gradient = [row.float().sum() for row in rows.values() if row.requires_grad]
        if with_gradient:
            torch.stack(with_gradient).sum().backward()

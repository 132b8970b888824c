"""The SDAA-aware device hook: from what is installed and from `--device`, decide the device, the
process-group backend, the precision and its grad scaler, and build the Accelerator.

Accelerate (>= 1.5) already knows Tecorigin SDAA: with `torch_sdaa` importable it places each process
on `sdaa:LOCAL_RANK`, initialises `tccl` and uses `torch.sdaa.amp.GradScaler`. This module does not
redo that; it states the plan up front (so the run can log it and tests can assert it), refuses
impossible requests with a clear message, and fills what Accelerate leaves to the script: pinned
memory, the visible-devices variable and memory statistics.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch

from acc_clip.errors import AccClipError

# open_clip_train's --precision -> Accelerate's mixed_precision
MIXED_PRECISION = {"amp": "fp16", "fp16": "fp16", "amp_bf16": "bf16", "bf16": "bf16", "fp32": "no"}
AUTOCAST_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": None}
BACKEND = {"sdaa": "tccl", "cuda": "nccl", "cpu": "gloo"}
VISIBLE_DEVICES = {"sdaa": "SDAA_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES", "cpu": None}


def torch_sdaa_installed() -> bool:
    return importlib.util.find_spec("torch_sdaa") is not None


@dataclass(frozen=True)
class DevicePlan:
    kind: str  # "sdaa", "cuda" or "cpu"
    device: str  # "sdaa:0", "cuda:1", "cpu"
    backend: str  # process-group backend when several processes run
    mixed_precision: str  # Accelerate's name: "no", "fp16", "bf16"
    autocast_dtype: Optional[torch.dtype]
    uses_grad_scaler: bool
    pin_memory: bool
    visible_devices_variable: Optional[str]

    def describe(self) -> str:
        return (f"device {self.device} ({self.kind}), backend {self.backend}, mixed precision {self.mixed_precision}"
                f"{', grad scaler' if self.uses_grad_scaler else ''}")


def plan_device(requested: Optional[str], precision: str, local_rank: Optional[int] = None) -> DevicePlan:
    """What this process will run on. `requested` is `--device` (None: the best available)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    sdaa = torch_sdaa_installed()
    cuda = torch.cuda.is_available()
    kind = (requested or ("sdaa" if sdaa else "cuda" if cuda else "cpu")).split(":")[0]
    if kind == "sdaa" and not sdaa:
        raise AccClipError("--device sdaa needs the torch_sdaa package (Tecorigin's SDAA software stack), "
                           "which is not installed; drop --device to train on CUDA or the CPU")
    if kind == "cuda" and not cuda:
        raise AccClipError("--device cuda: no CUDA device is available to torch; drop --device to use the CPU")
    if kind == "cuda" and sdaa:
        # Accelerate prefers SDAA whenever torch_sdaa is importable; say so rather than surprise.
        raise AccClipError("--device cuda while torch_sdaa is installed: Accelerate would place the run on SDAA")
    if kind not in BACKEND:
        raise AccClipError(f"--device {requested!r}: expected sdaa, cuda or cpu")
    if precision not in MIXED_PRECISION:
        raise AccClipError(f"--precision {precision!r}: expected one of {', '.join(MIXED_PRECISION)}")
    mixed = MIXED_PRECISION[precision]
    if kind == "cpu" and mixed == "fp16":
        mixed = "bf16"  # the CPU's autocast dtype, as open_clip_train's amp on the CPU
    return DevicePlan(
        kind=kind,
        device="cpu" if kind == "cpu" else f"{kind}:{local_rank}",
        backend=BACKEND[kind],
        mixed_precision=mixed,
        autocast_dtype=AUTOCAST_DTYPE[mixed],
        uses_grad_scaler=mixed == "fp16" and kind != "cpu",
        pin_memory=kind != "cpu",
        visible_devices_variable=VISIBLE_DEVICES[kind],
    )


def make_accelerator(plan: DevicePlan, *, use_bn_sync: bool = False, find_unused_parameters: bool = False):
    """The Accelerator for `plan`; checks that Accelerate agrees with the plan."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    accelerator = Accelerator(cpu=plan.kind == "cpu", mixed_precision=plan.mixed_precision, kwargs_handlers=handlers)
    if accelerator.device.type != plan.kind:
        raise AccClipError(f"planned device {plan.kind} but Accelerate chose {accelerator.device}; "
                           f"check {plan.visible_devices_variable or 'the launch configuration'}")
    return accelerator


def grad_scaler(plan: DevicePlan):
    """The grad scaler the plan's device uses for fp16, as Accelerate would pick it (None without fp16)."""
    if not plan.uses_grad_scaler:
        return None
    if plan.kind == "sdaa":
        return torch.sdaa.amp.GradScaler()
    return torch.amp.GradScaler(plan.kind)


def peak_memory_bytes(plan: DevicePlan) -> Optional[int]:
    if plan.kind == "cuda":
        return torch.cuda.max_memory_allocated()
    if plan.kind == "sdaa":
        return torch.sdaa.max_memory_allocated()
    return None

"""The SDAA-aware device hook: from what is installed and from `--device`, decide the device, the
process-group backend, the precision and its grad scaler, and build the Accelerator.

Accelerate (>= 1.5) already knows Tecorigin SDAA: with `torch_sdaa` importable and a card visible
(`accelerate.utils.is_sdaa_available`) it places each process on `sdaa:LOCAL_RANK`, starts the
`tccl` process group (`DistributedType.MULTI_SDAA`), autocasts on device type "sdaa" and scales
fp16 losses with `torch.sdaa.amp.GradScaler`. This module does not redo any of that. It states the
plan up front (so the run can log it and tests can assert it), refuses impossible requests with one
clear line, checks that Accelerate agreed, and fills what Accelerate leaves to the script: CUDA's
TF32 switches as open_clip_train sets them, pinned memory, memory statistics, the CPU (gloo)
process group used to agree on batch sizes without a device sync, and the refusal of
`--use-bn-sync` where torch cannot synchronise batch norm.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from acc_clip.config.schema import Domain, Needs, Section, option
from acc_clip.errors import ResourceError, UsageError
from acc_clip.runtime.parallel import (
    COMPILE_STRATEGIES,
    FsdpFlags,
    TorchCompile,
    enable_fsdp_on_cpu,
    fsdp_plugin,
    kwargs_handlers,
    offloads,
    one_process_group,
)

# open_clip_train's --precision -> Accelerate's mixed_precision (autocast, and a grad scaler for fp16). The amp
# modes autocast; fp16/bf16 cast the weights (open_clip's convert_weights_to_lp) and pure_* the whole model, with
# inputs in that dtype and neither autocast nor scaler: open_clip_train's meaning of each.
MIXED_PRECISION = {
    "amp": "fp16",
    "amp_bf16": "bf16",
    "amp_bfloat16": "bf16",
    "fp32": "no",
    "fp16": "no",
    "bf16": "no",
    "pure_fp16": "no",
    "pure_bf16": "no",
}
INPUT_DTYPE = {"fp16": torch.float16, "pure_fp16": torch.float16, "bf16": torch.bfloat16, "pure_bf16": torch.bfloat16}
AUTOCAST_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": None}
# What Accelerate's PartialState picks for each device when LOCAL_RANK is set (it has no public table).
BACKEND = {"sdaa": "tccl", "cuda": "nccl", "npu": "hccl", "xpu": "xccl", "mps": "gloo", "cpu": "gloo"}
DISTRIBUTED_TYPE = {
    "sdaa": "MULTI_SDAA",
    "cuda": "MULTI_GPU",
    "npu": "MULTI_NPU",
    "xpu": "MULTI_XPU",
    "mps": "NO",
    "cpu": "MULTI_CPU",
}
VISIBLE_DEVICES = {
    "sdaa": "SDAA_VISIBLE_DEVICES",
    "cuda": "CUDA_VISIBLE_DEVICES",
    "npu": "ASCEND_RT_VISIBLE_DEVICES",
    "xpu": "ZE_AFFINITY_MASK",
    "mps": None,
    "cpu": None,
}
# Devices Accelerate supports besides SDAA, CUDA and the CPU: its own availability test for each.
OTHER_DEVICES = {"npu": "is_npu_available", "xpu": "is_xpu_available", "mps": "is_mps_available"}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 arithmetic
PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")  # open_clip's
DEVICE = Domain(
    "sdaa, cuda, npu, xpu, mps or cpu (optionally :INDEX)", lambda v: v.split(":")[0] in BACKEND, ("tpu", "auto")
)
# The seed reaches numpy's generator, which takes 0 .. 2**32-1 (Accelerate's set_seed seeds them all).
SEED = Domain("within 0 .. 2**32-1", lambda v: 0 <= v < 2**32, ("-1", str(2**32)))
# torch's process-group backends, and those vendor packages register (SDAA's tccl, Ascend's hccl).
DIST_BACKENDS = ("nccl", "gloo", "mpi", "ucc", "xccl", "tccl", "hccl")
COMPILING = Needs("--torchcompile", lambda s: s.torchcompile)
INDUCTOR = Needs(
    "--torchcompile with the inductor backend (the default)",
    lambda s: s.torchcompile and s.torchcompile_backend in (None, "inductor"),
)
FSDP = Needs("--fsdp", lambda s: s.fsdp)


def _compile_backend(name: str) -> bool:
    import torch._dynamo

    return name in torch._dynamo.list_backends(exclude_tags=())


def _compile_mode(name: str) -> bool:
    import torch._inductor

    return name in torch._inductor.list_mode_options()


# torch.compile's backends and inductor's modes, as the installed torch lists them (read only when given).
COMPILE_BACKEND = Domain("a torch.compile backend (torch._dynamo.list_backends)", _compile_backend, ("no-backend",))
COMPILE_MODE = Domain("an inductor mode (torch._inductor.list_mode_options)", _compile_mode, ("no-mode",))
# open_clip_train flags that cannot mean anything under acc_clip: flag -> why, and what to use instead.
REFUSED_FLAGS = {
    "horovod": "acc_clip runs on Accelerate, not Horovod: start processes with `accelerate launch` (launch/README.md)",
    "torchscript": "a TorchScript model cannot be trained here; export (acc-clip export) and script the open_clip "
    "model for inference",
    "trace": "open_clip_train cannot train a traced model either; trace the exported model for inference",
    "use_bnb_linear": "bitsandbytes int8 linear layers are not supported; train in a --precision of torch's",
    "no_set_device_rank": "Accelerate places each process on its local device; choose devices with "
    "CUDA_VISIBLE_DEVICES or SDAA_VISIBLE_DEVICES",
}


@dataclass
class RuntimeOptions(Section):
    """Where and how the processes run: the device, the precision, the seed, the process group and the
    wrapping; and open_clip_train's flags that have no meaning here (refused in one line)."""

    title: ClassVar[str] = "runtime"
    device: str | None = option(
        None,
        "sdaa, cuda, npu, xpu, mps or cpu; default: sdaa if torch_sdaa is installed, else cuda, else cpu",
        domain=DEVICE,
    )
    precision: str = option(
        "amp",
        "open_clip's: amp (fp16 autocast + grad scaler), amp_bf16 = amp_bfloat16 (bf16 "
        "autocast), fp16 / bf16 (weights cast, no autocast), pure_fp16 / pure_bf16 (the "
        "whole model cast), fp32",
        choices=PRECISIONS,
    )
    seed: int = option(0, "seed for weights, sample order and augmentation", domain=SEED, train_only=True)
    torchcompile: bool = option(False, "torch.compile the training (what: --torchcompile-strategy)", train_only=True)
    torchcompile_strategy: str = option(
        "task",
        "what --torchcompile compiles, as open_clip's: task = each micro-batch's forward (the wrapped model) and "
        "loss (the objective); model = the module, in place, before the DDP wrapping; step = the whole step of "
        "one batch (forward, loss, backward, clipping, optimizer step, logit-scale clamp; needs --accum-freq 1 "
        "and a precision without grad scaler). Under FSDP every strategy also compiles each transformer block "
        "and ResNet stage before sharding (model: only those). Evaluation calls the module itself: compiled "
        "with model and under FSDP (compiled again for eval mode), eager otherwise",
        choices=COMPILE_STRATEGIES,
        needs=COMPILING,
        train_only=True,
    )
    torchcompile_mode: str | None = option(
        None,
        "torch.compile's mode (default, reduce-overhead, max-autotune, ...; default: torch's)",
        domain=COMPILE_MODE,
        needs=INDUCTOR,
        train_only=True,
    )
    torchcompile_backend: str | None = option(
        None,
        "torch.compile's backend (inductor, aot_eager, eager, ...; default: torch's, inductor)",
        domain=COMPILE_BACKEND,
        needs=COMPILING,
        train_only=True,
    )
    cudnn_benchmark: bool = option(
        True,
        "cuDNN picks the fastest convolution algorithms on CUDA, as open_clip_train "
        "does (--no-cudnn-benchmark: the same algorithms every run)",
        tristate=True,
        train_only=True,
    )
    use_bn_sync: bool = option(False, "synchronise batch-norm statistics across processes", train_only=True)
    ddp_static_graph: bool = option(
        False, "DDP's static_graph (the same parameters take part in every step)", train_only=True
    )
    dist_backend: str | None = option(
        None,
        "process-group backend (default: nccl on CUDA, tccl on SDAA, gloo on the CPU)",
        choices=DIST_BACKENDS,
        train_only=True,
    )
    dist_url: str | None = option(
        None, "env:// only: addresses come from the launcher (accelerate launch, srun)", train_only=True
    )
    fsdp: bool = option(
        False,
        "FSDP2 instead of DDP, without an FSDP launch config: acc_clip sets what launch/fsdp.yaml's fsdp section "
        "sets (its units, sharded step checkpoints). With an FSDP launch config as well, the two must agree. "
        "On one process started without a launcher: a process group of one (nothing split; with "
        "--fsdp-offload-cpu the state lives in host memory)",
        train_only=True,
    )
    fsdp_no_reshard_after_forward: bool = option(
        False,
        "keep each unit's gathered weights from its forward to its backward (FSDP2's reshard_after_forward=False): "
        "one all-gather per unit and step instead of two, more memory",
        needs=FSDP,
        train_only=True,
    )
    fsdp_offload_cpu: bool = option(
        False,
        "keep parameters, gradients and optimizer state in host memory (FSDP2's CPUOffloadPolicy): each unit is "
        "copied to the device for its forward and backward, and the optimizer steps on the CPU",
        needs=FSDP,
        train_only=True,
    )
    horovod: bool = option(False, "refused: acc_clip runs on Accelerate", train_only=True)
    no_set_device_rank: bool = option(
        False, "refused: Accelerate places each process on its local device", train_only=True
    )
    torchscript: bool = option(False, "refused: a TorchScript model cannot be trained", train_only=True)
    trace: bool = option(False, "refused: a traced model cannot be trained", train_only=True)
    use_bnb_linear: str | None = option(None, "refused: bitsandbytes linear layers are not supported", train_only=True)

    def check(self) -> None:
        """open_clip_train flags that cannot mean anything here, or only in part: one line each."""
        for key, why in REFUSED_FLAGS.items():
            if getattr(self, key):
                raise UsageError(f"--{key.replace('_', '-')}: {why}")
        if self.dist_url not in (None, "env://"):
            raise UsageError(
                f"--dist-url {self.dist_url}: acc_clip's processes take their addresses from the "
                "launcher: accelerate launch --main_process_ip/--main_process_port, or srun with "
                "MASTER_ADDR/MASTER_PORT (launch/README.md)"
            )

    def compiling(self) -> TorchCompile | None:
        """--torchcompile's settings, None without it."""
        if not self.torchcompile:
            return None
        return TorchCompile(self.torchcompile_strategy, self.torchcompile_mode, self.torchcompile_backend)

    def fsdp_flags(self) -> FsdpFlags | None:
        """--fsdp's settings, None without it."""
        if not self.fsdp:
            return None
        return FsdpFlags(not self.fsdp_no_reshard_after_forward, self.fsdp_offload_cpu)


def torch_sdaa_installed() -> bool:
    return importlib.util.find_spec("torch_sdaa") is not None


def sdaa_available() -> bool:
    """Accelerate's own test (torch_sdaa importable and a card visible), so both always agree."""
    from accelerate.utils import is_sdaa_available

    return torch_sdaa_installed() and is_sdaa_available()


@dataclass(frozen=True)
class DevicePlan:
    kind: str  # "sdaa", "cuda" or "cpu"; also the autocast device type
    device: str  # "sdaa:0", "cuda:1", "cpu"
    backend: str  # process-group backend when several processes run
    distributed_type: str  # Accelerate's DistributedType when several processes run
    mixed_precision: str  # Accelerate's name: "no", "fp16", "bf16"
    autocast_dtype: torch.dtype | None
    input_dtype: torch.dtype | None  # the weights' and inputs' dtype when --precision casts them, else None
    uses_grad_scaler: bool
    pin_memory: bool
    visible_devices_variable: str | None
    note: str = ""  # a deviation from what --precision asked, said at start-up

    @property
    def autocast_device_type(self) -> str:
        return self.kind

    def describe(self) -> str:
        return (
            f"device {self.device} ({self.kind}), backend {self.backend} when distributed "
            f"({self.distributed_type}), mixed precision {self.mixed_precision}"
            f"{', grad scaler' if self.uses_grad_scaler else ''}{'; ' + self.note if self.note else ''}"
        )


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); without it bf16 autocast is emulated."""
    try:
        with open(cpuinfo) as file:
            flags = next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def check_other_device(kind: str, requested: str) -> None:
    """--device npu|xpu|mps: Accelerate runs there when torch sees one; refuse in one line when not."""
    import accelerate.utils

    if not getattr(accelerate.utils, OTHER_DEVICES[kind])():
        raise ResourceError(
            f"--device {requested}: torch sees no {kind} device here (its backend package or the "
            "device is missing); drop --device to use the best available"
        )


def cpu_mixed_precision(precision: str, mixed: str, native_bf16: bool) -> tuple[str, str]:
    """(mixed precision, note) on the CPU, where autocast means bf16. open_clip autocasts `amp` there too,
    but without native bf16 that is emulated: measured 20x slower than fp32 for RN50's forward and
    backward on an AVX2 CPU (49.4 s against 2.5 s for 2 images, one thread). There `amp` runs fp32."""
    if mixed != "fp16":
        note = (
            ""
            if mixed == "no" or native_bf16
            else f"--precision {precision}: this CPU has no native bf16, so bf16 autocast is emulated and slow"
        )
        return mixed, note
    if native_bf16:
        return "bf16", f"--precision {precision} on the CPU runs as bf16 autocast"
    return "no", (
        f"--precision {precision} on the CPU runs fp32: this CPU has no native bf16, and bf16 autocast "
        "measured 20x slower than fp32 on such a CPU (--precision amp_bf16 forces it)"
    )


def plan_device(
    requested: str | None, precision: str, local_rank: int | None = None, backend: str | None = None
) -> DevicePlan:
    """What this process will run on. `requested` is `--device` (None: the best available); `backend`
    is `--dist-backend` (None: the device's own)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    kind = requested.split(":")[0] if requested else None
    if kind not in (*BACKEND, None):
        raise UsageError(f"--device {requested!r}: expected sdaa, cuda, npu, xpu, mps or cpu")
    if kind in OTHER_DEVICES:
        check_other_device(kind, str(requested))
    # --device cpu asks nothing of CUDA, so that make_accelerator can still hide the GPUs (see there).
    sdaa = kind != "cpu" and sdaa_available()
    cuda = kind != "cpu" and torch.cuda.is_available()
    kind = kind or ("sdaa" if sdaa else "cuda" if cuda else "cpu")
    if kind == "sdaa" and not sdaa:
        if not torch_sdaa_installed():
            raise ResourceError(
                "--device sdaa needs the torch_sdaa package (Tecorigin's SDAA software stack), "
                "which is not installed; drop --device to train on CUDA or the CPU"
            )
        raise ResourceError(
            "--device sdaa: torch_sdaa is installed but torch.sdaa sees no card; "
            "check SDAA_VISIBLE_DEVICES and the driver"
        )
    if kind == "cuda" and not cuda:
        raise ResourceError("--device cuda: no CUDA device is available to torch; drop --device to use the CPU")
    if kind == "cuda" and sdaa:
        # Accelerate prefers SDAA whenever a card is visible; say so rather than surprise.
        raise UsageError(
            "--device cuda while torch_sdaa sees an SDAA card: Accelerate would place the run on "
            "SDAA; hide the cards with SDAA_VISIBLE_DEVICES= to use CUDA"
        )
    if precision not in MIXED_PRECISION:
        raise UsageError(f"--precision {precision!r}: expected one of {', '.join(MIXED_PRECISION)}")
    mixed, note = MIXED_PRECISION[precision], ""
    if kind == "cpu":
        # Accelerate ignores fp16 on the CPU (no autocast, no scaler); bf16 autocast is the CPU's mixed precision.
        mixed, note = cpu_mixed_precision(precision, mixed, cpu_has_native_bf16())
    return DevicePlan(
        kind=kind,
        device=kind if kind in ("cpu", "mps") else f"{kind}:{local_rank}",  # one CPU, one Apple GPU per machine
        backend=backend or BACKEND[kind],
        distributed_type=DISTRIBUTED_TYPE[kind],
        mixed_precision=mixed,
        autocast_dtype=AUTOCAST_DTYPE[mixed],
        input_dtype=INPUT_DTYPE.get(precision),
        uses_grad_scaler=mixed == "fp16",
        pin_memory=kind not in ("cpu", "mps"),  # MPS shares the host memory: nothing to pin
        visible_devices_variable=VISIBLE_DEVICES[kind],
        note=note,
    )


def check_bn_sync(plan: DevicePlan, use_bn_sync: bool) -> None:
    """torch's SyncBatchNorm runs only on accelerators: refuse before training rather than at step 1."""
    if use_bn_sync and plan.kind == "cpu":
        raise UsageError("--use-bn-sync needs CUDA or SDAA devices: torch's SyncBatchNorm cannot run on the CPU")


def hide_gpus_from_cpu_processes(plan: DevicePlan, environ=os.environ) -> bool:
    """Several CPU processes on a machine with a GPU: Accelerate's wait_for_everyone calls
    `barrier(device_ids=[LOCAL_RANK])`, and torch then runs the gloo barrier on cuda:LOCAL_RANK, which
    fails ("invalid device ordinal") with fewer GPUs than processes (seen on one H100, 2 processes).
    CPU processes need no GPU: hide them before CUDA is first asked about. Returns whether it hid them."""
    if plan.kind != "cpu" or int(environ.get("WORLD_SIZE", "1")) < 2 or environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    environ["CUDA_VISIBLE_DEVICES"] = ""
    return True


def check_compile(plan: DevicePlan, compiling: TorchCompile | None) -> None:
    """--torchcompile-strategy step compiles one plain backward and optimizer step: a grad scaler's
    unscale, skipped steps and scale updates are not part of it (open_clip refuses it too)."""
    if compiling is not None and compiling.strategy == "step" and plan.uses_grad_scaler:
        raise UsageError(
            "--torchcompile-strategy step needs a precision without grad scaler, and --precision amp "
            f"on {plan.kind} scales fp16 losses; use --precision amp_bf16 or fp32, or another strategy"
        )


def backend_matches(planned: str, started: str | None) -> bool:
    """Whether Accelerate started the planned backend: with FSDP's CPU offload on nccl or xccl it starts
    a pair, e.g. "cuda:nccl,cpu:gloo" (gloo for the host-side tensors)."""
    return planned in [part.split(":")[-1] for part in (started or "").split(",")]


def fsdp_for(plan: DevicePlan, flags: FsdpFlags | None):
    """Accelerate's FSDP plugin from the launch config's fsdp section or from --fsdp (`flags`); None
    without either."""
    if flags is not None:
        one_process_group()  # FSDP2 needs a process group, also of one process
    plugin = fsdp_plugin(flags=flags)
    if plugin is not None and plan.kind == "cpu" and offloads(plugin):
        raise UsageError(
            "FSDP's CPU offload (--fsdp-offload-cpu, or fsdp_offload_params: true in the launch config) with "
            "--device cpu: the state is in host memory already, and torch's offload pins memory, which needs "
            "a GPU; drop it"
        )
    return plugin


def make_accelerator(
    plan: DevicePlan,
    *,
    find_unused_parameters: bool = False,
    cudnn_benchmark: bool = True,
    static_graph: bool = False,
    fsdp: FsdpFlags | None = None,
    **accelerator_kwargs,
):
    """The Accelerator for `plan` (extra keywords, e.g. trackers, go to Accelerator); checks that
    Accelerate agrees with the plan. `fsdp`: --fsdp's settings (FSDP2 without an FSDP launch config)."""
    from accelerate import Accelerator

    hide_gpus_from_cpu_processes(plan)
    plugin = fsdp_for(plan, fsdp)
    if plan.kind == "cuda":
        # open_clip_train's settings: TF32 matmuls and cuDNN autotuning.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cudnn.deterministic = False
    backend = plan.backend if plan.backend != BACKEND[plan.kind] else None  # --dist-backend, where it differs
    handlers = kwargs_handlers(
        find_unused_parameters=find_unused_parameters, static_graph=static_graph, backend=backend
    )
    accelerator = Accelerator(
        cpu=plan.kind == "cpu",
        mixed_precision=plan.mixed_precision,
        kwargs_handlers=handlers,
        fsdp_plugin=plugin,
        **accelerator_kwargs,
    )
    enable_fsdp_on_cpu(accelerator, plugin)
    where = plan.visible_devices_variable or "the launch configuration"
    if accelerator.device.type != plan.kind:
        raise ResourceError(f"planned device {plan.kind} but Accelerate chose {accelerator.device}; check {where}")
    if accelerator.num_processes > 1:
        chosen = (accelerator.state.backend, accelerator.distributed_type.value)
        planned_type = "FSDP" if plugin is not None else plan.distributed_type
        if not backend_matches(plan.backend, chosen[0]) or chosen[1] != planned_type:
            raise ResourceError(
                f"planned backend {plan.backend} ({plan.distributed_type}) but Accelerate started "
                f"{chosen[0]} ({chosen[1]}); check {where}"
            )
    return accelerator


def host_process_group(accelerator):
    """A gloo (CPU) process group over all ranks, for small host-side agreements (batch sizes) that
    must not wait on the device; None with one process. Every rank must call this, in the same order."""
    if accelerator.num_processes == 1:
        return None
    if torch.distributed.get_backend() == "gloo":
        return torch.distributed.group.WORLD
    return torch.distributed.new_group(backend="gloo")


def host_vote(flag: bool, host_group, *, every: bool = False) -> bool:
    """Whether any process (or, `every`, all of them) holds `flag`, the same answer on every process, agreed
    over the CPU group of `host_process_group` (None with one process: this process's own flag), so the device
    is not synchronised. Every process must call it at the same point."""
    if host_group is None:
        return flag
    vote = torch.tensor([int(flag)], dtype=torch.int32)
    op = torch.distributed.ReduceOp.MIN if every else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(vote, op=op, group=host_group)
    return bool(vote.item())

"""The one owner of model wrapping: how the model is spread over processes (Accelerate's DDP, or
FSDP2 when the launch config has an fsdp section, launch/fsdp.yaml, or with --fsdp), and the ways back
to the plain open_clip module. Nothing else in acc_clip calls `accelerator.unwrap_model`, `accelerator.prepare`
on the model or `no_sync`.

- `prepare`: batch-norm sync, then Accelerate's wrapping (DDP, mixed precision); with
  `--torchcompile-strategy model` the module is compiled before the wrapping (under FSDP each unit, with
  any strategy); the `task` and `step` strategies compile what the loop calls (train/compiled.py);
- `unwrap`: the plain module whose parameters the optimizer steps (no `module.`, no `_orig_mod.`);
- `no_sync`: the context in which a backward does not reduce gradients across processes
  (the non-final micro-batches of an accumulated step);
- `full_state_dict`: the plain-named full weights, for saving, export and evaluation;
- `kwargs_handlers`: the wrapping's settings, handed to the Accelerator when it is built.

FSDP2 (`fully_shard`): parameters, gradients and optimizer state are sharded over the processes.
Each transformer residual block, each ResNet stage and each tower is its own unit (`shard_units`),
the rest (embeddings, projections, logit_scale) sits in the root unit. Accelerate shards the root
and swaps the optimizer's parameters; acc_clip picks the units, as Accelerate's wrap policies can
name classes but not the stages of a ResNet (plain nn.Sequential). FSDP comes from the launch config
(its fsdp section) or from `--fsdp`, which sets what that section would (`FsdpFlags`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from acc_clip.errors import UsageError

log = logging.getLogger(__name__)
# open_clip's 0-d parameters (temperature, SigLIP's bias): 1-element vectors under FSDP (scalars_as_vectors).
SCALAR_PARAMETERS = ("logit_scale", "logit_bias")
# Accelerate's own variable: `accelerate launch` sets it from a config whose distributed_type is FSDP.
FSDP_VARIABLE = "ACCELERATE_USE_FSDP"


def kwargs_handlers(*, find_unused_parameters: bool, static_graph: bool = False, backend: str | None = None) -> list:
    """Accelerate's settings for the wrapping it will do (DDP's, under several processes: --ddp-static-graph)
    and for the process group it starts (--dist-backend; None: Accelerate's choice for the device)."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, static_graph=static_graph)]
    if backend is not None:
        handlers.append(InitProcessGroupKwargs(backend=backend))
    return handlers


# FSDP2 -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FsdpFlags:
    """`--fsdp` and its flags: FSDP2 without an FSDP launch config."""

    reshard_after_forward: bool = True  # --fsdp-no-reshard-after-forward: False
    offload_cpu: bool = False  # --fsdp-offload-cpu

    def variables(self) -> dict[str, str]:
        """What `accelerate launch` sets for launch/fsdp.yaml's fsdp section (accelerate.utils.launch), with
        reshard and offload from the flags. Accelerate reads them, not only the plugin: with offload on nccl
        it also starts a gloo group for the host-side tensors."""
        return {
            FSDP_VARIABLE: "true",
            "FSDP_VERSION": "2",
            "FSDP_SHARDING_STRATEGY": "FULL_SHARD",  # FSDP1's; FSDP2 reads reshard_after_forward
            "FSDP_RESHARD_AFTER_FORWARD": str(self.reshard_after_forward).lower(),
            "FSDP_OFFLOAD_PARAMS": str(self.offload_cpu).lower(),
            "FSDP_MIN_NUM_PARAMS": "100000000",  # the launcher's default; NO_WRAP does not read it
            "FSDP_AUTO_WRAP_POLICY": "NO_WRAP",  # acc_clip's own units (shard_units)
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
            "FSDP_FORWARD_PREFETCH": "false",
            "FSDP_USE_ORIG_PARAMS": "true",
            "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
            "FSDP_SYNC_MODULE_STATES": "true",
            "FSDP_ACTIVATION_CHECKPOINTING": "false",  # --grad-checkpointing is open_clip's own
            "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "false",
        }


def fsdp_plugin(environ: MutableMapping[str, str] = os.environ, flags: FsdpFlags | None = None):
    """Accelerate's FSDP plugin, read from the launch config's fsdp section (accelerate launch hands it
    over as FSDP_* variables) or, with `--fsdp` (`flags`) and no such section, from the variables that
    section would set, set here in `environ`, the process's environment, which Accelerate reads; None
    when neither asks for FSDP. Only FSDP2 is supported."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    launched = environ.get(FSDP_VARIABLE, "false").lower() == "true"
    if flags is not None and not launched:
        environ.update(flags.variables())
    elif not launched:
        return None
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UsageError(
            f"the launch config's fsdp_config has fsdp_version {plugin.fsdp_version}: acc_clip "
            "supports FSDP2 only; set fsdp_version: 2 (see launch/fsdp.yaml)"
        )
    kind = getattr(plugin.state_dict_type, "name", str(plugin.state_dict_type))
    if kind != "SHARDED_STATE_DICT":
        # A full state dict is written by rank 0 alone (step checkpoints then cannot reshard on resume).
        raise UsageError(
            f"the launch config's fsdp_config has fsdp_state_dict_type {kind}: acc_clip's step "
            "checkpoints are sharded; set fsdp_state_dict_type: SHARDED_STATE_DICT (see launch/fsdp.yaml)"
        )
    if flags is not None and launched:
        check_flags_agree(plugin, flags)
    return plugin


def offloads(plugin) -> bool:
    from torch.distributed.fsdp import CPUOffloadPolicy

    return isinstance(plugin.cpu_offload, CPUOffloadPolicy)


def check_flags_agree(plugin, flags: FsdpFlags) -> None:
    """--fsdp under an FSDP launch config: one FSDP either way, so its settings must agree; else one line."""
    if plugin.reshard_after_forward != flags.reshard_after_forward:
        given = "without" if flags.reshard_after_forward else "with"
        raise UsageError(
            f"--fsdp {given} --fsdp-no-reshard-after-forward, but the launch config's fsdp_config has "
            f"fsdp_reshard_after_forward: {str(plugin.reshard_after_forward).lower()}; make them agree, or "
            "drop --fsdp (the launch config alone) or the config's fsdp section (the flags alone)"
        )
    if offloads(plugin) != flags.offload_cpu:
        given = "with" if flags.offload_cpu else "without"
        raise UsageError(
            f"--fsdp {given} --fsdp-offload-cpu, but the launch config's fsdp_config has fsdp_offload_params: "
            f"{str(offloads(plugin)).lower()}; make them agree, or drop --fsdp (the launch config alone) or "
            "the config's fsdp section (the flags alone)"
        )


def one_process_group(environ: MutableMapping[str, str] = os.environ) -> bool:
    """--fsdp in a process no launcher started: FSDP2 needs a process group, so make this process a
    group of one, as `accelerate launch --num_processes 1` would (MASTER_PORT 0: any free port; no other
    process connects). Nothing is split, but --fsdp-offload-cpu keeps the weights, gradients and optimizer
    state in host memory, and step checkpoints are sharded ones, which resume on any number of processes.
    Returns whether it set anything."""
    if "LOCAL_RANK" in environ or "RANK" in environ:
        return False
    environ.update({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"})
    return True


# torch.compile ---------------------------------------------------------------------------------

COMPILE_STRATEGIES = ("model", "task", "step")


@dataclass(frozen=True)
class TorchCompile:
    """--torchcompile: the strategy (what is compiled) and torch.compile's own arguments (None: torch's
    default, inductor with its default mode)."""

    strategy: str = "task"
    mode: str | None = None
    backend: str | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return {key: value for key, value in (("mode", self.mode), ("backend", self.backend)) if value is not None}

    def describe(self) -> str:
        return f"strategy {self.strategy}, backend {self.backend or 'inductor'}, mode {self.mode or 'default'}"


def enable_fsdp_on_cpu(accelerator, plugin) -> bool:
    """Accelerate 1.15 turns FSDP on only for accelerator devices: with several CPU processes (gloo) it
    keeps DistributedType.MULTI_CPU and drops the plugin (AcceleratorState.__init__). torch's FSDP2 runs
    on the CPU, and the CPU is where the equality tests run, so set the state Accelerate would have
    set for a GPU: from then on prepare, no_sync, clip_grad_norm_, save_state and load_state take
    Accelerate's own FSDP2 paths. Returns whether it changed anything."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if plugin is None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP  # AcceleratorState's shared state
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ does
    return True


def is_fsdp(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def block_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every transformer residual block (image, text, CoCa's decoder) and every ResNet stage: the FSDP
    units that hold the model's compute, and what --torchcompile compiles under FSDP."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    units = []
    for module in model.modules():
        if isinstance(module, (ResidualAttentionBlock, CustomResidualAttentionBlock)):
            units.append(module)
        elif isinstance(module, ModifiedResNet):
            units.extend([module.layer1, module.layer2, module.layer3, module.layer4])
    return units


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that get their own FSDP unit, children before parents (fully_shard's order): the
    blocks and stages (`block_units`), then each tower."""
    towers = [getattr(model, name, None) for name in ("visual", "text", "text_decoder")]
    return block_units(model) + [tower for tower in towers if isinstance(tower, torch.nn.Module)]


def fully_shard_kwargs(plugin) -> dict:
    """fully_shard's settings from the plugin: those Accelerate gives the root, so all units agree."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return {
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
    }


def switch_optimizer_parameters(
    optimizer: torch.optim.Optimizer, before: dict[int, str], after: dict[str, torch.nn.Parameter]
) -> None:
    """fully_shard replaces each parameter by a new (DTensor) one: point the optimizer at the new ones,
    matched by name (`before`: id of the old parameter -> its name)."""
    for group in optimizer.param_groups:
        group["params"] = [after[before[id(parameter)]] for parameter in group["params"]]


def scalars_as_vectors(model: torch.nn.Module) -> None:
    """fully_shard refuses 0-d parameters; open_clip's temperature and bias are 0-d. Under FSDP they are
    held as 1-element vectors (they broadcast alike in the forward and the losses); `full_state_dict`
    gives them back as open_clip's 0-d tensors."""
    for name in SCALAR_PARAMETERS:
        parameter = getattr(model, name, None)
        if isinstance(parameter, torch.nn.Parameter) and parameter.ndim == 0:
            setattr(
                model, name, torch.nn.Parameter(parameter.detach().reshape(1), requires_grad=parameter.requires_grad)
            )


def contiguous_parameters(model: torch.nn.Module) -> None:
    """fully_shard refuses non-contiguous parameters, such as channels_last convolution weights; the
    inputs stay channels_last (convolutions take either layout), the weights become contiguous."""
    for parameter in model.parameters():
        if not parameter.is_contiguous():
            parameter.data = parameter.data.contiguous()


def shard_blocks(
    accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, compiling: TorchCompile | None = None
) -> None:
    """fully_shard every unit but the root (Accelerate's prepare shards the root and maps the
    optimizer's parameters from there); the optimizer is moved onto the new parameters. With
    --torchcompile each block and stage is compiled first (in place: the names stay open_clip's), so
    FSDP's hooks, added after, run around the compiled forward."""
    from torch.distributed.fsdp import fully_shard

    names = {id(parameter): name for name, parameter in model.named_parameters()}
    kwargs = fully_shard_kwargs(accelerator.state.fsdp_plugin)
    scalars_as_vectors(model)
    contiguous_parameters(model)
    if compiling:
        for block in block_units(model):
            block.compile(**compiling.kwargs)
    units = shard_units(model)
    for unit in units:
        fully_shard(unit, **kwargs)
    log.info(
        "FSDP2: %d units (transformer blocks, ResNet stages, towers) and the root, sharded over %d process(es)%s",
        len(units),
        accelerator.num_processes,
        f"; blocks and stages compiled ({compiling.describe()})" if compiling else "",
    )
    switch_optimizer_parameters(optimizer, names, dict(model.named_parameters()))


def check_fsdp_options(accelerator, *, sync_batch_norm: bool, model: torch.nn.Module) -> None:
    """What FSDP here cannot do, in one line each, before anything is sharded."""
    if sync_batch_norm:
        raise UsageError("--use-bn-sync under FSDP: not supported; drop --use-bn-sync")
    dtypes = {parameter.dtype for parameter in model.parameters()}
    if dtypes != {torch.float32}:
        raise UsageError(
            "--precision fp16/bf16/pure_*: FSDP keeps fp32 weights and computes in the run's mixed "
            "precision; use --precision amp, amp_bf16 or fp32"
        )


# the owner's functions -------------------------------------------------------------------------


def prepare(
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    sync_batch_norm: bool,
    compile_model: TorchCompile | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The wrapped model and its optimizer. `compile_model` (--torchcompile): under FSDP the blocks and
    stages are compiled before sharding, whatever the strategy (a compile around the FSDP root alone
    breaks its graph at every unit's hooks); otherwise strategy `model` compiles the whole module, in
    place, before the wrapping. `task` and `step` compile around the wrapping later (train/compiled.py)."""
    if is_fsdp(accelerator):
        check_fsdp_options(accelerator, sync_batch_norm=sync_batch_norm, model=model)
        shard_blocks(accelerator, model, optimizer, compile_model)
        return accelerator.prepare(model, optimizer)
    if sync_batch_norm and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if compile_model and compile_model.strategy == "model":
        model.compile(**compile_model.kwargs)  # in place: names, unwrap and checkpoints stay as they are
        log.info("torch.compile: the model, before the wrapping (%s)", compile_model.describe())
    return accelerator.prepare(model, optimizer)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The open_clip module. Under FSDP it is the sharded module itself (fully_shard wraps in place):
    its parameters are DTensors."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def no_sync(accelerator, model: torch.nn.Module) -> AbstractContextManager:
    """DDP: no all-reduce; FSDP2: no reduce-scatter (set_requires_gradient_sync(False), gradients kept
    unsharded until the last micro-batch's backward), so one reduction per update either way."""
    return accelerator.no_sync(model)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every process calls it), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor, a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def logit_scale(model: Any) -> torch.Tensor:
    """The temperature as a plain tensor on every process (a collective under FSDP)."""
    scale = cast(torch.Tensor, unwrap(model).logit_scale)
    return full_tensor(scale.detach()).reshape(()).clone()  # 0-d, as open_clip holds it


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain-named full weights. Under FSDP a collective: every process must call it; the main
    process gets them on the CPU, the others an empty dict (they hold one parameter at a time)."""
    if not is_fsdp_model(model):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tensors = cast(dict[str, torch.Tensor], state)  # a model's state dict holds tensors only
    return {key: value.reshape(()) if key in SCALAR_PARAMETERS else value for key, value in tensors.items()}


def full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, is_main_process: bool) -> dict:
    """torch's optimizer.state_dict() layout (parameters by index, as open_clip's epoch_N.pt holds it)
    with whole tensors. Without FSDP that is optimizer.state_dict(). Under FSDP each sharded state
    tensor is gathered in turn (a collective: every process calls this); the main process keeps them on
    the CPU, the others get an empty dict; the temperature's state is 0-d again, as its parameter."""
    saved = optimizer.state_dict()
    if not is_fsdp_model(model):
        return saved
    names = {id(parameter): name for name, parameter in unwrap(model).named_parameters()}
    ordered = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in saved["state"].items():
        scalar = ordered[index] in SCALAR_PARAMETERS
        whole = {key: _whole_state(value, scalar) for key, value in values.items()}
        if is_main_process:
            state[index] = whole
    return {"state": state, "param_groups": saved["param_groups"]} if is_main_process else {}


def _whole_state(value, scalar: bool):
    if not isinstance(value, torch.Tensor):
        return value
    value = full_tensor(value).cpu()
    return value.reshape(()) if scalar and value.numel() == 1 and value.ndim == 1 else value


def is_fsdp_model(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def weights_are_finite(model: torch.nn.Module, accelerator) -> bool:
    """Whether every weight is finite, the same answer on every process (under FSDP each holds another
    shard, so they vote: a process alone stopping would leave the others waiting)."""
    flags = [
        torch.isfinite(local_tensor(t)).all() for t in unwrap(model).state_dict().values() if t.is_floating_point()
    ]
    finite = torch.stack(flags).all() if flags else torch.tensor(True, device=accelerator.device)
    if is_fsdp_model(model):
        finite = finite.to(torch.int32)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The open_clip module with whole weights on every process, for evaluation: each process then
    encodes its own rows without collectives (they may hold unequal numbers of batches). Under FSDP
    each unit is all-gathered once and kept so until the block ends; otherwise nothing changes."""
    from torch.distributed.fsdp import FSDPModule

    units = {m: _reshards_after_forward(m) for m in unwrap(model).modules() if isinstance(m, FSDPModule)}
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)  # torch's documented way to evaluate
    try:
        yield unwrap(model)
    finally:
        for unit, reshards in units.items():
            unit.reshard()
            unit.set_reshard_after_forward(reshards, recurse=False)


def _reshards_after_forward(unit) -> bool:
    """A unit's reshard_after_forward, to put back after `gathered` (the root's and Accelerate's tail
    unit's are False, the blocks' the plugin's); FSDP2 has no getter, so its parameter groups are read."""
    groups = unit._get_fsdp_state()._fsdp_param_groups
    return any(group.post_forward_mesh_info is not None for group in groups)

"""The one owner of model wrapping: how the model is spread over processes (Accelerate's DDP
today), and the ways back to the plain open_clip module. Nothing else in acc_clip calls
`accelerator.unwrap_model`, `accelerator.prepare` on the model or `no_sync`, so a new parallelism
(FSDP) is a change to this module and a launch config.

- `prepare`: batch-norm sync, then Accelerate's wrapping (DDP, mixed precision), then
  torch.compile when asked;
- `unwrap`: the plain module whose parameters the optimizer steps (no `module.`, no `_orig_mod.`);
- `no_sync`: the context in which a backward does not reduce gradients across processes
  (the non-final micro-batches of an accumulated step);
- `full_state_dict`: the plain-named full weights, for saving, export and evaluation;
- `kwargs_handlers`: the wrapping's settings, handed to the Accelerator when it is built.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Optional

import torch


def kwargs_handlers(*, find_unused_parameters: bool, static_graph: bool = False, backend: Optional[str] = None) -> list:
    """Accelerate's settings for the wrapping it will do (DDP's, under several processes: --ddp-static-graph)
    and for the process group it starts (--dist-backend; None: Accelerate's choice for the device)."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, static_graph=static_graph)]
    if backend is not None:
        handlers.append(InitProcessGroupKwargs(backend=backend))
    return handlers


def prepare(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, sync_batch_norm: bool,
            compile_model: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    if sync_batch_norm and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if compile_model:
        model = torch.compile(model)
    return model, optimizer


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def no_sync(accelerator, model: torch.nn.Module) -> AbstractContextManager:
    return accelerator.no_sync(model)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return unwrap(model).state_dict()

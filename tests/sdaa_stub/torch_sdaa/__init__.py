"""A stand-in for Tecorigin's `torch_sdaa`, for tests only: no SDAA card or SDAA software can exist
on the machines that run this project's tests, so this module plays its part.

Importing it installs a `torch.sdaa` namespace with what Accelerate and acc_clip call
(is_available, device_count, set_device, amp.GradScaler, memory statistics, RNG seeding).
`install_device_backend()` goes further, for a subprocess only (it renames torch's PrivateUse1
backend, which cannot be undone in a process): `torch.device("sdaa:1")` becomes valid, autocast
accepts device type "sdaa", and the process-group backend "tccl" is registered, backed by gloo.
The number of cards is `SDAA_STUB_DEVICES` (default 2).
"""

from __future__ import annotations

import os
import types

import torch

set_devices: list = []  # every torch.sdaa.set_device call, for tests to inspect


class GradScaler:
    """Records how Accelerate constructed it; never scales anything."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _device_count() -> int:
    return int(os.environ.get("SDAA_STUB_DEVICES", "2"))


def _namespace() -> types.ModuleType:
    sdaa = types.ModuleType("torch.sdaa")
    sdaa.is_available = lambda: _device_count() > 0
    sdaa.device_count = _device_count
    sdaa.set_device = set_devices.append
    sdaa.current_device = lambda: 0
    sdaa.get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16]
    sdaa.max_memory_allocated = lambda device=None: 123 * 2**20
    sdaa.empty_cache = lambda: None
    sdaa.manual_seed_all = lambda seed: None
    sdaa.manual_seed = lambda seed: None
    sdaa.is_initialized = lambda: True
    sdaa._is_in_bad_fork = lambda: False
    sdaa.amp = types.SimpleNamespace(GradScaler=GradScaler)
    return sdaa


torch.sdaa = _namespace()


def install_device_backend() -> None:
    """Make "sdaa" a torch device type and "tccl" a process-group backend (gloo underneath)."""
    torch.utils.rename_privateuse1_backend("sdaa")

    def tccl(store, rank, world_size, timeout):
        return torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)

    torch.distributed.Backend.register_backend("tccl", tccl, devices=["cpu", "sdaa"])

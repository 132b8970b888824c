"""Memory figures for each step's metrics record: the device's peak and reserved memory and the
allocator's retries (CUDA, SDAA), or this process's resident host memory on the CPU.

Peaks are per step: read after the step, then reset, so a record holds the highest the step reached;
the run's highest is kept beside them for the closing log line. Reading them is host-side bookkeeping
in the allocator, no device synchronisation."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GIB = 2**30
# Resident pages of this process are the second field of /proc/self/statm (Linux).
STATM = "/proc/self/statm"


def _device_module(kind: str):
    """torch.cuda, or torch.sdaa (added by torch_sdaa), where the device has an allocator with statistics."""
    if kind == "cuda":
        return torch.cuda
    if kind == "sdaa":
        return getattr(torch, "sdaa", None)
    return None


def host_resident_bytes(statm: str = STATM) -> int | None:
    """This process's resident memory (RSS), None where /proc is not there."""
    try:
        with open(statm) as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class MemoryMeter:
    """Reads the figures of the step just done, for its metrics record."""

    kind: str  # the device plan's kind: "cuda", "sdaa", "cpu", ...
    run_peak_bytes: int = 0  # the highest peak of any step so far

    def step_figures(self) -> dict[str, float]:
        device = _device_module(self.kind)
        if device is None or not hasattr(device, "max_memory_allocated"):
            resident = host_resident_bytes()
            if resident is None:
                return {}
            self.run_peak_bytes = max(self.run_peak_bytes, resident)
            return {"host_resident_gib": resident / GIB}
        peak = device.max_memory_allocated()
        self.run_peak_bytes = max(self.run_peak_bytes, peak)
        figures = {"memory_peak_gib": peak / GIB}
        # A vendor's allocator (torch_sdaa) may offer only some of CUDA's statistics: those it has.
        if hasattr(device, "max_memory_reserved"):
            figures["memory_reserved_gib"] = device.max_memory_reserved() / GIB
        if hasattr(device, "memory_stats"):
            # cudaMalloc failed and the caching allocator freed its cache to try again: a run near its limit
            figures["alloc_retries"] = device.memory_stats().get("num_alloc_retries", 0)
        if hasattr(device, "reset_peak_memory_stats"):
            device.reset_peak_memory_stats()
        return figures

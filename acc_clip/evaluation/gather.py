"""Rows encoded on several processes, gathered on every process in row order."""

from __future__ import annotations

import torch
from accelerate import Accelerator


def gather_rows_by_index(
    accelerator: Accelerator, indices: torch.Tensor, *row_tensors: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Gather every process's rows (which may differ in number, or be none), sorted by row index,
    each index kept once. Returns (indices, *row_tensors), on the CPU, identical on every process."""
    device = accelerator.device
    # Pad to a common length with index -1 so unequal shares can go through one all_gather.
    padded = [accelerator.pad_across_processes(indices.to(device), dim=0, pad_index=-1)]
    padded += [accelerator.pad_across_processes(t.to(device), dim=0) for t in row_tensors]
    gathered = [accelerator.gather(t).cpu() for t in padded]
    all_indices, all_rows = gathered[0], gathered[1:]
    real = all_indices >= 0
    sorted_indices, order = all_indices[real].sort(stable=True)
    first_of_index = torch.ones_like(sorted_indices, dtype=torch.bool)
    first_of_index[1:] = sorted_indices[1:] != sorted_indices[:-1]
    keep = order[first_of_index]
    return (sorted_indices[first_of_index], *(rows[real][keep] for rows in all_rows))

"""The probe of --auto-micro-batch (acc_clip/train/micro_batch.py): the splits it tries, how it tells an
out-of-memory error from others, and that a trial leaves no trace on the model (weights, gradients,
batch norm's statistics, random streams): the run must train as if it had never probed."""

from __future__ import annotations

from contextlib import nullcontext

import open_clip
import pytest
import torch

from acc_clip.errors import ResourceError
from acc_clip.loss import create_objective
from acc_clip.train.config import train_config
from acc_clip.train.micro_batch import Trial, choose_split, is_out_of_memory, splits
from helpers import TINY_RN


def test_splits_are_the_divisors_fewest_micro_batches_first():
    assert splits(12) == [1, 2, 3, 4, 6, 12]
    assert splits(7) == [1, 7]


def test_out_of_memory_is_told_apart_from_other_errors():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_the_fewest_micro_batches_that_fit_are_chosen_and_other_errors_pass_through():
    tried = []

    def trial(size):
        tried.append(size)
        if size > 3:
            raise torch.OutOfMemoryError("simulated")

    assert choose_split(12, trial, None) == (3, 4)
    assert tried == [12, 6, 4, 3]
    with pytest.raises(ResourceError, match="not even one sample fits"):
        choose_split(4, lambda size: trial(99), None)

    def broken(size):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        choose_split(4, broken, None)


def test_a_trial_leaves_no_trace_on_the_model():
    """tiny-rn in training mode: batch norm's running statistics move in any forward, and dropout-free
    models still draw nothing; a trial must restore both and drop its gradients."""
    model = open_clip.create_model(TINY_RN, output_dict=True).train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    objective = create_objective(train_config(train_data="x.csv", model=TINY_RN), 0, 1, "cpu", nullcontext)
    rng = torch.random.get_rng_state()
    size = model.visual.image_size
    trial = Trial(
        model,
        objective,
        image_shape=(3, size, size),
        context_length=model.context_length,
        device="cpu",
        autocast=nullcontext,
    )
    trial(4)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(parameter.grad is None for parameter in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)
    torch.rand(1)  # the stream goes on from where it was

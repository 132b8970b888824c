"""train/compiled.py: which function the loop calls per step for each --torchcompile strategy. That each
trains as eager does is tests/integration/test_fsdp_flags.py."""

from __future__ import annotations

import torch

from acc_clip.runtime.parallel import TorchCompile
from acc_clip.train.compiled import CompiledLoss, step_function
from acc_clip.train.step import train_step


class Squares:
    """A stand-in objective: a loss and an attribute the step reads."""

    mean_over_processes = True

    def __call__(self, rows):
        return {"squares": (rows["x"] ** 2).sum()}


def test_without_compile_or_with_strategy_model_the_step_is_train_step():
    """model compiles the module itself (runtime/parallel.prepare): the step stays as it is."""
    assert step_function(None, object(), Squares()) is train_step
    assert step_function(TorchCompile("model"), object(), Squares()) is train_step
    assert step_function(TorchCompile("step", backend="eager"), object(), Squares()) is not train_step


def test_the_compiled_loss_is_the_objectives_loss_and_keeps_its_attributes():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    loss = CompiledLoss(Squares(), {"backend": "eager"})
    rows = {"x": torch.arange(4.0)}
    assert loss.mean_over_processes and loss(rows)["squares"] == Squares()(rows)["squares"] == 14
    assert counters["stats"]["unique_graphs"] == 1  # it went through torch.compile
    torch._dynamo.reset()

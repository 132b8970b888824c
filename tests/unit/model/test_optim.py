"""The optimizer and its schedule (acc_clip/model/optim.py): open_clip's weight-decay groups, the cosine
learning-rate schedule over every step of every epoch. Moved from tests/unit/test_model.py."""

import pytest
import torch

from acc_clip.loss import model_overrides
from acc_clip.model.build import create_model
from acc_clip.model.optim import create_lr_schedule, parameter_groups
from acc_clip.train.config import parse_train_config
from helpers import TINY_RN, open_clip_cosine_lr


def config_for(model, *extra):
    return parse_train_config(["--train-data", "x.csv", "--model", model, *extra])[0]


def test_weight_decay_groups_follow_open_clip_train():
    config = config_for(TINY_RN)
    model = create_model(
        config.model, precision=config.runtime.precision, seed=config.runtime.seed, **model_overrides(config)
    ).model
    no_decay, decay = parameter_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    assert "logit_scale" in no_decay_names and "visual.bn1.weight" in no_decay_names
    assert "transformer.resblocks.0.ln_1.weight" in no_decay_names and "visual.conv1.weight" in decay_names
    assert all(p.ndim >= 2 for p in decay["params"]) and not any("bias" in n for n in decay_names)
    assert len(no_decay_names) + len(decay_names) == len(list(model.parameters()))


@pytest.mark.parametrize("steps_per_epoch, epochs, warmup", [(7, 3, 4), (5, 2, 1)])
def test_cosine_schedule_is_open_clip_train_s_over_every_step_of_every_epoch(steps_per_epoch, epochs, warmup):
    """The lr create_lr_schedule sets (in every parameter group) and returns at the last warm-up
    step, at warm-up end (the full lr), mid-way through the cosine and at the last step of the run,
    whose total is steps_per_epoch * epochs."""
    config = config_for(TINY_RN, "--lr", "0.002", "--epochs", str(epochs), "--warmup", str(warmup))
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)]}], lr=1.0)
    schedule = create_lr_schedule(
        optimizer, config.optimizer, epochs=config.training.epochs, steps_per_epoch=steps_per_epoch
    )
    total = steps_per_epoch * epochs
    last_warmup, end_of_warmup, mid, last = warmup - 1, warmup, warmup + (total - warmup) // 2, total - 1
    for step in (0, last_warmup, end_of_warmup, mid, last):
        expected = open_clip_cosine_lr(step, 0.002, warmup, total)
        assert schedule(step) == pytest.approx(expected, rel=1e-12, abs=0), step
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([expected] * 2, rel=1e-12, abs=0)
    assert schedule(end_of_warmup) == pytest.approx(0.002, rel=1e-12)
    assert 0 < schedule(last) < schedule(mid) < 0.002

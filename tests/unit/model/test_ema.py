"""model/ema.py: timm ModelEmaV3's decay and update on a small model with batch norm, the EMA swapped in for
evaluation and put back bit for bit, the flags' checks and the resume decision."""

from __future__ import annotations

import logging

import pytest
import torch
from timm.utils.model_ema import ModelEmaV3

from acc_clip.errors import UsageError
from acc_clip.model.ema import EmaOptions, WeightsEma, ema_decay, resume_decision
from acc_clip.train.config import parse_train_config


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))


def train_a_little(model: torch.nn.Module, step: int) -> None:
    """Move the weights and batch norm's statistics as a step would."""
    generator = torch.Generator().manual_seed(step)
    model.train()
    model(torch.randn(5, 3, 4, 4, generator=generator))
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):  # a frozen one stays
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("decay", [0.9, 0.999, 0.9999])
def test_decay_is_timms(decay, warmup):
    timm = ModelEmaV3(torch.nn.Linear(1, 1), decay=decay, use_warmup=warmup)
    assert [ema_decay(step, decay, warmup) for step in range(1, 20001)] == [
        timm.get_decay(step) for step in range(1, 20001)
    ]


@pytest.mark.parametrize("warmup", [True, False])
def test_update_is_timms_with_batch_norm_statistics(warmup):
    """Each step's update, parameters and buffers (running statistics averaged, the step count copied), equals
    ModelEmaV3.update(model, step) bit for bit."""
    model = small_model()
    ours = WeightsEma(model, EmaOptions(ema_decay=0.9, ema_warmup=warmup), sharded=False)
    timm = ModelEmaV3(model, decay=0.9, use_warmup=warmup)
    for step in range(1, 6):
        train_a_little(model, step)
        ours.update(step)
        timm.update(model, step=step)
        theirs = timm.module.state_dict()
        assert ours.tensors().keys() == theirs.keys()
        assert all(torch.equal(ours.tensors()[key], theirs[key]) for key in theirs), step
    assert not torch.equal(ours.tensors()["1.running_mean"], model[1].running_mean)


def test_frozen_weights_are_not_copied_and_equal_timms_average_of_them():
    """A frozen parameter (LoRA's base, a locked tower) is its own average: the EMA holds no copy of it, and what
    it holds still equals timm's EMA of the whole model."""
    model = small_model()
    model[0].weight.requires_grad_(False)
    ours = WeightsEma(model, EmaOptions(ema_decay=0.9), sharded=False)
    timm = ModelEmaV3(model, decay=0.9, use_warmup=True)
    for step in range(1, 4):
        train_a_little(model, step)
        ours.update(step)
        timm.update(model, step=step)
    theirs = timm.module.state_dict()
    assert set(theirs) - set(ours.tensors()) == {"0.weight"}
    assert torch.equal(theirs["0.weight"], model[0].weight)  # timm's copy of it is the weight itself
    assert all(torch.equal(value, theirs[key]) for key, value in ours.tensors().items())


def test_ema_on_the_cpu_and_in_place_of_the_weights():
    model = small_model()
    ema = WeightsEma(model, EmaOptions(ema_decay=0.5, ema_device="cpu"), sharded=False)
    train_a_little(model, 1)
    ema.update(2)  # decay 1 - 2^(-2/3): a mix of the old and new weights
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with ema.in_place_of(model):
        assert all(torch.equal(model.state_dict()[key], value) for key, value in ema.tensors().items())
        assert not torch.equal(model[0].weight, before["0.weight"])
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    assert {value.device.type for value in ema.tensors().values()} == {"cpu"}


def test_cpu_ema_is_refused_under_fsdp():
    with pytest.raises(UsageError, match="--ema-device cpu under FSDP"):
        WeightsEma(small_model(), EmaOptions(ema_decay=0.9, ema_device="cpu"), sharded=True)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "nan"])
def test_decay_outside_the_open_unit_interval_is_one_line(value):
    with pytest.raises(UsageError, match="--ema-decay"):
        parse_train_config(["--train-data", "x.csv", "--ema-decay", value])


def test_settings_recorded():
    assert EmaOptions().settings() == {}
    assert EmaOptions(ema_decay=0.99, ema_warmup=False).settings() == {"decay": 0.99, "warmup": False}


def test_resume_decision(caplog):
    ema = {"decay": 0.99, "warmup": True}
    with caplog.at_level(logging.WARNING):
        assert resume_decision(ema, ema, "c") and not caplog.records
        assert not resume_decision({}, ema, "c") and "starts from its weights" in caplog.records[-1].message
        assert not resume_decision(ema, {}, "c") and "not kept" in caplog.records[-1].message
        assert resume_decision(ema, {**ema, "decay": 0.9}, "c") and "goes on with them" in caplog.records[-1].message
        assert not resume_decision({}, {}, "c") and len(caplog.records) == 3

"""runtime/parallel.py's FSDP pieces that need no process group: which modules become FSDP units, the
optimizer's switch to new parameters, the 0-d parameters held as vectors, the launch config's plugin,
and the functions that must keep their one-process meaning (full weights, optimizer state, the finite
check, evaluation's `gathered`). Sharded training itself: tests/integration/test_fsdp.py."""

from __future__ import annotations

import pytest
import torch

from acc_clip.errors import AccClipError
from acc_clip.runtime import parallel
from helpers import REPO, TINY_RN, TINY_VIT


def tiny(name: str, **kwargs) -> torch.nn.Module:
    import open_clip

    return open_clip.create_model(name, **kwargs)


def test_units_are_each_block_each_resnet_stage_then_each_tower():
    from open_clip.transformer import ResidualAttentionBlock

    vit = tiny(TINY_VIT)
    units = parallel.shard_units(vit)
    assert units[-1] is vit.visual and all(isinstance(u, ResidualAttentionBlock) for u in units[:-1])
    assert len(units[:-1]) == len(vit.visual.transformer.resblocks) + len(vit.transformer.resblocks) == 4

    rn = tiny(TINY_RN)
    units = parallel.shard_units(rn)
    stages = [rn.visual.layer1, rn.visual.layer2, rn.visual.layer3, rn.visual.layer4]
    assert units[:4] == stages and units[-1] is rn.visual
    assert units[4:-1] == list(rn.transformer.resblocks)


def test_units_come_before_the_modules_that_hold_them():
    """fully_shard must see children before parents."""
    units = parallel.shard_units(tiny(TINY_VIT))
    for index, unit in enumerate(units):
        inside = set(unit.modules())
        assert not any(later in inside for later in units[index + 1 :]), index


def test_scalars_become_one_element_vectors_with_value_and_grad_flag():
    model = tiny(TINY_VIT, init_logit_bias=-10.0)
    model.logit_bias.requires_grad_(False)
    scale, bias = float(model.logit_scale.detach()), float(model.logit_bias)
    parallel.scalars_as_vectors(model)
    assert model.logit_scale.shape == model.logit_bias.shape == (1,)
    assert (float(model.logit_scale.detach()), float(model.logit_bias)) == (scale, bias)
    assert model.logit_scale.requires_grad and not model.logit_bias.requires_grad
    parallel.scalars_as_vectors(model)  # again: nothing left to change
    assert model.logit_scale.shape == (1,)


def test_optimizer_follows_the_new_parameters_by_name():
    model = tiny(TINY_VIT)
    optimizer = torch.optim.SGD([{"params": [model.logit_scale]}, {"params": list(model.visual.parameters())}], lr=1)
    names = {id(p): n for n, p in model.named_parameters()}
    parallel.scalars_as_vectors(model)
    parallel.switch_optimizer_parameters(optimizer, names, dict(model.named_parameters()))
    assert optimizer.param_groups[0]["params"] == [model.logit_scale]
    assert optimizer.param_groups[1]["params"] == list(model.visual.parameters())


def test_contiguous_parameters_undo_channels_last():
    model = tiny(TINY_RN).to(memory_format=torch.channels_last)
    assert not all(p.is_contiguous() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    parameters = list(model.parameters())
    parallel.contiguous_parameters(model)
    assert all(p.is_contiguous() for p in model.parameters()) and list(model.parameters()) == parameters
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_plugin_comes_from_the_launch_config_and_only_fsdp2(monkeypatch):
    monkeypatch.delenv(parallel.FSDP_VARIABLE, raising=False)
    assert parallel.fsdp_plugin() is None
    monkeypatch.setenv(parallel.FSDP_VARIABLE, "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert parallel.fsdp_plugin().fsdp_version == 2
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    with pytest.raises(AccClipError, match="fsdp_state_dict_type FULL_STATE_DICT: acc_clip's step checkpoints"):
        parallel.fsdp_plugin()
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(AccClipError, match="fsdp_version 1: acc_clip supports FSDP2 only"):
        parallel.fsdp_plugin()


def test_launch_configs_ask_for_fsdp2():
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("fsdp", "cpu_2proc_fsdp"):
        config = load_config_from_file(str(REPO / "launch" / f"{name}.yaml"))
        assert config.distributed_type.value == "FSDP" and config.fsdp_config["fsdp_version"] == 2, name
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


def test_without_fsdp_the_functions_keep_their_one_process_meaning(accelerator):
    model = tiny(TINY_VIT)
    optimizer = torch.optim.AdamW(model.parameters())
    image_features, text_features, scale = model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 32, dtype=torch.long))
    (image_features.sum() + text_features.sum() + scale).backward()
    optimizer.step()
    assert not parallel.enable_fsdp_on_cpu(accelerator, None) and not parallel.is_fsdp(accelerator)
    assert parallel.full_optimizer_state_dict(model, optimizer, True) == optimizer.state_dict()
    assert parallel.full_state_dict(model).keys() == model.state_dict().keys()
    assert parallel.logit_scale(model).shape == () and parallel.weights_are_finite(model, accelerator)
    with parallel.gathered(model) as plain:
        assert plain is model
    with torch.no_grad():
        model.visual.proj[0, 0] = float("inf")
    assert not parallel.weights_are_finite(model, accelerator)


def test_fsdp_refuses_what_it_cannot_do_in_one_line(accelerator):
    model = tiny(TINY_VIT)
    with pytest.raises(AccClipError, match="--use-bn-sync"):
        parallel.check_fsdp_options(accelerator, sync_batch_norm=True, model=model)
    with pytest.raises(AccClipError, match="--precision"):
        parallel.check_fsdp_options(accelerator, sync_batch_norm=False, model=model.half())

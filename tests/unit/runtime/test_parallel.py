"""runtime/parallel.py's FSDP pieces that need no process group: which modules become FSDP units, the
optimizer's switch to new parameters, the 0-d parameters held as vectors, the launch config's plugin,
and the functions that must keep their one-process meaning (full weights, optimizer state, the finite
check, evaluation's `gathered`). Sharded training itself: tests/integration/test_fsdp.py."""

from __future__ import annotations

import os

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


# --fsdp: the launch config's fsdp section, from flags --------------------------------------------------

# What the plugins are compared on: everything FSDP2 and acc_clip read from them.
PLUGIN_FIELDS = ("fsdp_version", "reshard_after_forward", "auto_wrap_policy", "activation_checkpointing")


def launcher_variables(config: str) -> dict[str, str]:
    """The FSDP variables `accelerate launch --config_file launch/CONFIG` hands its processes, from
    Accelerate's own launcher code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "launch" / config), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return {
        k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith("FSDP_") or k == parallel.FSDP_VARIABLE
    }


@pytest.fixture
def no_fsdp_environment(monkeypatch):
    """No FSDP variable set, and whatever a test sets (fsdp_plugin writes os.environ) removed after it."""
    for key in [*parallel.FsdpFlags().variables(), "LOCAL_RANK", "RANK"]:
        monkeypatch.setenv(key, "")  # recorded, so the variable is put back as it was afterwards
        monkeypatch.delenv(key)
    return monkeypatch


def plugin_state(plugin) -> dict:
    kind = getattr(plugin.state_dict_type, "name", plugin.state_dict_type)
    return {
        **{name: getattr(plugin, name) for name in PLUGIN_FIELDS},
        "state_dict_type": kind,
        "offloads": parallel.offloads(plugin),
    }


@pytest.mark.parametrize("config", ["cpu_2proc_fsdp.yaml", "fsdp.yaml"])
def test_fsdp_flag_sets_what_the_fsdp_launch_config_sets(config, no_fsdp_environment):
    """--fsdp without a launch config sets the variables `accelerate launch` sets for the FSDP launch configs,
    and so builds the same plugin (FSDP2, reshard after forward, no offload, SHARDED_STATE_DICT, NO_WRAP)."""
    launched = launcher_variables(config)
    assert parallel.FsdpFlags().variables() == launched
    from_flags = plugin_state(parallel.fsdp_plugin(flags=parallel.FsdpFlags()))
    for key, value in launched.items():
        no_fsdp_environment.setenv(key, value)
    from_config = plugin_state(parallel.fsdp_plugin())
    assert from_flags == from_config
    assert from_flags == {
        "fsdp_version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": None,
        "activation_checkpointing": False,
        "state_dict_type": "SHARDED_STATE_DICT",
        "offloads": False,
    }


def test_fsdp_flags_reach_the_plugin_and_every_unit(no_fsdp_environment):
    plugin = parallel.fsdp_plugin(flags=parallel.FsdpFlags(reshard_after_forward=False, offload_cpu=True))
    assert not plugin.reshard_after_forward and parallel.offloads(plugin)
    kwargs = parallel.fully_shard_kwargs(plugin)
    assert kwargs["reshard_after_forward"] is False and kwargs["offload_policy"] is plugin.cpu_offload
    assert os.environ["FSDP_OFFLOAD_PARAMS"] == "true"  # Accelerate reads it too (a gloo group beside nccl)


def test_fsdp_flag_and_an_fsdp_launch_config_must_agree(no_fsdp_environment):
    for key, value in launcher_variables("cpu_2proc_fsdp.yaml").items():
        no_fsdp_environment.setenv(key, value)
    assert parallel.fsdp_plugin(flags=parallel.FsdpFlags()).reshard_after_forward  # they agree
    with pytest.raises(AccClipError) as error:
        parallel.fsdp_plugin(flags=parallel.FsdpFlags(reshard_after_forward=False))
    assert str(error.value) == (
        "--fsdp with --fsdp-no-reshard-after-forward, but the launch config's fsdp_config has "
        "fsdp_reshard_after_forward: true; make them agree, or drop --fsdp (the launch config alone) or the "
        "config's fsdp section (the flags alone)"
    )
    with pytest.raises(AccClipError, match=r"--fsdp with --fsdp-offload-cpu, but .* fsdp_offload_params: false"):
        parallel.fsdp_plugin(flags=parallel.FsdpFlags(offload_cpu=True))
    assert os.environ["FSDP_RESHARD_AFTER_FORWARD"] == "true"  # the launch config's, never rewritten


def test_fsdp_flag_in_a_process_no_launcher_started_makes_a_group_of_one():
    alone: dict[str, str] = {}
    assert parallel.one_process_group(alone)
    assert alone == {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    launched = {"LOCAL_RANK": "1", "RANK": "3"}
    assert not parallel.one_process_group(launched) and launched == {"LOCAL_RANK": "1", "RANK": "3"}


def test_torchcompile_arguments_pass_through_as_given():
    assert parallel.TorchCompile().kwargs == {}  # torch's defaults: inductor, its default mode
    compiling = parallel.TorchCompile("step", "max-autotune", "aot_eager")
    assert compiling.kwargs == {"mode": "max-autotune", "backend": "aot_eager"}
    assert compiling.describe() == "strategy step, backend aot_eager, mode max-autotune"


def test_blocks_and_stages_are_what_fsdp_compiles():
    """Under FSDP every block and ResNet stage is compiled before fully_shard; the towers are units too,
    but their own layers stay eager (compiling them would wrap the compiled blocks again)."""
    rn = tiny(TINY_RN)
    blocks = parallel.block_units(rn)
    assert parallel.shard_units(rn) == [*blocks, rn.visual] and rn.visual.layer4 in blocks


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

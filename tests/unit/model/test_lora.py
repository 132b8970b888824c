"""LoRA (acc_clip/model/lora.py): only the adapters train, the frozen weights stay bit-equal through a step,
gradients reach every adapter, the merge gives peft's own merge and the adapted model's features in a plain
open_clip model, and the combinations that cannot work are one line each."""

from __future__ import annotations

import copy
import sys

import open_clip
import pytest
import torch

from acc_clip.errors import UsageError
from acc_clip.model.flops import count_train_flops
from acc_clip.model.lora import apply_lora, is_adapter, lora_record, merge_lora
from acc_clip.train.config import parse_train_config
from helpers import TINY_COCA, TINY_RN, TINY_VIT

RANK = 4


def lora_options(*flags: str, model: str = TINY_VIT):
    return parse_train_config(["--train-data", "x.csv", "--model", model, "--lora-rank", str(RANK), *flags])[0].lora


def adapted(*flags: str, model: str = TINY_VIT, seed: int = 0) -> torch.nn.Module:
    """TINY_VIT (seed 0) with adapters whose B is random (peft starts B at zero: no update to see)."""
    torch.manual_seed(seed)
    net = open_clip.create_model(model)
    apply_lora(net, lora_options(*flags, model=model), fsdp=False)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.05)
    return net.eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 32, 32, generator=generator), torch.randint(1, 49407, (3, 32), generator=generator)


def expected_adapter_count(width: int, blocks: int, targets: tuple[str, ...]) -> int:
    """r x (in + out) per adapted weight: attention's packed (3w x w), the MLP's c_fc (4w x w) and c_proj (w x 4w)."""
    per_block = (RANK * (width + 3 * width) if "attn" in targets else 0) + (
        2 * RANK * (width + 4 * width) if "mlp" in targets else 0
    )
    return per_block * blocks


@pytest.mark.parametrize(
    "flags, towers, targets",
    [
        ((), ("image", "text"), ("attn", "mlp")),
        (("--lora-towers", "text", "--lora-targets", "mlp"), ("text",), ("mlp",)),
        (("--lora-towers", "image", "--lora-targets", "attn"), ("image",), ("attn",)),
    ],
)
def test_only_the_adapters_train(flags, towers, targets):
    net = adapted(*flags)
    trainable = {name: p.numel() for name, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(name) for name in trainable)
    # TINY_VIT: two blocks of width 64 in each tower
    assert sum(trainable.values()) == expected_adapter_count(64, 2 * len(towers), targets)
    assert all(name.startswith("visual.") == (towers == ("image",)) for name in trainable) or len(towers) == 2


@pytest.mark.parametrize("model, options", [(TINY_COCA, {}), (TINY_VIT, {"force_custom_text": True})])
def test_text_towers_of_coca_and_custom_text_models_adapt(model, options):
    """CustomTextCLIP and CoCa hold their text tower as `text`; CoCa's caption decoder stays frozen."""
    net = open_clip.create_model(model, **options)
    apply_lora(net, lora_options(model=model), fsdp=False)
    adapted_towers = {name.split(".")[0] for name, p in net.named_parameters() if p.requires_grad}
    assert adapted_towers == {"text", "visual"}
    assert not any(p.requires_grad for p in getattr(net, "text_decoder", torch.nn.Identity()).parameters())


def test_train_logit_scale_unfreezes_the_temperature_only():
    net = adapted("--lora-train-logit-scale")
    extra = [name for name, p in net.named_parameters() if p.requires_grad and not is_adapter(name)]
    assert extra == ["logit_scale"]


def test_a_step_reaches_every_adapter_and_leaves_the_base_bit_equal():
    net = adapted()
    base = {name: p.detach().clone() for name, p in net.named_parameters() if not p.requires_grad}
    images, texts = inputs()
    image_features, text_features, _ = net(images, texts)
    (image_features @ text_features.T).sum().backward()
    grads = {name: p.grad for name, p in net.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    after = dict(net.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in base.items())
    assert all(after[name].grad is None for name in base)


def test_grad_checkpointing_keeps_the_adapters_gradients():
    """--grad-checkpointing (open_clip's non-reentrant checkpoint): the recomputed blocks reach the adapters alike."""
    plain, checkpointed = adapted(), adapted()
    checkpointed.set_grad_checkpointing()
    for net in (plain, checkpointed):
        net.train()
        image_features, text_features, _ = net(*inputs())
        (image_features @ text_features.T).sum().backward()
    grads = [{n: p.grad for n, p in net.named_parameters() if p.requires_grad} for net in (plain, checkpointed)]
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_merge_gives_the_adapted_models_features_in_plain_open_clip():
    net = adapted()
    merged = merge_lora(net.state_dict(), lora_record(lora_options()))
    plain = open_clip.create_model(TINY_VIT).eval()
    plain.load_state_dict(merged)  # strict: exactly open_clip's names
    images, texts = inputs()
    with torch.no_grad():
        for ours, theirs in zip(net(images, texts)[:2], plain(images, texts)[:2]):
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
        # the merge is not a no-op: without the adapters the features differ
        unadapted = open_clip.create_model(TINY_VIT).eval()
        unadapted.load_state_dict(merge_lora(net.state_dict(), {**lora_record(lora_options()), "alpha": 0.0}))
        assert (unadapted(images, texts)[0] - net(images, texts)[0]).abs().max() > 1e-3


def test_merge_equals_peft_merge():
    """peft's own merge (each adapted layer's merge(), then its base layer put back) on the same model."""
    net = adapted("--lora-alpha", "6")
    ours = merge_lora(net.state_dict(), lora_record(lora_options("--lora-alpha", "6")))
    theirs_model = copy.deepcopy(net)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(theirs_model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(theirs_model.get_submodule(parent), child, module.get_base_layer())
    theirs = theirs_model.state_dict()
    assert sorted(ours) == sorted(theirs) == sorted(open_clip.create_model(TINY_VIT).state_dict())
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-7, rtol=0, msg=key)


def test_lora_on_out_proj_as_a_linear_layer_is_bypassed():
    """Why the attention's output projection is not adapted: nn.MultiheadAttention reads out_proj.weight itself,
    so a peft LoRA layer there (random, non-zero adapters) never runs: same features, no path to the adapters."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    plain = open_clip.create_model(TINY_VIT).eval()
    net = copy.deepcopy(plain)
    inject_adapter_in_model(LoraConfig(r=RANK, target_modules=["out_proj"], init_lora_weights=False), net)
    assert sum(".out_proj.lora_B." in name for name, _ in net.named_parameters()) == 4  # 2 blocks x 2 towers
    images, texts = inputs()
    features = net(images, texts)[0]
    assert not features.requires_grad  # only the adapters require grad, and nothing reaches them
    torch.testing.assert_close(features, plain(images, texts)[0].detach(), atol=1e-6, rtol=0)


def test_a_resnet_image_tower_is_refused_and_its_text_tower_adapts():
    torch.manual_seed(0)
    with pytest.raises(UsageError, match=r"--lora-towers image: the image tower \(ModifiedResNet\)"):
        apply_lora(open_clip.create_model(TINY_RN), lora_options(model=TINY_RN), fsdp=False)
    net = open_clip.create_model(TINY_RN)
    apply_lora(net, lora_options("--lora-towers", "text", model=TINY_RN), fsdp=False)
    assert {name.split(".")[0] for name, p in net.named_parameters() if p.requires_grad} == {"transformer"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lock-image"], "--lora-rank with --lock-image"),
        (["--lock-text"], "--lora-rank with --lock-text"),
        (["--torchcompile"], "--lora-rank with --torchcompile"),
        (["--lora-dropout", "0.1"], "--lora-dropout 0.1 with --lora-targets attn,mlp"),
        (["--lora-towers", "image,audio"], "--lora-towers 'image,audio': must be comma-separated"),
        (["--lora-targets", "qkv"], "--lora-targets 'qkv': must be comma-separated"),
        (["--lora-alpha", "0"], "--lora-alpha 0.0: must be a finite number above 0"),
    ],
)
def test_combinations_that_cannot_work_are_one_line(flags, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as error:
        parse_train_config(["--train-data", "x.csv", "--model", TINY_VIT, "--lora-rank", "4", *flags])
    assert "\n" not in str(error.value)


def test_dropout_on_the_mlp_alone_is_accepted_and_fsdp_refused():
    options = lora_options("--lora-dropout", "0.1", "--lora-targets", "mlp")
    net = open_clip.create_model(TINY_VIT)
    with pytest.raises(UsageError, match="--lora-rank under FSDP: not supported"):
        apply_lora(net, options, fsdp=True)
    apply_lora(net, options, fsdp=False)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in net.modules())


def test_without_peft_installed_the_run_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft then raises ImportError
    with pytest.raises(UsageError, match=r"--lora-rank needs the peft package: pip install 'acc_clip\[lora\]'"):
        apply_lora(open_clip.create_model(TINY_VIT), lora_options(), fsdp=False)


def test_the_flop_count_leaves_the_adapted_model_whole():
    """count_train_flops swaps the weights for meta stand-ins (functional_call): on the adapted model itself that
    turned peft's parametrized attention weight into a buffer (so the processes' DDP buffer lists differed); it
    counts a parametrized model on a storage-free copy."""
    net = adapted()
    layout = [(name, p.shape, p.requires_grad) for name, p in net.named_parameters()], list(net.named_buffers())
    lora_count = count_train_flops(net, image_size=(32, 32), context_length=32)
    assert [(name, p.shape, p.requires_grad) for name, p in net.named_parameters()] == layout[0]
    assert [name for name, _ in net.named_buffers()] == [name for name, _ in layout[1]] == ["attn_mask"]
    assert all(p.device.type == "cpu" for p in net.parameters())
    full = count_train_flops(open_clip.create_model(TINY_VIT), image_size=(32, 32), context_length=32)
    assert lora_count.forward > full.forward and lora_count.backward < full.backward  # no base weight gradients


def test_without_lora_nothing_changes():
    options = parse_train_config(["--train-data", "x.csv", "--model", TINY_VIT])[0].lora
    net = open_clip.create_model(TINY_VIT)
    names = list(net.state_dict())
    apply_lora(net, options, fsdp=False)
    assert list(net.state_dict()) == names and all(p.requires_grad for p in net.parameters())
    assert lora_record(options) == {}
    state = net.state_dict()
    assert merge_lora(state, {}) is state


def test_a_rank_above_the_narrowest_adapted_layer_is_one_line():
    """TINY_VIT's towers are 64 wide: rank 64 is the most; a huge rank used to fail deep in torch (overflow)."""
    options = parse_train_config(["--train-data", "x.csv", "--model", TINY_VIT, "--lora-rank", "65"])[0].lora
    with pytest.raises(UsageError, match=r"^--lora-rank 65: above the image tower's narrowest .*at most 64$"):
        apply_lora(open_clip.create_model(TINY_VIT), options, fsdp=False)
    options.lora_rank = 10**20
    with pytest.raises(UsageError, match=r"^--lora-rank 100000000000000000000: "):
        apply_lora(open_clip.create_model(TINY_VIT), options, fsdp=False)
    options.lora_rank = 64
    apply_lora(open_clip.create_model(TINY_VIT), options, fsdp=False)

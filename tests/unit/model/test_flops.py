"""FLOPs per sample (acc_clip.model.flops): the count against independent ones (an analytic formula for a
ViT CLIP, forward hooks for a ResNet CLIP), the backward's share and locked towers, and that counting leaves
the real model exactly as it was (the trainer's results are compared bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from acc_clip.model.flops import FlopCount, count_train_flops, describe
from helpers import TINY_COCA, TINY_RN, TINY_VIT

LOCAL_DIR = "local-dir:"


def config_of(name: str) -> dict:
    return json.loads((Path(name[len(LOCAL_DIR) :]) / "open_clip_config.json").read_text())["model_cfg"]


def tiny(name: str, **kwargs) -> torch.nn.Module:
    return open_clip.create_model(name, output_dict=True, **kwargs)


def count(model: torch.nn.Module, name: str, batch: int = 2) -> FlopCount:
    config = config_of(name)
    return count_train_flops(
        model,
        image_size=config["vision_cfg"]["image_size"],
        context_length=config["text_cfg"]["context_length"],
        batch=batch,
    )


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    """Per sample: each layer's q, k, v and output projections (4 products width x width per token), the
    attention scores q k^T and the weighted sum of v (2 of tokens x tokens x width; the number of heads
    splits them, not their size), and the MLP (width -> mlp_ratio * width -> width). 2 FLOPs a multiply-add."""
    multiply_adds = tokens * width * width * (4 + 2 * mlp_ratio) + 2 * tokens * tokens * width
    return 2 * layers * multiply_adds


def text_tower_flops(config: dict) -> float:
    """The text transformer over the whole context, and the projection of its pooled token."""
    text = config["text_cfg"]
    tokens, width = text["context_length"], text["width"]
    return (
        transformer_flops(tokens, width, text["layers"], text.get("mlp_ratio", 4.0)) + 2 * width * config["embed_dim"]
    )


def vit_clip_forward_flops(config: dict) -> float:
    """A ViT CLIP's forward per sample, from its config: the patch embedding (a convolution of stride
    patch: each patch a product of 3 * patch^2 by width), the transformer over the patches and the class
    token, the projection of the pooled token; the text tower."""
    vision = config["vision_cfg"]
    patch, width = vision["patch_size"], vision["width"]
    patches = (vision["image_size"] // patch) ** 2
    image = (
        2 * patches * 3 * patch * patch * width
        + transformer_flops(patches + 1, width, vision["layers"], vision.get("mlp_ratio", 4.0))
        + 2 * width * config["embed_dim"]
    )
    return image + text_tower_flops(config)


def test_vit_forward_matches_the_analytic_count():
    counted = count(tiny(TINY_VIT), TINY_VIT)
    assert counted.forward == pytest.approx(vit_clip_forward_flops(config_of(TINY_VIT)), rel=0.05)


def hooked_forward_flops(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> float:
    """A ResNet CLIP's forward per sample counted independently: a real forward with hooks on every module
    that multiplies (convolutions, linear layers, attention), each counted from its own shapes, plus the
    text projection (a matrix, no module) of the pooled token."""
    total = 0.0

    def conv(module, inputs, output):
        out_channels, in_per_group, kh, kw = module.weight.shape  # in_per_group: in_channels / groups
        return 2 * out_channels * in_per_group * kh * kw * output.shape[-2] * output.shape[-1]

    def linear(module, inputs, output):
        return 2 * module.in_features * module.out_features * inputs[0].numel() // inputs[0].shape[-1] / len(images)

    def attention(module, inputs, output):  # nn.MultiheadAttention, batch first; its projections are no modules
        tokens, width = inputs[0].shape[1], inputs[0].shape[2]
        return 2 * (4 * tokens * width * width + 2 * tokens * tokens * width)

    def attention_pool(module, inputs, output):  # the mean token and the H x W grid, projected to output_dim
        width, tokens = inputs[0].shape[1], inputs[0].shape[2] * inputs[0].shape[3] + 1
        out = module.c_proj.out_features
        return 2 * (3 * tokens * width * width + 2 * tokens * tokens * width + tokens * width * out)

    rules = {
        torch.nn.Conv2d: conv,
        torch.nn.Linear: linear,
        torch.nn.MultiheadAttention: attention,
        open_clip.modified_resnet.AttentionPool2d: attention_pool,
    }

    def hook(rule):
        def add(module, inputs, output):
            nonlocal total
            total += rule(module, inputs, output)

        return add

    handles = [
        module.register_forward_hook(hook(rule))
        for module in model.modules()
        for kind, rule in rules.items()
        if type(module) is kind
    ]
    with torch.no_grad():
        model(images, texts)
    for handle in handles:
        handle.remove()
    return total + 2 * model.text_projection.shape[0] * model.text_projection.shape[1]


def test_resnet_forward_matches_a_count_by_hooks():
    """Exact on the tiny ResNet CLIP (FlopCounterMode counts convolutions, matrix products and attention,
    which is all the multiplying there is); 1% allowed for rounding in other torch versions."""
    config = config_of(TINY_RN)
    model = tiny(TINY_RN)
    size, context = config["vision_cfg"]["image_size"], config["text_cfg"]["context_length"]
    images = torch.randn(2, 3, size, size)
    texts = torch.randint(0, config["text_cfg"]["vocab_size"], (2, context))
    assert count(model, TINY_RN).forward == pytest.approx(hooked_forward_flops(model, images, texts), rel=0.01)


@pytest.mark.parametrize("name", [TINY_VIT, TINY_RN, TINY_COCA])
def test_backward_is_about_twice_the_forward(name):
    """Each product has two in the backward (the input's gradient and the weight's) but the first layer's,
    whose input (the images) needs no gradient."""
    counted = count(tiny(name), name)
    assert 1.5 * counted.forward <= counted.backward <= 2.1 * counted.forward
    assert counted.total == counted.forward + counted.backward


def test_a_locked_image_tower_takes_no_backward():
    """--lock-image: the image tower's weights get no gradient, and nothing before them needs one, so the
    backward is the text tower's alone: twice its forward (its first layer, the token embedding, is no
    product). The forward is the same."""
    config = config_of(TINY_VIT)
    unlocked = count(tiny(TINY_VIT), TINY_VIT)
    model = tiny(TINY_VIT)
    model.lock_image_tower()
    locked = count(model, TINY_VIT)
    assert locked.forward == unlocked.forward
    assert locked.backward == pytest.approx(2 * text_tower_flops(config), rel=0.01)
    assert locked.backward < 0.7 * unlocked.backward
    assert not any(p.requires_grad for p in model.visual.parameters())  # the model's flags are kept

    model.lock_text_tower()
    model.logit_scale.requires_grad_(False)
    assert count(model, TINY_VIT).backward == 0  # nothing to train: no backward


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
        "grads": {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "grad_checkpointing": [getattr(m, "grad_checkpointing", None) for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_same(before: dict, after: dict) -> None:
    for part in ("parameters", "buffers", "grads"):
        assert before[part].keys() == after[part].keys()
        for name, tensor in before[part].items():
            other = after[part][name]
            assert (tensor is None) == (other is None) and (tensor is None or torch.equal(tensor, other)), (
                f"{part} {name} changed"
            )
    for part in ("requires_grad", "training", "grad_checkpointing"):
        assert before[part] == after[part], part
    assert torch.equal(before["rng"], after["rng"]), "the RNG state moved"


@pytest.mark.parametrize(
    "name, options",
    [
        (TINY_RN, {}),  # batch norm in training mode: a forward on the real model moves its running statistics
        (TINY_VIT, {"force_patch_dropout": 0.5}),  # patch dropout draws from the CPU generator
    ],
)
def test_counting_leaves_the_model_as_it_was(name, options):
    model = tiny(name, **options).train()
    model.lock_text_tower()  # some weights frozen: their flags must stay so
    model.set_grad_checkpointing(True)
    for index, parameter in enumerate(p for p in model.parameters() if p.requires_grad):
        if index % 2:  # half with a gradient (left from a step), half without
            parameter.grad = torch.randn_like(parameter)
    torch.manual_seed(1)
    before = snapshot(model)
    counted = count(model, name)
    assert counted.forward > 0 and counted.backward > 0
    assert_same(before, snapshot(model))


def test_grad_checkpointing_is_not_counted():
    """--grad-checkpointing recomputes blocks in the backward: no model FLOPs, so the count is the same."""
    plain = count(tiny(TINY_VIT), TINY_VIT)
    model = tiny(TINY_VIT)
    model.set_grad_checkpointing(True)
    assert count(model, TINY_VIT) == plain


def test_tuple_and_dict_outputs_count_the_same():
    torch.manual_seed(0)
    as_dict = count(tiny(TINY_VIT), TINY_VIT)
    as_tuple = count(open_clip.create_model(TINY_VIT, output_dict=False), TINY_VIT)
    assert as_tuple == as_dict


def test_coca_counts_its_caption_decoder():
    """CoCa's forward takes the texts to its decoder too: the vocabulary projection of every position but the
    last alone is 2 x (context - 1) x width x vocabulary per sample."""
    config = config_of(TINY_COCA)
    decoder = config["multimodal_cfg"]
    vocabulary_projection = 2 * (decoder["context_length"] - 1) * decoder["width"] * decoder["vocab_size"]
    counted = count(tiny(TINY_COCA), TINY_COCA)
    assert counted.forward > vocabulary_projection


class GroupedConvolutions(torch.nn.Module):
    """A stand-in CLIP: an ordinary convolution, then a depthwise one (groups = channels), as ConvNeXt has."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.dense = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, images, texts):
        return {"image_features": self.depthwise(self.dense(images)).mean((2, 3)), "labels": texts}


def test_depthwise_convolution_backward_is_twice_its_forward():
    """torch 2.14's counter leaves the groups out of the weight's gradient (depthwise: `groups` times too
    many); acc_clip counts both gradients as the forward's size. The first convolution's input needs no
    gradient: its backward is its forward once."""
    model = GroupedConvolutions()
    counted = count_train_flops(model, image_size=16, context_length=4, batch=2)
    dense, depthwise = 2 * 8 * 3 * 9 * 16 * 16, 2 * 8 * 1 * 9 * 16 * 16
    assert counted.forward == dense + depthwise
    assert counted.backward == dense + 2 * depthwise


class PlainTensorAttribute(torch.nn.Module):
    """A tensor held as a plain attribute, neither parameter nor buffer: it stays on its device."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.offset = torch.ones(4)

    def forward(self, images, texts):
        return self.linear(images.flatten(1)[:, :4]) + self.offset


def test_bad_input_is_one_line():
    model = tiny(TINY_VIT)
    for options, message in [
        ({"image_size": 0, "context_length": 32}, "image_size 0: expected a positive int or"),
        ({"image_size": (32,), "context_length": 32}, r"image_size \(32,\)"),
        ({"image_size": 32, "context_length": 0}, "context_length 0: expected at least 1 token"),
        ({"image_size": 32, "context_length": 32, "batch": 0}, "batch 0: expected at least 1 sample"),
    ]:
        with pytest.raises(ValueError, match=message):
            count_train_flops(model, **options)
    with pytest.raises(RuntimeError, match="FLOPs of PlainTensorAttribute on the meta device failed: ") as error:
        count_train_flops(PlainTensorAttribute(), image_size=4, context_length=4)
    assert "\n" not in str(error.value)


def test_describe():
    assert describe(FlopCount(18.2e9, 36.3e9)) == "54.5 GFLOP per sample (forward 18.2, backward 36.3)"
    assert describe(FlopCount(0.0107e9, 0.0214e9)) == "0.0321 GFLOP per sample (forward 0.0107, backward 0.0214)"

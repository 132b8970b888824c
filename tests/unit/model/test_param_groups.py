"""The optimizer's groups (acc_clip/model/param_groups.py, model/optim.py) against open_clip main's rule.

open_clip main (4.2.0.dev0, commit 89fb801) is not installable here, so the expected tables below were derived by
hand from its source, each rule citing the file and function it was read from:
- layer ids: each tower's `layer_groups()` lists ordered groups from the input up; a parameter's expected group
  index is written as a regular expression on its full name (with the tower's prefix), and the group count n;
- lr scale: `open_clip_train/optim.py`, `lr_scales_for_groups`: decay ** (n - 1 - index); parameters in no
  group of a decayed tower (and all of an undecayed tower) 1.0 (`layer_decay_param_groups`,
  `param_scale.get(id(p), 1.0)`);
- no weight decay: `open_clip_train/optim.py`, `make_wd_exclude`: ndim <= 1, the exact names each module lists
  in `no_weight_decay()` (prefixed by its path; the lists are those of main's model.py CLIP/CustomTextCLIP,
  transformer.py VisionTransformer and TextTransformer; coca_model.py, modified_resnet.py and the multimodal
  decoder list none), and the --wd-exclude globs (fnmatchcase on the full name);
- groups: keyed by (round(lr_scale, 8), no decay, fallback), sorted by (-lr_scale, group_name) under decay.
The models are built on the meta device (no storage), the expected values computed independently of
acc_clip's code from the tables; the test compares every trainable parameter."""

from __future__ import annotations

import fnmatch
import math
import re

import open_clip
import pytest
import torch

from acc_clip.errors import UsageError
from acc_clip.model.optim import create_lr_schedule, create_optimizer
from acc_clip.model.param_groups import placements, tower_layers
from acc_clip.train.config import parse_train_config
from helpers import TINY_COCA, TINY_RN, TINY_VIT

# main: src/open_clip/transformer.py, VisionTransformer.layer_groups: embeddings (conv1, class_embedding,
# positional_embedding, ln_pre), layer.i = transformer.resblocks.i (the last with ln_post), proj. n = blocks + 2.
VIT = [
    (r"visual\.(conv1\.|class_embedding$|positional_embedding$|ln_pre\.)", lambda m, blocks: 0),
    (r"visual\.transformer\.resblocks\.(\d+)\.", lambda m, blocks: 1 + int(m[1])),
    (r"visual\.ln_post\.", lambda m, blocks: blocks),
    (r"visual\.proj$", lambda m, blocks: blocks + 1),
]
# main: src/open_clip/modified_resnet.py, ModifiedResNet.layer_groups: the stem, layer1..4, attnpool. n = 6.
RESNET = [
    (r"visual\.(conv[123]|bn[123])\.", lambda m, blocks: 0),
    (r"visual\.layer([1-4])\.", lambda m, blocks: int(m[1])),
    (r"visual\.attnpool\.", lambda m, blocks: 5),
]


def text_rules(prefix: str) -> list:
    """main: src/open_clip/transformer.py, _text_layer_groups (TextTransformer.layer_groups, and CLIP's text
    attributes at its top level through open_clip_train/optim.py _text_layer_groups_of): embeddings
    (token_embedding, positional_embedding, cls_emb), layer.i (the last with ln_final), text_projection. n = L + 2."""
    p = re.escape(prefix)
    return [
        (p + r"(token_embedding\.|positional_embedding$|cls_emb$)", lambda m, blocks: 0),
        (p + r"transformer\.resblocks\.(\d+)\.", lambda m, blocks: 1 + int(m[1])),
        (p + r"ln_final\.", lambda m, blocks: blocks),
        (p + r"text_projection(\.|$)", lambda m, blocks: blocks + 1),
    ]


# main: no_weight_decay() of CLIP (model.py): positional_embedding + visual's; VisionTransformer: positional and
# class embeddings; TextTransformer: positional_embedding, cls_emb; ModifiedResNet, CoCa, decoder: none.
NO_WD_NAMES = {
    "clip": {"positional_embedding", "visual.positional_embedding", "visual.class_embedding"},
    "custom": {"visual.positional_embedding", "visual.class_embedding", "text.positional_embedding", "text.cls_emb"},
}


def expected_layer(name: str, rules: list, blocks: int) -> int | None:
    for pattern, index in rules:
        match = re.match(pattern, name)
        if match:
            return index(match, blocks)
    return None


def expected_table(model, *, image=None, text=None, wd=0.2, exclude=(), image_rules=VIT, text_prefix=""):
    """name -> (lr_scale, weight decay) by main's rules, from the tables above."""
    no_wd = NO_WD_NAMES["custom" if text_prefix else "clip"]
    vision_blocks = 4 if image is None or image_rules is RESNET else len(model.visual.transformer.resblocks)
    text_module = model.text if text_prefix else model
    text_blocks = len(text_module.transformer.resblocks)
    table = {}
    for name, p in model.named_parameters():
        scale = 1.0
        if image is not None and (index := expected_layer(name, image_rules, vision_blocks)) is not None:
            scale = image ** (vision_blocks + 1 - index)  # n - 1 - index, n = blocks + 2 (ResNet: 4 + 2)
        if text is not None and (index := expected_layer(name, text_rules(text_prefix), text_blocks)) is not None:
            scale = text ** (text_blocks + 1 - index)
        skip = p.ndim <= 1 or name in no_wd or any(fnmatch.fnmatchcase(name, g) for g in exclude)
        table[name] = (scale, 0.0 if skip else wd)
    return table


def config_for(model: str, *flags: str):
    return parse_train_config(["--train-data", "x.csv", "--model", model, "--no-fused-adamw", *flags])[0]


def meta_model(name: str):
    return open_clip.create_model(name, device="meta")


def acc_clip_table(model, *flags: str) -> tuple[dict, torch.optim.Optimizer]:
    config = config_for("ViT-B-32", *flags)
    optimizer = create_optimizer(model, config.optimizer, "cpu")
    entries = placements(model, optimizer, {})
    return {e.name: (e.lr_scale, e.weight_decay) for e in entries}, optimizer


def assert_tables_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    wrong = {
        n: (got[n], expected[n])
        for n in got
        if not (math.isclose(got[n][0], expected[n][0]) and got[n][1] == expected[n][1])
    }
    assert not wrong, f"{len(wrong)} parameters differ from main's rule, e.g. {list(wrong.items())[:3]}"


def assert_main_grouping(optimizer) -> None:
    """main's buckets: one group per (lr_scale, weight decay), head (largest scale) first."""
    keys = [(round(g["lr_scale"], 8), g["weight_decay"]) for g in optimizer.param_groups]
    assert len(keys) == len(set(keys))
    assert [g["lr_scale"] for g in optimizer.param_groups] == sorted(
        (g["lr_scale"] for g in optimizer.param_groups), reverse=True
    )


GLOBS = ("*.bias", "visual.proj*", "token_*")


@pytest.fixture(scope="module")
def vit_b_32():
    return meta_model("ViT-B-32")


@pytest.mark.parametrize(
    "flags, image, text, exclude",
    [
        (["--image-layer-decay", "0.75"], 0.75, None, ()),
        (["--visual-layer-decay", "0.75", "--text-layer-decay", "0.8"], 0.75, 0.8, ()),
        (["--text-layer-decay", "0.8", "--text-pooler-own-group"], None, 0.8, ()),
        (
            ["--image-layer-decay", "0.6", "--wd-exclude", "*.bias", "visual.proj*", "token_*"],
            0.6,
            None,
            ("*.bias", "visual.proj*", "token_*"),
        ),
        (["--wd-exclude", "visual.conv1.*"], None, None, ("visual.conv1.*",)),
    ],
    ids=["image", "both", "text-pooler-own-group", "image-wd-exclude", "wd-exclude-only"],
)
def test_vit_b_32_groups_are_main_s(vit_b_32, flags, image, text, exclude):
    got, optimizer = acc_clip_table(vit_b_32, *flags)
    assert_tables_equal(got, expected_table(vit_b_32, image=image, text=text, exclude=exclude))
    if image or text:
        assert_main_grouping(optimizer)
    # spot checks read straight from main's layer_groups (12 blocks: n = 14)
    if image == 0.75:
        assert got["visual.proj"][0] == 1.0 and got["visual.conv1.weight"][0] == pytest.approx(0.75**13)
        assert got["visual.ln_post.weight"][0] == got["visual.transformer.resblocks.11.mlp.c_fc.weight"][0] == 0.75
    assert got["logit_scale"] == (1.0, 0.0)


def test_rn50_groups_are_main_s():
    model = meta_model("RN50")
    got, optimizer = acc_clip_table(model, "--image-layer-decay", "0.7", "--text-layer-decay", "0.9")
    assert_tables_equal(got, expected_table(model, image=0.7, text=0.9, image_rules=RESNET))
    assert_main_grouping(optimizer)
    assert got["visual.attnpool.c_proj.weight"][0] == 1.0 and got["visual.bn1.weight"][0] == pytest.approx(0.7**5)


@pytest.mark.parametrize("extra", [[], ["--text-pooler-own-group"], ["--wd-exclude", "text_decoder.*"]])
def test_coca_groups_are_main_s(extra):
    """CoCa: the image and text towers decay; the attention pooler and the multimodal decoder (`text_decoder`,
    in no layer group in main) keep 1.0; the native text tower has no pooler, so --text-pooler-own-group is
    main's no-op."""
    model = meta_model("coca_ViT-B-32")
    got, optimizer = acc_clip_table(model, "--image-layer-decay", "0.75", "--text-layer-decay", "0.8", *extra)
    exclude = tuple(extra[1:]) if extra[:1] == ["--wd-exclude"] else ()
    assert_tables_equal(got, expected_table(model, image=0.75, text=0.8, exclude=exclude, text_prefix="text."))
    assert_main_grouping(optimizer)
    assert got["visual.attn_pool.query"] == (1.0, 0.2) and got["text_decoder.text_projection"][0] == 1.0
    assert got["text.cls_emb"] == (pytest.approx(0.8**13), 0.0)  # 12 blocks: n = 14


@pytest.mark.parametrize(
    "name, image_rules, prefix", [(TINY_VIT, VIT, ""), (TINY_RN, RESNET, ""), (TINY_COCA, VIT, "text.")]
)
def test_tiny_models_groups_are_main_s(name, image_rules, prefix):
    model = open_clip.create_model(name, device="meta")
    flags = ["--image-layer-decay", "0.5", "--text-layer-decay", "0.9", "--wd-exclude", "*ln_*"]
    got, _ = acc_clip_table(model, *flags)
    expected = expected_table(
        model, image=0.5, text=0.9, exclude=("*ln_*",), image_rules=image_rules, text_prefix=prefix
    )
    assert_tables_equal(got, expected)


def test_runs_asking_nothing_new_keep_open_clip_train_3_3_s_rule(vit_b_32):
    """3.3's rule: 2-D embeddings decayed, names holding ln/bn/bias/logit_scale not; two groups, no lr scale."""
    got, optimizer = acc_clip_table(vit_b_32)
    assert len(optimizer.param_groups) == 2 and "lr_scale" not in optimizer.param_groups[0]
    assert got["visual.positional_embedding"] == (1.0, 0.2) and got["visual.class_embedding"] == (1.0, 0.0)
    assert got["positional_embedding"] == (1.0, 0.2)


def test_siglip_timm_tower_follows_timm_s_group_matcher():
    """main's TimmModel.layer_groups: timm's group_matcher layers, then the adapter head (if it has parameters)."""
    from timm.models import group_parameters

    model = meta_model("ViT-B-16-SigLIP")
    got, _ = acc_clip_table(model, "--image-layer-decay", "0.5", "--text-layer-decay", "0.8")
    by_layer = group_parameters(model.visual.trunk, model.visual.trunk.group_matcher())
    n = len(by_layer) + (1 if any(True for _ in model.visual.head.parameters()) else 0)
    for index, layer in enumerate(sorted(by_layer)):
        for name in by_layer[layer]:
            assert got[f"visual.trunk.{name}"][0] == pytest.approx(0.5 ** (n - 1 - index)), name
    # main: TimmModel.no_weight_decay surfaces the trunk's (pos_embed)
    assert got["visual.trunk.pos_embed"][1] == 0.0 and got["text.positional_embedding"][1] == 0.0
    # SigLIP's text tower: last-token pooling, a Linear projection with a bias: the head, at 1.0
    expected = expected_table(model, text=0.8, text_prefix="text.")
    assert {n: v for n, v in got.items() if n.startswith("text.")} == {
        n: (pytest.approx(v[0]), v[1]) for n, v in expected.items() if n.startswith("text.")
    }
    assert got["text.text_projection.weight"][0] == got["text.text_projection.bias"][0] == 1.0


def test_layer_ids_tolerate_parts_a_wrapper_inserts():
    """peft inserts `base_layer.` and `lora_A.default.` below a wrapped module: the layer rule still holds."""

    class Wrapped(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.base_layer = linear
            self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(linear.in_features, 2, bias=False)})

    model = open_clip.create_model(TINY_VIT, device="meta")
    block = model.visual.transformer.resblocks[1]
    block.mlp.c_fc = Wrapped(block.mlp.c_fc)
    layers = tower_layers(model.visual, "visual", 0.5, "--image-layer-decay")
    names = {id(p): n for n, p in model.visual.named_parameters()}
    by_name = {names[k]: v for k, v in layers.items()}
    assert by_name["transformer.resblocks.1.mlp.c_fc.base_layer.weight"].name == "layer.1"
    assert by_name["transformer.resblocks.1.mlp.c_fc.lora_A.default.weight"].index == 2


def test_schedule_scales_each_group():
    """main's assign_learning_rate: lr * lr_scale per group, through the warm-up and the cosine."""
    config = config_for(TINY_VIT, "--lr", "0.01", "--warmup", "2", "--epochs", "1")
    optimizer = torch.optim.SGD(
        [{"params": [torch.zeros(1)], "lr_scale": 1.0}, {"params": [torch.zeros(1)], "lr_scale": 0.25}], lr=1.0
    )
    schedule = create_lr_schedule(optimizer, config.optimizer, epochs=1, steps_per_epoch=10)
    for step in (0, 1, 5):
        lr = schedule(step)
        assert [g["lr"] for g in optimizer.param_groups] == [lr, lr * 0.25]


def test_opt_kwargs_reach_the_optimizer_with_main_s_types():
    model = open_clip.create_model(TINY_VIT)
    config = config_for(TINY_VIT, "--opt-kwargs", "amsgrad=True", "maximize=False", "--image-layer-decay", "0.5")
    assert config.optimizer.opt_kwargs == {"amsgrad": True, "maximize": False}
    optimizer = create_optimizer(model, config.optimizer, "cpu")
    assert all(g["amsgrad"] is True for g in optimizer.param_groups)
    config = config_for(TINY_VIT, "--opt", "timm/sgd", "--lr", "0.1", "--opt-kwargs", "nesterov=False", "dampening=0.5")
    optimizer = create_optimizer(model, config.optimizer, "cpu")
    assert optimizer.param_groups[0]["dampening"] == 0.5
    config = config_for(TINY_VIT, "--opt-kwargs", "bogus=1")
    with pytest.raises(UsageError, match=r"--opt-kwargs bogus=1: .*bogus"):  # one line, naming the flag
        create_optimizer(model, config.optimizer, "cpu")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--opt-fallback-list", "*.bias"], "--opt-fallback-list applies to Muon-family timm optimizers"),
        (["--image-layer-decay", "0"], "--image-layer-decay 0.0: must be within (0, 1]"),
        (["--visual-layer-decay", "1.5"], "--image-layer-decay 1.5: must be within (0, 1]"),
        (["--opt-kwargs", "=1"], "--opt-kwargs"),
        (["--opt-kwargs", "lr=0.1"], "--opt-kwargs lr=...: set it with --lr instead"),  # the schedule's
        (["--opt-kwargs", "weight_decay=0.5"], "--opt-kwargs weight_decay=...: set it with --wd instead"),
        (["--opt-kwargs", "betas=(0.5,0.6)"], "--opt-kwargs betas=...: set it with --beta1 and --beta2 instead"),
        (
            ["--opt", "timm/nadamuon", "--lr", "0.1", "--opt-kwargs", "fallback_list=*.bias"],  # text, not a list
            "--opt-kwargs fallback_list='*.bias': expected a list of globs",  # a string would be globbed by character
        ),
    ],
)
def test_refusals_are_one_line(flags, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        config_for(TINY_VIT, *flags)


def test_values_adamw_refuses_are_one_line():
    """torch raises a RuntimeError for fused with foreach (a ValueError for some values): one line either way."""
    config = config_for(TINY_VIT, "--fused-adamw", "--opt-kwargs", "foreach=True")
    with pytest.raises(UsageError, match=r"^--opt-kwargs foreach=True: `fused` and `foreach` cannot be"):
        create_optimizer(open_clip.create_model(TINY_VIT), config.optimizer, "cpu")


def test_a_value_that_is_no_python_literal_is_text_as_in_open_clip():
    """open_clip's ParseKwargs keeps a non-literal value as text, but raises on a SyntaxError (*.bias)."""
    config = config_for(TINY_VIT, "--opt-kwargs", "name=adam", "glob=*.bias", "pair=(1,2)")
    assert config.optimizer.opt_kwargs == {"name": "adam", "glob": "*.bias", "pair": (1, 2)}


def test_group_identity_sees_only_what_changes_the_groups():
    """A resume compares it: 1.0 is no layer decay, as unset; the order of globs does not matter."""
    identity = [
        config_for(TINY_VIT, *flags).optimizer.group_identity()
        for flags in (
            ["--wd-exclude", "a*", "b*"],
            ["--wd-exclude", "b*", "a*", "--image-layer-decay", "1.0"],
            ["--wd-exclude", "b*", "a*", "--image-layer-decay", "0.9"],
        )
    ]
    assert identity[0] == identity[1] != identity[2]


def test_an_empty_glob_in_yaml_is_refused(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text('train_data: x.csv\nwd_exclude: ["*.bias", ""]\nvisual_layer_decay: 0.5\n')
    with pytest.raises(UsageError, match="--wd-exclude"):
        parse_train_config(["--config", str(config)])
    config.write_text("train_data: x.csv\nvisual_layer_decay: 0.5\n")  # the alias as a YAML key
    assert parse_train_config(["--config", str(config)])[0].optimizer.image_layer_decay == 0.5


def test_fallback_list_routes_matched_parameters_to_muon_s_fallback():
    """main: --opt-fallback-list flags the groups of matched parameters use_fallback (fnmatch on full names), split
    from the others; optimizer settings for the fallback come through --opt-kwargs. timm's nadamuon takes both."""
    model = open_clip.create_model(TINY_VIT)
    flags = ["--opt", "timm/nadamuon", "--lr", "0.01", "--opt-fallback-list", "*embedding*", "visual.conv1.*"]
    config = config_for(TINY_VIT, *flags, "--opt-kwargs", "fallback_lr_scale=0.5")
    optimizer = create_optimizer(model, config.optimizer, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        matched = [
            fnmatch.fnmatchcase(names[id(p)], "*embedding*") or names[id(p)].startswith("visual.conv1.")
            for p in group["params"]
        ]
        assert all(matched) == bool(group.get("use_fallback")) and (all(matched) or not any(matched))
    assert sum(bool(g.get("use_fallback")) for g in optimizer.param_groups) == 2  # decayed and not
    assert optimizer.defaults["fallback_lr_scale"] == 0.5
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()


def test_a_hugging_face_text_tower_is_refused_in_one_line():
    """open_clip 3.3's HFTextEncoder (built empty here: its Hugging Face config would need a download)."""
    from open_clip.hf_model import HFTextEncoder

    model = open_clip.create_model(TINY_VIT, device="meta")
    model.text = HFTextEncoder.__new__(HFTextEncoder)
    torch.nn.Module.__init__(model.text)
    with pytest.raises(UsageError, match="--text-layer-decay: not supported for a Hugging Face text tower"):
        acc_clip_table(model, "--text-layer-decay", "0.5")


def test_a_tower_without_layer_groups_is_one_line():
    model = open_clip.create_model(TINY_VIT, device="meta")
    model.visual = torch.nn.Linear(2, 2)
    with pytest.raises(UsageError, match="--image-layer-decay: no layer groups for a Linear tower"):
        acc_clip_table(model, "--image-layer-decay", "0.5")

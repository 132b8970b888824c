"""Model set-up: open_clip's weight-decay groups, same initial weights as open_clip_train for a seed,
tower locking, the channels_last default, the cosine learning-rate schedule."""


import open_clip
import pytest
import torch

from acc_clip.config import parse_config
from acc_clip.model.build import create_lr_schedule, create_model, parameter_groups, uses_channels_last
from conftest import TINY_COCA, TINY_RN, TINY_VIT, open_clip_cosine_lr


def config_for(model, *extra):
    return parse_config(["--train-data", "x.csv", "--model", model, *extra])[0]


def test_weight_decay_groups_follow_open_clip_train():
    model = create_model(config_for(TINY_RN)).model
    no_decay, decay = parameter_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    assert "logit_scale" in no_decay_names and "visual.bn1.weight" in no_decay_names
    assert "transformer.resblocks.0.ln_1.weight" in no_decay_names and "visual.conv1.weight" in decay_names
    assert all(p.ndim >= 2 for p in decay["params"]) and not any("bias" in n for n in decay_names)
    assert len(no_decay_names) + len(decay_names) == len(list(model.parameters()))


def test_same_seed_gives_open_clip_train_initial_weights():
    # open_clip_train: random_seed(seed, 0) (torch, numpy, random), then create_model_and_transforms.
    torch.manual_seed(3)
    theirs, _, _ = open_clip.create_model_and_transforms(TINY_RN, None, precision="fp32", device="cpu",
                                                         output_dict=True)
    ours = create_model(config_for(TINY_RN, "--seed", "3")).model
    other = create_model(config_for(TINY_RN, "--seed", "4")).model
    for (name, a), b, c in zip(theirs.state_dict().items(), ours.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(theirs.visual.conv1.weight, other.visual.conv1.weight)


def test_lock_image_tower_freezes_it():
    model = create_model(config_for(TINY_RN, "--lock-image")).model
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for p in model.transformer.parameters())
    assert all(p["params"] for p in parameter_groups(model, 0.1))
    assert not any(p is q for group in parameter_groups(model, 0.1) for p in group["params"]
                   for q in model.visual.parameters())


@pytest.mark.parametrize("name, requested, expected", [
    (TINY_RN, None, True), (TINY_VIT, None, False), (TINY_RN, False, False), (TINY_VIT, True, True)])
def test_channels_last_default_is_on_for_resnet_towers_only(name, requested, expected):
    model = open_clip.create_model(name)
    assert uses_channels_last(model, requested) is expected


def test_unknown_model_name_is_one_clear_error():
    from acc_clip.errors import AccClipError

    with pytest.raises(AccClipError, match="--model NoSuchModel"):
        create_model(config_for("NoSuchModel"))


@pytest.mark.parametrize("steps_per_epoch, epochs, warmup", [(7, 3, 4), (5, 2, 1)])
def test_cosine_schedule_is_open_clip_train_s_over_every_step_of_every_epoch(steps_per_epoch, epochs, warmup):
    """The lr create_lr_schedule sets (in every parameter group) and returns at the last warm-up
    step, at warm-up end (the full lr), mid-way through the cosine and at the last step of the run,
    whose total is steps_per_epoch * epochs."""
    config = config_for(TINY_RN, "--lr", "0.002", "--epochs", str(epochs), "--warmup", str(warmup))
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)]}], lr=1.0)
    schedule = create_lr_schedule(optimizer, config, steps_per_epoch)
    total = steps_per_epoch * epochs
    last_warmup, end_of_warmup, mid, last = warmup - 1, warmup, warmup + (total - warmup) // 2, total - 1
    for step in (0, last_warmup, end_of_warmup, mid, last):
        expected = open_clip_cosine_lr(step, 0.002, warmup, total)
        assert schedule(step) == pytest.approx(expected, rel=1e-12, abs=0), step
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([expected] * 2, rel=1e-12, abs=0)
    assert schedule(end_of_warmup) == pytest.approx(0.002, rel=1e-12)
    assert 0 < schedule(last) < schedule(mid) < 0.002


def test_a_fresh_coca_model_depends_on_the_seed_only():
    """open_clip leaves a CoCa decoder's text_projection uninitialised (torch.empty: zeros in a fresh
    process, leftovers later). acc_clip draws it: a normal of std width ** -0.5 (64 ** -0.5 = 0.125
    here, 4096 values), the same for the same seed."""
    config = config_for(TINY_COCA)
    first = create_model(config).model.text_decoder.text_projection.detach().clone()
    second = create_model(config).model.text_decoder.text_projection.detach()
    assert torch.equal(first, second)
    assert abs(first.std().item() - 0.125) < 0.01 and abs(first.mean().item()) < 0.01


def test_force_context_length_reaches_the_tokenizer_too():
    """open_clip_train tokenises to --force-context-length; with the tokenizer's own length the text tower
    would fail on the first batch."""
    import torch

    from acc_clip.config import parse_config
    from acc_clip.model.build import create_model
    from conftest import TINY_VIT

    bundle = create_model(parse_config(["--train-data", "x.csv", "--model", TINY_VIT, "--force-context-length", "16"])[0])
    texts = bundle.tokenizer(["a red square", "a blue circle"])
    assert texts.shape == (2, 16)
    with torch.no_grad():
        assert bundle.model.encode_text(texts).shape == (2, 64)  # tiny-vit embeds in 64 dimensions


def test_an_unknown_model_is_a_short_line():
    """open_clip's message lists every model it knows (about 5 KB); the line keeps its start."""
    import pytest

    from acc_clip.config import parse_config
    from acc_clip.errors import AccClipError
    from acc_clip.model.build import create_model

    with pytest.raises(AccClipError, match="--model NoSuchModel") as error:
        create_model(parse_config(["--train-data", "x.csv", "--model", "NoSuchModel"])[0])
    assert len(str(error.value)) < 500 and "\n" not in str(error.value)

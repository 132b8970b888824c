"""Model set-up (acc_clip/model/build.py): same initial weights as open_clip_train for a seed, tower
locking, the channels_last default, CoCa's decoder projection, the tokenizer's context length, one-line
errors for unknown models. The optimizer and schedule are tests/unit/model/test_optim.py."""

import open_clip
import pytest
import torch

from acc_clip.loss import model_overrides
from acc_clip.model.build import create_model as create_model_from_options
from acc_clip.model.build import uses_channels_last
from acc_clip.model.optim import parameter_groups
from acc_clip.train.config import parse_train_config as parse_config
from helpers import TINY_COCA, TINY_RN, TINY_VIT


def config_for(model, *extra):
    return parse_config(["--train-data", "x.csv", "--model", model, *extra])[0]


def create_model(config):
    """The model of a train command's config, as the trainer creates it."""
    return create_model_from_options(
        config.model, precision=config.runtime.precision, seed=config.runtime.seed, **model_overrides(config)
    )


def test_same_seed_gives_open_clip_train_initial_weights():
    # open_clip_train: random_seed(seed, 0) (torch, numpy, random), then create_model_and_transforms.
    torch.manual_seed(3)
    theirs, _, _ = open_clip.create_model_and_transforms(
        TINY_RN, None, precision="fp32", device="cpu", output_dict=True
    )
    ours = create_model(config_for(TINY_RN, "--seed", "3")).model
    other = create_model(config_for(TINY_RN, "--seed", "4")).model
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(theirs.visual.conv1.weight, other.visual.conv1.weight)


def test_lock_image_tower_freezes_it():
    model = create_model(config_for(TINY_RN, "--lock-image")).model
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for p in model.transformer.parameters())
    assert all(p["params"] for p in parameter_groups(model, 0.1))
    assert not any(
        p is q for group in parameter_groups(model, 0.1) for p in group["params"] for q in model.visual.parameters()
    )


@pytest.mark.parametrize(
    "name, requested, expected",
    [(TINY_RN, None, True), (TINY_VIT, None, False), (TINY_RN, False, False), (TINY_VIT, True, True)],
)
def test_channels_last_default_is_on_for_resnet_towers_only(name, requested, expected):
    model = open_clip.create_model(name)
    assert uses_channels_last(model, requested) is expected


def test_unknown_model_name_is_one_clear_error():
    from acc_clip.errors import AccClipError

    with pytest.raises(AccClipError, match="--model NoSuchModel"):
        create_model(config_for("NoSuchModel"))


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
    bundle = create_model(
        parse_config(["--train-data", "x.csv", "--model", TINY_VIT, "--force-context-length", "16"])[0]
    )
    texts = bundle.tokenizer(["a red square", "a blue circle"])
    assert texts.shape == (2, 16)
    with torch.no_grad():
        assert bundle.model.encode_text(texts).shape == (2, 64)  # tiny-vit embeds in 64 dimensions


def test_an_unknown_model_is_a_short_line():
    """open_clip's message lists every model it knows (about 5 KB); the line keeps its start."""
    from acc_clip.errors import AccClipError

    with pytest.raises(AccClipError, match="--model NoSuchModel") as error:
        create_model(parse_config(["--train-data", "x.csv", "--model", "NoSuchModel"])[0])
    assert len(str(error.value)) < 500 and "\n" not in str(error.value)


def test_locking_clips_text_tower_without_freezing_its_layer_norms_is_one_line():
    """open_clip asserts that CLIP's built-in text tower freezes its layer norms with the rest (open_clip_train's
    --lock-text alone stops there with a traceback): one line naming the flag to add."""
    from acc_clip.errors import UsageError

    with pytest.raises(UsageError, match=r"^--lock-text with --model .*\(add --lock-text-freeze-layer-norm\)$"):
        create_model(config_for(TINY_VIT, "--lock-text"))
    model = create_model(config_for(TINY_VIT, "--lock-text", "--lock-text-freeze-layer-norm")).model
    assert not model.token_embedding.weight.requires_grad and model.visual.conv1.weight.requires_grad

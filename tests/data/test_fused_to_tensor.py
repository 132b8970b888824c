"""The fused to-tensor + Normalize ending gives open_clip's transforms' tensors bit for bit."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from acc_clip.data.common import seeded_torch_rng
from acc_clip.data.fused_to_tensor import FusedToNormalizedTensor, fuse_to_tensor_normalize


@pytest.fixture(scope="module")
def rn50_transforms():
    """open_clip's RN50 train and val transforms (random weights, nothing downloaded)."""
    _, train, val = open_clip.create_model_and_transforms("RN50")
    return train, val


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((256, 341), (300, 240))]
    gray = Image.fromarray(rng.integers(0, 256, (250, 260), dtype=np.uint8))  # converted to RGB first
    rgba = Image.fromarray(rng.integers(0, 256, (240, 250, 4), dtype=np.uint8), mode="RGBA")
    return [*rgb, gray, rgba, gray.convert("P"), rgb[0].convert("CMYK")]


def test_open_clip_train_and_val_transforms_give_equal_tensors(rn50_transforms):
    for original in rn50_transforms:
        fused = fuse_to_tensor_normalize(original)
        assert isinstance(fused.transforms[-1], FusedToNormalizedTensor)
        assert len(fused.transforms) == len(original.transforms) - 2  # convert, to-tensor, Normalize -> one
        for number, picture in enumerate(pictures()):
            with seeded_torch_rng(number):  # the same crop on both sides
                want = original(picture)
            with seeded_torch_rng(number):
                got = fused(picture)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want), f"{picture.mode} picture {number}"
            assert got.is_contiguous()


def test_inputs_without_a_fast_path_take_the_original_steps(rn50_transforms):
    train, _ = rn50_transforms
    tail = fuse_to_tensor_normalize(train).transforms[-1]
    tensor = torch.rand(3, 224, 224)  # MaybeToTensor passes tensors through, then Normalize
    assert torch.equal(tail(tensor), train.transforms[-1](tensor))
    floats = Image.fromarray(np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(224, 224))  # mode "F"
    no_conversion = FusedToNormalizedTensor([T.ToTensor(), T.Normalize([0.5], [0.25])], [0.5], [0.25], None)
    assert torch.equal(no_conversion(floats), T.Normalize([0.5], [0.25])(T.ToTensor()(floats)))


def test_transforms_of_another_shape_are_left_alone():
    ends_in_normalize_without_to_tensor = T.Compose([T.Lambda(lambda x: x), T.Normalize([0.5], [0.5])])
    no_normalize = T.Compose([T.Resize(8), T.ToTensor()])
    zero_std = T.Compose([T.ToTensor(), T.Normalize([0.5], [0.0])])
    for transform in (ends_in_normalize_without_to_tensor, no_normalize, zero_std, T.ToTensor()):
        assert fuse_to_tensor_normalize(transform) is transform
    plain = T.Compose([T.Resize(8), T.ToTensor(), T.Normalize([0.1, 0.2, 0.3], [0.3, 0.2, 0.1])])
    fused = fuse_to_tensor_normalize(plain)
    assert fused is not plain and len(fused.transforms) == 2
    picture = pictures()[1]
    assert torch.equal(fused(picture), plain(picture))

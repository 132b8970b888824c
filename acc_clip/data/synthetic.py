"""Random inputs of the right shape: measures the model step alone (benchmarks), as open_clip's
`--dataset-type synthetic` does."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from acc_clip.data.common import Batch


def _image_size(preprocess: Callable) -> int:
    steps = getattr(getattr(preprocess, "geometric", preprocess), "transforms", [])  # a pixels.SplitTransform or a Compose
    for transform in steps:
        size = getattr(transform, "size", None)
        if size is not None:
            return size[0] if isinstance(size, (tuple, list)) else int(size)
    raise ValueError("cannot find the image size in the preprocess transform")


def synthetic_batches(preprocess: Callable, tokenizer: Callable, batch_size: int, num_batches: int) -> Iterator[Batch]:
    size = _image_size(preprocess)
    images = torch.randn(batch_size, 3, size, size)
    texts = tokenizer(["a synthetic caption"] * batch_size)
    indices = torch.arange(batch_size)
    for _ in range(num_batches):
        yield Batch(images, texts, indices, 0)

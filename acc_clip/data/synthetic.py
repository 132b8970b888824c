"""Random inputs of the right shape: measures the model step alone (benchmarks), as open_clip's
`--dataset-type synthetic` does."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from acc_clip.config.parsing import Config
from acc_clip.data.common import Batch
from acc_clip.data.order import consumed_samples, global_micro_batch, split_position
from acc_clip.data.source import DataOptions, Segment, Source, TrainData
from acc_clip.errors import UsageError


def _image_size(preprocess: Callable) -> int:
    steps = getattr(
        getattr(preprocess, "geometric", preprocess), "transforms", []
    )  # a pixels.SplitTransform or a Compose
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


@dataclass
class SyntheticBatches:
    preprocess: Callable
    tokenizer: Callable
    batch_size: int
    num_batches: int

    def __iter__(self) -> Iterator[Batch]:
        return synthetic_batches(self.preprocess, self.tokenizer, self.batch_size, self.num_batches)

    def __len__(self) -> int:
        return self.num_batches


class SyntheticSource(Source):
    """`--dataset-type synthetic`: the same random batch over and over, --train-num-samples per epoch
    (default 100 global batches); never detected from a path."""

    name = "synthetic"

    def train_data(
        self,
        config: Config,
        preprocess: Callable,
        tokenizer: Callable,
        *,
        seed: int,
        rank: int,
        world_size: int,
        pin_memory: bool,
    ) -> TrainData:
        data = config[DataOptions]
        num_samples = data.train_num_samples or 100 * data.batch_size * world_size
        layout = {"batch_size": data.batch_size, "world_size": world_size}

        def batches(epoch: int, done: Sequence[Segment]) -> SyntheticBatches:
            before, start = split_position(done, layout)
            remaining = (num_samples - consumed_samples(before)) // global_micro_batch(layout) - start
            return SyntheticBatches(preprocess, tokenizer, data.batch_size, remaining)

        order = {"source": self.name, "samples": num_samples}
        return TrainData(num_samples, num_samples // global_micro_batch(layout), batches, order, layout)

    def eval_loader(
        self,
        config: Config,
        path: str,
        preprocess: Callable,
        tokenizer: Callable,
        *,
        rank: int,
        world_size: int,
        expected_samples: int | None,
    ) -> Any:
        raise UsageError(f"{path}: synthetic data cannot be a validation set; give a CSV or shards")


SYNTHETIC = SyntheticSource()

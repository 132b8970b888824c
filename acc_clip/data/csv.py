"""CSV rows (`filepath,title` by default) -> `Batch`es, with an epoch order that can be rebuilt.

Order and position: data/order.py. The sample order of epoch e is a permutation of the rows, a pure
function of (seed, e) that open_clip_train's single-process loader also draws; global batch j is the next
B x W samples of it (B the per-process batch, W the number of processes) and rank r takes the r-th
contiguous slice, so the set of samples in a step does not depend on how many processes share it. The
position in an epoch is kept in samples: a resume on another layout trains the rest once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from torch.utils.data import DataLoader, Dataset, Sampler

from acc_clip.config.parsing import Config
from acc_clip.config.schema import NON_EMPTY, Section, option
from acc_clip.data.common import collate_skipping_bad
from acc_clip.data.csv_file import AUTO_SEPARATOR, parse_separator, read_csv_table
from acc_clip.data.order import (  # noqa: F401 - EpochBatchSampler and epoch_permutation: their old home
    EpochBatchSampler,
    consumed_samples,
    epoch_permutation,
    split_position,
)
from acc_clip.data.pixels import MAX_IMAGE_PIXELS, collate_images
from acc_clip.data.source import DataOptions, Segment, Source, TrainData, file_fingerprint
from acc_clip.data.table import IMAGE_ERRORS as IMAGE_ERRORS  # the evaluator's zero-shot reader uses them
from acc_clip.data.table import TableDataset
from acc_clip.io.files import MAX_IMAGE_BYTES
from acc_clip.runtime.signals import ignore_stop_signals

log = logging.getLogger(__name__)


class CsvDataset(TableDataset):
    """One sample per CSV row (table.TableDataset over the file's two columns). `dataset[(epoch, i)]` or
    `dataset[i]` gives a `Sample`, or None when the image is missing or corrupt or the caption empty (the
    collate counts those). `transform` takes a PIL image, or is a `pixels.SplitTransform` (takes the
    file's bytes). A caption cell holding a JSON list of strings is several captions, one drawn per epoch."""

    def __init__(
        self,
        path: str,
        *,
        transform: Callable,
        tokenizer: Callable,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str = AUTO_SEPARATOR,
        seed: int = 0,
        augment_seeded: bool = True,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        skip_bad_rows: bool = False,
    ):
        rows = read_csv_table(path, img_key=img_key, caption_key=caption_key, sep=sep, skip_bad_rows=skip_bad_rows)
        super().__init__(
            rows,
            transform=transform,
            tokenizer=tokenizer,
            seed=seed,
            augment_seeded=augment_seeded,
            max_image_bytes=max_image_bytes,
            max_image_pixels=max_image_pixels,
        )


class EvalSampler(Sampler):
    """Every row exactly once across ranks, in order, no padding: rank r gets rows r, r+W, ...
    Ranks may get different numbers of batches, so gather once after the loop, not per batch."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def build_train_loader(
    dataset: TableDataset, *, batch_size: int, workers: int, seed: int, rank: int, world_size: int, pin_memory: bool
) -> DataLoader:
    sampler = EpochBatchSampler(len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=functools.partial(collate_skipping_bad, collate_images=collate_images(dataset.transform)),
        pin_memory=pin_memory,
        # Workers stay up between epochs: the epoch travels inside each key, not in worker state.
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals,  # the main process saves on SIGTERM; workers must outlive it
    )


def build_eval_loader(
    dataset: Dataset, *, batch_size: int, workers: int, rank: int, world_size: int, pin_memory: bool = False
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EvalSampler(len(cast(Sized, dataset)), rank, world_size),
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        pin_memory=pin_memory,
    )


@dataclass
class CsvOptions(Section):
    """The CSV source's own flags (training, validation and `acc-clip shards` read CSVs alike); the parquet
    source reads its columns by the same two keys."""

    title: ClassVar[str] = "csv"
    csv_separator: str = option(
        AUTO_SEPARATOR,
        "column separator: auto (a tab, open_clip's default, unless the "
        "header line holds a comma and no tab), or one character ('\\t' "
        "for a tab)",
        domain=NON_EMPTY,
    )
    csv_img_key: str = option(
        "filepath",
        "CSV column with image paths; also names the parquet / datasets column (paths, image bytes, or a "
        "datasets Image)",
        domain=NON_EMPTY,
    )
    csv_caption_key: str = option(
        "title",
        "CSV column with captions; also names the parquet / datasets column. A cell holding a JSON list of "
        "strings (or a list column) is several captions: one drawn per sample per epoch, the first in validation",
        domain=NON_EMPTY,
    )
    skip_bad_rows: bool = option(
        False,
        "skip CSV rows whose field count differs from the header's (counted and "
        "named in a warning) instead of stopping at the first",
    )

    def check(self) -> None:
        if self.csv_separator != AUTO_SEPARATOR:
            parse_separator(self.csv_separator, "--csv-separator")


def csv_dataset(
    config: Config, path: str, transform: Callable, tokenizer: Callable, *, seed: int = 0, augment_seeded: bool
) -> CsvDataset:
    csv, data = config[CsvOptions], config[DataOptions]
    return CsvDataset(
        path,
        transform=transform,
        tokenizer=tokenizer,
        img_key=csv.csv_img_key,
        caption_key=csv.csv_caption_key,
        sep=csv.csv_separator,
        seed=seed,
        augment_seeded=augment_seeded,
        max_image_bytes=data.max_image_bytes,
        max_image_pixels=data.max_image_pixels,
        skip_bad_rows=csv.skip_bad_rows,
    )


class CsvSource(Source):
    """One sample per CSV row; see the module docstring for the order and how it splits over processes."""

    name = "csv"
    options = CsvOptions

    def detect(self, path: str) -> bool:
        return path.endswith((".csv", ".tsv"))

    # The two steps a tabular source of another format (parquet.py) does its own way; the order, the
    # sampler and the loaders are shared.
    def dataset(
        self,
        config: Config,
        path: str,
        transform: Callable,
        tokenizer: Callable,
        *,
        seed: int = 0,
        augment_seeded: bool,
    ) -> TableDataset:
        return csv_dataset(config, path, transform, tokenizer, seed=seed, augment_seeded=augment_seeded)

    def fingerprint(self, path: str) -> Any:
        return file_fingerprint(path)

    def check(self, config: Config) -> list[str]:
        data = config[DataOptions]
        if data.train_num_samples is not None:
            return [
                f"--train-num-samples {data.train_num_samples} has no effect on CSV data: an epoch is every "
                "row once (it sets the epoch length of shards and synthetic data)"
            ]
        return []

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
        dataset = self.dataset(config, str(data.train_data), preprocess, tokenizer, seed=seed, augment_seeded=True)
        loader = build_train_loader(
            dataset,
            batch_size=data.batch_size,
            workers=data.workers,
            seed=seed,
            rank=rank,
            world_size=world_size,
            pin_memory=pin_memory,
        )
        sampler: EpochBatchSampler = loader.batch_sampler  # type: ignore[assignment]

        layout = {"batch_size": data.batch_size, "world_size": world_size}

        def batches(epoch: int, done: Sequence[Segment]) -> DataLoader:
            before, start_batch = split_position(done, layout)
            sampler.set_epoch(epoch, start_batch, consumed_samples(before))
            return loader  # its len() is the sampler's

        # The order is a permutation of the rows by the seed: it depends neither on the layout (the position is
        # kept in samples) nor on the loader workers.
        order = {"source": self.name, "samples": len(dataset), "data": self.fingerprint(str(data.train_data))}
        return TrainData(len(dataset), sampler.batches_per_epoch, batches, order, layout)

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
        data = config[DataOptions]
        dataset = self.dataset(config, path, preprocess, tokenizer, augment_seeded=False)
        return build_eval_loader(
            dataset, batch_size=data.batch_size, workers=data.workers, rank=rank, world_size=world_size
        )


CSV = CsvSource()

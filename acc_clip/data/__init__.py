"""Input pipelines: CSV rows (csv.py) and webdataset shards (wds.py) into `Batch`es.

`build_train_data` picks the pipeline from `--dataset-type` (or the path, for `auto`) and returns a
`TrainData`: the number of micro-batches each rank reads per epoch, and the batches of an epoch from
any batch onwards (mid-epoch resume).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from acc_clip.config import TrainConfig
from acc_clip.data.common import Batch
from acc_clip.errors import AccClipError

log = logging.getLogger(__name__)


def dataset_type_of(path: str, requested: str) -> str:
    if requested != "auto":
        return requested
    if path.endswith((".csv", ".tsv")):
        return "csv"
    if all(".tar" in part or os.path.isdir(part) for part in path.split("::")):  # '::' joins shard sources
        return "webdataset"
    raise AccClipError(f"{path}: cannot tell the dataset type from the name; pass --dataset-type csv or webdataset")


def check_upsampling_factors(config: TrainConfig) -> None:
    """Refuse --train-data-upsampling-factors where it means nothing, and bad factors, before anything
    is built: it weighs the shard sources of webdataset data drawn with replacement."""
    kind = dataset_type_of(config.train_data, config.dataset_type) if config.train_data else config.dataset_type
    if kind != "webdataset":
        data = f"--train-data {config.train_data} is {kind} data" if config.train_data else f"--dataset-type {kind}"
        raise AccClipError(f"--train-data-upsampling-factors weighs webdataset shard sources; {data}")
    from acc_clip.data.wds import NEEDS_RESAMPLED, source_factors

    if not config.dataset_resampled:
        raise AccClipError(NEEDS_RESAMPLED)
    source_factors(config.train_data, config.train_data_upsampling_factors)


@dataclass
class TrainData:
    num_samples: int
    batches_per_epoch: int  # micro-batches per rank
    _batches: Callable[[int, int], Iterable[Batch]]

    def batches(self, epoch: int, start_batch: int = 0) -> Iterable[Batch]:
        return self._batches(epoch, start_batch)


def build_train_data(config: TrainConfig, preprocess: Callable, tokenizer: Callable, *, rank: int, world_size: int,
                     pin_memory: bool) -> TrainData:
    kind = dataset_type_of(config.train_data, config.dataset_type)
    if kind == "csv":
        from acc_clip.data.csv import CsvDataset, build_train_loader

        dataset = CsvDataset(config.train_data, transform=preprocess, tokenizer=tokenizer, img_key=config.csv_img_key,
                             caption_key=config.csv_caption_key, sep=config.csv_separator, seed=config.seed,
                             max_image_bytes=config.max_image_bytes, skip_bad_rows=config.skip_bad_rows)
        loader = build_train_loader(dataset, batch_size=config.batch_size, workers=config.workers, seed=config.seed,
                                    rank=rank, world_size=world_size, pin_memory=pin_memory)

        def csv_batches(epoch: int, start_batch: int) -> Iterable[Batch]:
            loader.batch_sampler.set_epoch(epoch, start_batch)
            return loader

        return TrainData(len(dataset), loader.batch_sampler.batches_per_epoch, csv_batches)
    if kind == "webdataset":
        from acc_clip.data.wds import build_wds_loader, train_workers

        def wds_loader(epoch: int, start_batch: int = 0):
            return build_wds_loader(config.train_data, preprocess=preprocess, tokenizer=tokenizer,
                                    batch_size=config.batch_size, workers=config.workers, seed=config.seed,
                                    epoch=epoch, rank=rank, world_size=world_size, is_train=True,
                                    num_samples=config.train_num_samples, resampled=config.dataset_resampled,
                                    upsampling_factors=config.train_data_upsampling_factors,
                                    start_batch=start_batch, pin_memory=pin_memory)

        _, batches_per_epoch = wds_loader(0)
        if train_workers(config.workers, batches_per_epoch) < config.workers:
            log.info("%d batches per process per epoch: starting %d loader workers, not --workers %d (each makes "
                     "whole batches)", batches_per_epoch, batches_per_epoch, config.workers)
        num_samples = config.train_num_samples or batches_per_epoch * config.batch_size * world_size
        return TrainData(num_samples, batches_per_epoch, lambda epoch, start: wds_loader(epoch, start)[0])
    if kind == "synthetic":
        from acc_clip.data.synthetic import synthetic_batches

        num_samples = config.train_num_samples or 100 * config.batch_size * world_size
        return TrainData(num_samples, num_samples // (config.batch_size * world_size),
                         lambda epoch, start: synthetic_batches(preprocess, tokenizer, config.batch_size,
                                                                num_samples // (config.batch_size * world_size) - start))
    raise AccClipError(f"--dataset-type {kind!r}: expected auto, csv, webdataset or synthetic")


def check_bad_fraction(bad: int, read: int, max_fraction: float, minimum_read: int = 100) -> Optional[str]:
    """The error to stop with when too many samples were missing or corrupt, else None."""
    if read >= minimum_read and bad > max_fraction * read:
        return (f"{bad} of {read} samples read so far were missing or corrupt ({bad / read:.1%}), "
                f"more than --max-bad-fraction {max_fraction}; see the warnings above for the files")
    return None

"""CSV rows (`filepath,title` by default) -> `Batch`es, with an epoch order that can be rebuilt.

Order. The sample order of epoch e is a pure function of (seed, e): a generator seeded with `seed`
makes two 64-bit draws per epoch, the way a torch DataLoader over a RandomSampler draws from the
global RNG (worker base seed, then permutation seed), and the second one seeds `randperm`. After
`torch.manual_seed(seed)` open_clip_train's single-process loader makes exactly those draws, so
with workers > 0 both trainers visit the same samples in the same order, and after a crash the
order of any epoch is rebuilt without having been stored.

Sharding. Global batch j of an epoch is `perm[j*B*W : (j+1)*B*W]` (B the per-process batch, W the
number of processes) and rank r takes the r-th contiguous slice of it. So the set of samples in an
optimizer step does not depend on how many processes share it, and the features gathered across
ranks come in the same order as one process would see them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from acc_clip.config.parsing import Config
from acc_clip.config.schema import NON_EMPTY, Section, option
from acc_clip.data.common import Batch, Sample, collate_skipping_bad, sample_seed
from acc_clip.data.csv_file import AUTO_SEPARATOR, parse_separator, read_csv_columns
from acc_clip.data.pixels import MAX_IMAGE_PIXELS, ImageDecodeError, ImageTooLarge, collate_images, load_pixels
from acc_clip.data.source import DataOptions, Source, TrainData, file_fingerprint, too_few_samples
from acc_clip.io.files import MAX_IMAGE_BYTES, ImageFileError, read_image_file
from acc_clip.runtime.signals import ignore_stop_signals

log = logging.getLogger(__name__)

# Errors that mean "this image cannot be used"; anything else is a bug and must surface.
IMAGE_ERRORS = (OSError, ImageDecodeError)  # OSError: missing, unreadable, a folder, a FIFO, too large


class CsvDataset(Dataset):
    """One sample per CSV row. `dataset[(epoch, i)]` or `dataset[i]` gives a `Sample`, or None when
    the image is missing or corrupt or the caption empty (the collate counts those). `transform`
    takes a PIL image, or is a `pixels.SplitTransform` (takes the file's bytes)."""

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
        self.path = path
        self.filepaths, self.captions = read_csv_columns(
            path, img_key=img_key, caption_key=caption_key, sep=sep, skip_bad_rows=skip_bad_rows
        )
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed
        self.augment_seeded = augment_seeded

    def __len__(self) -> int:
        return len(self.filepaths)

    def __getitem__(self, key) -> Sample | None:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        caption = self.captions[index].strip()
        if not caption:
            log.warning("%s row %d: empty caption, sample skipped", self.path, index)
            return None
        try:
            data = read_image_file(self.filepaths[index], self.max_image_bytes)
            pixels = load_pixels(
                data,
                self.transform,
                sample_seed(self.seed, epoch, index) if self.augment_seeded else None,
                self.max_image_pixels,
            )
        except IMAGE_ERRORS as error:
            why = str(error) if isinstance(error, (ImageFileError, ImageTooLarge)) else type(error).__name__
            log.warning(
                "%s row %d: cannot read image %s (%s), sample skipped", self.path, index, self.filepaths[index], why
            )
            return None
        return Sample(pixels, self.tokenizer([caption])[0], index)


def _draw_int64(generator: torch.Generator) -> int:
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of `epoch`; see the module docstring for why two draws per epoch."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch):
        _draw_int64(generator), _draw_int64(generator)
    _draw_int64(generator)  # the DataLoader's worker base seed, unused here: per-sample seeds instead
    permutation_seed = _draw_int64(generator)
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(permutation_seed))


class EpochBatchSampler(Sampler):
    """Batches of `(epoch, index)` keys for one rank; `set_epoch(e, start_batch=k)` skips the first k
    batches by index arithmetic, without reading them (exact mid-epoch resume)."""

    def __init__(self, num_samples: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch_size = batch_size * world_size
        self.batches_per_epoch = num_samples // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise too_few_samples(num_samples, batch_size, world_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        permutation = epoch_permutation(self.num_samples, self.seed, self.epoch).tolist()
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch_size + self.rank * self.batch_size
            yield [(self.epoch, index) for index in permutation[first : first + self.batch_size]]


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
    dataset: CsvDataset, *, batch_size: int, workers: int, seed: int, rank: int, world_size: int, pin_memory: bool
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
    """The CSV source's own flags (training, validation and `acc-clip shards` read CSVs alike)."""

    title: ClassVar[str] = "csv"
    csv_separator: str = option(
        AUTO_SEPARATOR,
        "column separator: auto (a tab, open_clip's default, unless the "
        "header line holds a comma and no tab), or one character ('\\t' "
        "for a tab)",
        domain=NON_EMPTY,
    )
    csv_img_key: str = option("filepath", "CSV column with image paths", domain=NON_EMPTY)
    csv_caption_key: str = option("title", "CSV column with captions", domain=NON_EMPTY)
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
        dataset = csv_dataset(config, str(data.train_data), preprocess, tokenizer, seed=seed, augment_seeded=True)
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

        def batches(epoch: int, start_batch: int) -> Iterable[Batch]:
            sampler.set_epoch(epoch, start_batch)
            return loader

        # The order is a permutation of the rows by the seed, cut into global micro-batches: it does not depend on
        # how many processes share a global micro-batch, nor on the loader workers.
        order = {
            "source": self.name,
            "samples": len(dataset),
            "global_micro_batch": data.batch_size * world_size,
            "data": file_fingerprint(str(data.train_data)),
        }
        return TrainData(len(dataset), sampler.batches_per_epoch, batches, order)

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
        dataset = csv_dataset(config, path, preprocess, tokenizer, augment_seeded=False)
        return build_eval_loader(
            dataset, batch_size=data.batch_size, workers=data.workers, rank=rank, world_size=world_size
        )


CSV = CsvSource()

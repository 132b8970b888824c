"""The contract every data source keeps, and the options common to all of them.

A `Source` is one kind of data acc_clip reads (one `--dataset-type`): CSV rows (csv.py), parquet and
`datasets` rows (parquet.py), webdataset
shards (wds.py), synthetic tensors (synthetic.py). The registry (data/__init__.py) lists them; training
and validation both pick a source there, by `--dataset-type` or by `detect`ing the path.

The contract:
- `name`: its --dataset-type; `options`: the section of its own flags (None without any), given while
  another source is read announced as having no effect (or refused, `refuse_elsewhere`);
- `detect(path)`: whether `--dataset-type auto` reads `path` as this kind;
- `check(config)`: its rules against the whole configuration (one UsageError line each) and the notices
  to give (flags of its own that have no effect in this run);
- `train_data(config, preprocess, tokenizer, seed, rank, world_size, pin_memory) -> TrainData`:
  `batches(epoch, done)` gives this rank's micro-batches of the rest of `epoch` (`len()`: how many), after
  the `done` segments of the epoch (`Segment`: a layout and the micro-batches every
  rank trained in it; order.py). With no segments it is the whole epoch; after segments of this run's
  `layout` the same batches (samples, indices, pixels) an uninterrupted epoch yields from there, so a run
  resumes exactly. Within an epoch no sample is trained twice across ranks, workers and segments, every
  rank gets the same number of batches, and a source that is `elastic` serves exactly the samples the
  segments did not train when the layout (processes, per-process batch, workers) changed; `order` names
  what the order depends on besides the seed and the layout (the data's fingerprint, the epoch length),
  so a resume can tell whether it continues the same order;
- `eval_loader(config, path, preprocess, tokenizer, rank, world_size, expected_samples)`: every sample of
  the set exactly once across processes, in `Batch`es carrying each sample's index; its dataset may
  expose `filepaths` and `captions` by index (the evaluator then gives samples of one image, or one
  caption, identical features).
Bad samples (missing or corrupt image, empty caption) are counted in `Batch.num_bad` and skipped,
never silently."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from acc_clip.config.parsing import Config
from acc_clip.config.schema import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, Domain, Section, option
from acc_clip.data.common import Batch
from acc_clip.data.pixels import MAX_IMAGE_PIXELS
from acc_clip.errors import DataError
from acc_clip.io.files import MAX_IMAGE_BYTES


def source_names() -> list[str]:
    """The --dataset-type of every source defined (the registry, data/__init__.py, imports them all)."""
    names, classes = [], list(Source.__subclasses__())
    while classes:  # subclasses of subclasses too: the parquet source is the CSV source's
        source = classes.pop(0)
        names.append(source.name)
        classes.extend(source.__subclasses__())
    return list(dict.fromkeys(names))


DATASET_TYPE = Domain(
    "auto or a source: csv, parquet, webdataset, synthetic", lambda v: v == "auto" or v in source_names(), ("parquetx",)
)


@dataclass
class DataOptions(Section):
    """How any data set is read, training or validation, and the training data itself."""

    title: ClassVar[str] = "data"
    train_data: str | None = option(
        None,
        "training CSV, parquet file / glob / folder (or a datasets save_to_disk folder), shard pattern "
        "'DIR/{00000..00031}.tar', or a shard folder",
        train_only=True,
    )
    dataset_type: str = option(
        "auto",
        "auto (from the path), or one of the sources: csv, parquet (also a datasets save_to_disk folder), "
        "webdataset, synthetic",
        domain=DATASET_TYPE,
    )
    batch_size: int = option(64, "samples per process per micro-batch", domain=POSITIVE)
    workers: int = option(4, "data loader worker processes per rank", domain=NON_NEGATIVE)
    train_num_samples: int | None = option(
        None, "samples per epoch, for shards and synthetic data (default: sizes.json)", domain=POSITIVE, train_only=True
    )
    pin_memory: bool | None = option(
        None,
        "page-locked loader batches for non-blocking copies to the device "
        "(default: on for CUDA and SDAA; --no-pin-memory turns it off)",
        tristate=True,
        train_only=True,
    )
    decode_on_device: bool = option(
        False,
        "decode JPEGs on the accelerator (nvjpeg on CUDA) instead of in the "
        "loader workers; falls back to the workers where the device cannot",
        train_only=True,
    )
    max_bad_fraction: float = option(
        0.01,
        "stop when more than this fraction of samples read is missing or corrupt",
        domain=UNIT_INTERVAL,
        train_only=True,
    )
    max_image_bytes: int = option(
        MAX_IMAGE_BYTES, "image files larger than this are skipped and counted as bad", domain=POSITIVE
    )
    max_image_pixels: int = option(
        MAX_IMAGE_PIXELS,
        "images whose width x height (read from the header, before decoding) is above this are skipped and "
        "counted as bad, for every source, training and validation; 0: no limit (replaces PIL's limit)",
        domain=NON_NEGATIVE,
    )


@dataclass(frozen=True)
class Segment:
    """A stretch of an epoch trained on one layout: the source's `TrainData.layout` then, and the micro-batches
    every process trained in it."""

    layout: dict[str, Any]
    batches: int


class EpochBatches(Protocol):
    """The micro-batches of (the rest of) an epoch for one rank: a DataLoader, or any iterable that knows its length."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...


@dataclass
class TrainData:
    num_samples: int
    batches_per_epoch: int  # micro-batches per rank in a whole epoch of this layout
    # (epoch, segments done) -> this rank's micro-batches in the rest of the epoch (len(): how many)
    _epoch: Callable[[int, Sequence[Segment]], EpochBatches]
    # What the epoch's sample order depends on besides the seed, the position and, when elastic, the layout (the
    # data's identity, the epoch length): a checkpoint records it, and a resume in the middle of an epoch compares it.
    order: dict[str, Any] = field(default_factory=dict)
    # How this run lays the epoch out over processes and workers; recorded with each segment of an epoch.
    layout: dict[str, Any] = field(default_factory=dict)
    # Whether the rest of an epoch begun on another layout is served exactly once; a source that is not has its
    # layout in `order` too, and such a resume is refused there.
    elastic: bool = True

    def batches(self, epoch: int, done: Sequence[Segment] = ()) -> EpochBatches:
        return self._epoch(epoch, done)


class Source:
    """One kind of data; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    options: ClassVar[type[Section] | None] = None
    # Its flags given while another source is read: announced as having no effect, or refused where they
    # could only be a mistake.
    refuse_elsewhere: ClassVar[bool] = False

    def detect(self, path: str) -> bool:
        return False

    def check(self, config: Config) -> list[str]:
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
        raise NotImplementedError

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
        raise NotImplementedError


def check_bad_fraction(bad: int, read: int, max_fraction: float, minimum_read: int = 100) -> str | None:
    """The error to stop with when too many samples were missing or corrupt, else None."""
    if read >= minimum_read and bad > max_fraction * read:
        return (
            f"{bad} of {read} samples read so far were missing or corrupt ({bad / read:.1%}), "
            f"more than --max-bad-fraction {max_fraction}; see the warnings above for the files"
        )
    return None


def file_fingerprint(path: str, span: int = 1 << 16) -> dict[str, Any]:
    """A cheap identity of a data file: its path, size and a hash of its first and last `span` bytes (the same
    rows shuffled, or another file of the same name, differ there)."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        digest.update(file.read(span))
        file.seek(max(0, size - span))
        digest.update(file.read(span))
    return {"path": os.path.abspath(path), "bytes": size, "ends_sha256": digest.hexdigest()}


def too_few_samples(num_samples: int, batch_size: int, world_size: int) -> DataError:
    return DataError(
        f"{num_samples} samples cannot fill one global batch of {batch_size * world_size} "
        f"({batch_size} per process x {world_size} processes): lower --batch-size or add data"
    )

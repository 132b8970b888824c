"""Input pipelines: the registry of data sources, used by training and validation alike.

Each source keeps the contract in source.py (exact resume from a position kept in samples, every sample of an epoch
at most once, bad samples counted). Adding a source: a module here with a `Source` subclass (and its
options section, if it has flags), and one entry in SOURCES."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from acc_clip.config.parsing import Config
from acc_clip.config.schema import Section, options_of
from acc_clip.data.csv import CSV
from acc_clip.data.parquet import PARQUET
from acc_clip.data.source import DataOptions, Source, TrainData, check_bad_fraction
from acc_clip.data.synthetic import SYNTHETIC
from acc_clip.data.wds import WEBDATASET
from acc_clip.errors import UsageError

__all__ = [
    "SOURCES",
    "DataOptions",
    "TrainData",
    "build_eval_loader",
    "build_train_data",
    "check_bad_fraction",
    "check_train_source",
    "source_for",
    "source_options",
]

# --dataset-type -> source; `auto` tries them in this order.
SOURCES: dict[str, Source] = {source.name: source for source in (CSV, PARQUET, WEBDATASET, SYNTHETIC)}


def source_options() -> list[type[Section]]:
    """The sections of the sources' own flags."""
    return list(dict.fromkeys(source.options for source in SOURCES.values() if source.options is not None))


def source_for(path: str | None, dataset_type: str) -> Source:
    """The source that reads `path`: the one --dataset-type names, or the first that detects it."""
    if dataset_type != "auto":
        if dataset_type not in SOURCES:
            raise UsageError(f"--dataset-type {dataset_type!r}: expected auto, {', '.join(SOURCES)}")
        return SOURCES[dataset_type]
    found = next((source for source in SOURCES.values() if path and source.detect(path)), None)
    if found is None:
        raise UsageError(
            f"{path}: cannot tell the dataset type from the name; pass --dataset-type "
            f"{' or '.join(name for name in SOURCES if name != 'synthetic')}"
        )
    return found


def check_train_source(config: Config, also_read: Sequence[str | None] = ()) -> list[str]:
    """The training source's own rules, and the flags of sources read neither for training nor for `also_read`
    (validation sets) given for this run: refused or announced (Source.refuse_elsewhere). Returns the notices."""
    data = config[DataOptions]
    if data.train_data is None and data.dataset_type != "synthetic":
        raise UsageError("--train-data is required (a CSV file, parquet or datasets files, or webdataset shards)")
    chosen = source_for(data.train_data, data.dataset_type)
    read = {chosen, *(eval_source(path, data.dataset_type) for path in also_read if path)}
    what = f"--train-data {data.train_data}" if data.train_data else f"--dataset-type {data.dataset_type}"
    notices = []
    for source in SOURCES.values():
        # A source sharing the options of one read (parquet reads CSV's column flags) has them in effect.
        if source in read or source.options is None or source.options in {used.options for used in read}:
            continue
        for option in options_of(source.options):
            if config.changed(option):
                if source.refuse_elsewhere:
                    raise UsageError(f"--{option.flag} applies to {source.name} data; {what} is {chosen.name} data")
                notices.append(f"--{option.flag} has no effect: {what} is {chosen.name} data")
    return notices + chosen.check(config)


def build_train_data(
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
    return source_for(data.train_data, data.dataset_type).train_data(
        config, preprocess, tokenizer, seed=seed, rank=rank, world_size=world_size, pin_memory=pin_memory
    )


def eval_source(path: str, dataset_type: str) -> Source:
    """The source of a validation set: --dataset-type's, unless that is synthetic (then the path says)."""
    return source_for(path, "auto" if dataset_type == SYNTHETIC.name else dataset_type)


def build_eval_loader(
    config: Config,
    path: str,
    preprocess: Callable,
    tokenizer: Callable,
    *,
    rank: int,
    world_size: int,
    expected_samples: int | None = None,
) -> Any:
    """A validation set's loader: every sample once across processes, in order."""
    return eval_source(path, config[DataOptions].dataset_type).eval_loader(
        config, path, preprocess, tokenizer, rank=rank, world_size=world_size, expected_samples=expected_samples
    )

"""Parquet files and Hugging Face `datasets` folders (`Dataset.save_to_disk`) as tabular rows.

`--dataset-type parquet`, detected for a `.parquet` file, a glob of them, a folder of them, and a folder
written by `save_to_disk` (its `state.json` lists the Arrow stream files, in order). pyarrow reads them
all; `datasets` is not needed. Several files are one data set, rows in file order (sorted names; a
`save_to_disk` folder in its own order).

Columns are named by `--csv-img-key` / `--csv-caption-key`. The image column holds paths, raw bytes, or
`datasets`' Image struct {bytes, path} (the bytes where present, else the path). The caption column holds
text, text holding a JSON list of strings, or a list of strings (several captions, table.py).

Memory: parquet columns are decoded once in the main process (the image bytes too) and shared, unwritten,
by the forked loader workers; a `save_to_disk` folder is memory-mapped, so its bytes stay in the page
cache. Data larger than memory: convert it to shards (`acc-clip shards --csv PATH`).

Everything else (the epoch order, the split over processes and workers, resume, validation) is the CSV
source's (csv.py), over the same `TableDataset`; the order's fingerprint covers every file (path, size,
hash of both ends)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from acc_clip.config.parsing import Config
from acc_clip.data.csv import CsvOptions, CsvSource
from acc_clip.data.csv_file import AUTO_SEPARATOR, one_line
from acc_clip.data.source import DataOptions, file_fingerprint
from acc_clip.data.table import RowTable, TableDataset
from acc_clip.errors import DataError

STATE_NAME = "state.json"  # save_to_disk's list of data files
DATASET_DICT_NAME = "dataset_dict.json"  # a DatasetDict's folder: one subfolder per split


def _is_save_to_disk(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_NAME))


def data_files(path: str) -> list[str]:
    """The files of a parquet / `datasets` set, in row order, or one error naming the path."""
    if os.path.isdir(path):
        if _is_save_to_disk(path):
            try:
                with open(os.path.join(path, STATE_NAME), encoding="utf-8") as state:
                    names = [entry["filename"] for entry in json.load(state)["_data_files"]]
            except (ValueError, KeyError, TypeError) as error:
                raise DataError(f"{os.path.join(path, STATE_NAME)}: not a datasets state file ({error})") from None
            files = [os.path.join(path, name) for name in names]
        elif os.path.isfile(os.path.join(path, DATASET_DICT_NAME)):
            splits = sorted(name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name)))
            raise DataError(f"{path}: a DatasetDict folder; name one split's folder ({', '.join(splits)})")
        else:
            files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    elif glob.has_magic(path):
        files = sorted(glob.glob(path))
    else:
        files = [path]
    if not files:
        raise DataError(f"{path}: no parquet files there")
    for file in files:
        if not os.path.isfile(file):
            raise DataError(f"{file}: {'not a regular file' if os.path.exists(file) else 'file not found'}")
    return files


def _read_file(file: str, columns: list[str]) -> pa.Table:
    """The named columns of one file: a `save_to_disk` Arrow file memory-mapped, a parquet file decoded."""
    if file.endswith(".arrow"):
        source = pa.memory_map(file)
        try:
            table = pa.ipc.open_stream(source).read_all()  # what `datasets` writes
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
    else:
        names = pq.read_schema(file).names
        table = pq.read_table(file, columns=[name for name in columns if name in names], memory_map=True)
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        found = pq.read_schema(file).names if not file.endswith(".arrow") else table.column_names
        raise DataError(
            f"{file}: no column {', '.join(map(repr, missing))} (--csv-img-key / --csv-caption-key); "
            f"columns found: {', '.join(map(repr, found))}"
        )
    return table.select(columns)


def read_parquet_table(path: str, *, img_key: str, caption_key: str) -> RowTable:
    """The image and caption columns of every file of `path`, as one RowTable, or one error naming the file."""
    files = data_files(path)
    columns = list(dict.fromkeys((img_key, caption_key)))
    tables = []
    for file in files:
        try:
            tables.append(_read_file(file, columns))
        except (OSError, pa.ArrowException) as error:
            raise DataError(f"{file}: cannot read it as parquet or Arrow: {one_line(error)}") from None
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid as error:
        raise DataError(f"{path}: the files' columns differ in type: {one_line(error)}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    try:
        return RowTable(path, table.column(img_key), table.column(caption_key))
    except TypeError as error:
        raise DataError(f"{path}: {error} (--csv-img-key {img_key!r}, --csv-caption-key {caption_key!r})") from None


def detect_parquet(path: str) -> bool:
    if path.endswith(".parquet") or (glob.has_magic(path) and ".parquet" in path):
        return True
    return os.path.isdir(path) and (_is_save_to_disk(path) or bool(glob.glob(os.path.join(path, "*.parquet"))))


class ParquetSource(CsvSource):
    """Parquet / `datasets` rows, read as the CSV source reads its rows (see the module docstring)."""

    name = "parquet"
    options = CsvOptions  # the same column flags (--csv-img-key, --csv-caption-key)

    def detect(self, path: str) -> bool:
        return detect_parquet(path)

    def check(self, config: Config) -> list[str]:
        csv, data = config[CsvOptions], config[DataOptions]
        notices = [
            f"{flag} has no effect on parquet data (it applies to CSV files)"
            for flag, given in (
                ("--csv-separator", csv.csv_separator != AUTO_SEPARATOR),
                ("--skip-bad-rows", csv.skip_bad_rows),
            )
            if given
        ]
        if data.train_num_samples is not None:
            notices.append(
                f"--train-num-samples {data.train_num_samples} has no effect on parquet data: an epoch is "
                "every row once"
            )
        return notices

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
        csv = config[CsvOptions]
        return TableDataset(
            read_parquet_table(path, img_key=csv.csv_img_key, caption_key=csv.csv_caption_key),
            transform=transform,
            tokenizer=tokenizer,
            seed=seed,
            augment_seeded=augment_seeded,
            max_image_bytes=config[DataOptions].max_image_bytes,
            max_image_pixels=config[DataOptions].max_image_pixels,
        )

    def fingerprint(self, path: str) -> Any:
        return [file_fingerprint(file) for file in data_files(path)]


PARQUET = ParquetSource()

"""Reading the `filepath,title` CSVs that the trainer, the converter, the evaluator and coco-csv
share: one separator rule and one column reader, each with one-line errors naming the file.

The rows are parsed by pyarrow's multi-threaded CSV reader into Arrow columns (table.RowTable), only the
two columns read, every value as text: no Python object per row, so loader workers share them."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import logging
import os

import pyarrow as pa
import pyarrow.csv as pa_csv

from acc_clip.data.table import RowTable
from acc_clip.errors import DataError, UsageError

log = logging.getLogger(__name__)

AUTO_SEPARATOR = "auto"  # a tab (open_clip's default) unless the header line holds a comma and no tab


def parse_separator(text: str, flag: str) -> str:
    """Accept a literal tab or the two characters backslash-t, as a shell passes `--sep '\\t'`."""
    separator = "\t" if text in ("\\t", "tab") else text
    if len(separator) != 1 or separator in ('"', "\n", "\r"):
        raise UsageError(f"{flag} must be one character other than a quote or newline, got {text!r}")
    return separator


def detect_separator(path: str) -> str:
    """`--csv-separator auto`: open_clip's tab, unless the header line holds a comma and no tab (every CSV
    acc_clip writes, and most others), so either kind of file reads without the flag."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            header = file.readline()
    except (OSError, UnicodeDecodeError):
        return "\t"  # the reader says what is wrong with the file
    return "," if "," in header and "\t" not in header else "\t"


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _bad_rows(path: str, sep: str, header: list[str], limit: int | None) -> list[str]:
    """Where the rows whose field count differs from the header's are: "row R (line L) has F fields", R
    counting data rows (blank lines not counted) from 1. Python's csv module walks the file, only when the
    Arrow reader found such rows (up to the first `limit` of them)."""
    found: list[str] = []
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file, delimiter=sep)
        next(reader, None)
        rows = 0
        for row in reader:
            if not row:
                continue
            rows += 1
            if len(row) != len(header):
                found.append(f"row {rows} (line {reader.line_num}) has {len(row)} fields")
                if limit is not None and len(found) >= limit:
                    break
    return found


def _header(path: str, sep: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as file:
        header = next(csv.reader(file, delimiter=sep), None)
    if header is None:
        raise DataError(f"{path}: the CSV is empty (no header, no rows)")
    return header


def _release_freed_memory() -> None:
    """Hand the parse's freed buffers back to the OS (glibc keeps them in its arenas otherwise: about 60
    bytes per row, counted in every process's memory until the next large allocation reuses them)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _arrow_columns(path: str, sep: str, columns: list[str]) -> tuple[pa.Table, int]:
    """The `columns` of every data row with as many fields as the header (blank lines skipped), read by
    pyarrow's multi-threaded streaming reader in 1 MiB blocks (a low parse peak; only the two columns are
    kept), all as text; and how many rows had another field count. Buffers come from the system allocator,
    whose freed memory can be returned (`_release_freed_memory`), where mimalloc's stays mapped."""
    bad = [0]

    def count_invalid(_row) -> str:  # called under the GIL, from the reader's threads
        bad[0] += 1
        return "skip"

    pool = pa.system_memory_pool()
    reader = pa_csv.open_csv(
        path,
        memory_pool=pool,
        read_options=pa_csv.ReadOptions(use_threads=True, block_size=1 << 20),
        parse_options=pa_csv.ParseOptions(
            delimiter=sep, newlines_in_values=True, ignore_empty_lines=True, invalid_row_handler=count_invalid
        ),
        convert_options=pa_csv.ConvertOptions(
            include_columns=columns,
            column_types=dict.fromkeys(columns, pa.string()),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    table = pa.Table.from_batches(list(reader), schema=reader.schema)
    _release_freed_memory()
    return table, bad[0]


def read_csv_table(path: str, *, img_key: str, caption_key: str, sep: str, skip_bad_rows: bool = False) -> RowTable:
    """The image paths and captions of a CSV as Arrow columns (table.py), or one clear error naming the
    file (and the row). A row with more or fewer fields than the header (an unquoted separator inside a
    caption, a cut line) is an error naming the file, the row and its line, or with `skip_bad_rows` left
    out, counted and named in a warning. pandas would take the first column of such a file as its index
    and shift every value by one column, silently."""
    if not os.path.exists(path):
        raise DataError(f"{path}: CSV file not found")
    if not os.path.isfile(path):  # a FIFO would block, /dev/zero never end
        raise DataError(f"{path}: not a regular file")
    sep = detect_separator(path) if sep == AUTO_SEPARATOR else parse_separator(sep, "--csv-separator")
    try:
        header = _header(path, sep)
        missing = [key for key in (img_key, caption_key) if key not in header]
        if missing:
            raise DataError(
                f"{path}: no column {', '.join(map(repr, missing))} (separator {sep!r}); "
                f"columns found: {', '.join(map(repr, header))}"
            )
        table, bad = _arrow_columns(path, sep, list(dict.fromkeys((img_key, caption_key))))
    except (csv.Error, UnicodeDecodeError, pa.ArrowInvalid) as error:
        raise DataError(f"{path}: cannot parse the CSV with separator {sep!r}: {one_line(error)}") from None
    if bad:
        where = _bad_rows(path, sep, header, None if skip_bad_rows else 1)
        if not skip_bad_rows:
            raise DataError(
                f"{path}: {where[0] if where else f'{bad} row(s)'}, the header {len(header)} (separator {sep!r}); "
                "quote a field that holds the separator, or pass --skip-bad-rows to skip such rows"
            )
        log.warning(
            "%s: skipped %d row(s) whose field count differs from the header's %d (--skip-bad-rows): %s%s",
            path,
            bad,
            len(header),
            "; ".join(where[:5]),
            "; ..." if bad > 5 else "",
        )
    if table.num_rows == 0:
        raise DataError(f"{path}: the CSV has a header but no rows")
    return RowTable(path, table.column(img_key), table.column(caption_key))


def read_csv_columns(
    path: str, *, img_key: str, caption_key: str, sep: str, skip_bad_rows: bool = False
) -> tuple[list[str], list[str]]:
    """The image paths and captions of a CSV as Python lists (small files: labels, tests), or one clear
    error naming the file (and the row)."""
    rows = read_csv_table(path, img_key=img_key, caption_key=caption_key, sep=sep, skip_bad_rows=skip_bad_rows)
    return rows.images.column.column.to_pylist(), rows.captions.column.column.to_pylist()

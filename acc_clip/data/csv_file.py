"""Reading the `filepath,title` CSVs that the trainer, the converter, the evaluator and coco-csv
share: one separator rule and one column reader, each with one-line errors naming the file."""

from __future__ import annotations

import csv
import logging
import os

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


def _rows(path: str, sep: str, skip_bad_rows: bool) -> tuple[list[str], list[list[str]]]:
    """The header and the data rows (blank lines skipped), each data row with as many fields as the
    header: a row with more or fewer (an unquoted separator inside a caption, a cut line) is an error
    naming the file, the row and its line, or with `skip_bad_rows` left out, counted and named in a
    warning. pandas would take the first column of such a file as its index and shift every value by
    one column, silently."""
    skipped: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file, delimiter=sep)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the CSV is empty (no header, no rows)")
            rows: list[list[str]] = []
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    where = f"row {len(rows) + len(skipped) + 1} (line {reader.line_num}) has {len(row)} fields"
                    if not skip_bad_rows:
                        raise DataError(
                            f"{path}: {where}, the header {len(header)} (separator {sep!r}); quote a "
                            "field that holds the separator, or pass --skip-bad-rows to skip such rows"
                        )
                    skipped.append(where)
                    continue
                rows.append(row)
    except (csv.Error, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot parse the CSV with separator {sep!r}: {error}") from None
    if skipped:
        log.warning(
            "%s: skipped %d row(s) whose field count differs from the header's %d (--skip-bad-rows): %s%s",
            path,
            len(skipped),
            len(header),
            "; ".join(skipped[:5]),
            "; ..." if len(skipped) > 5 else "",
        )
    return header, rows


def read_csv_columns(
    path: str, *, img_key: str, caption_key: str, sep: str, skip_bad_rows: bool = False
) -> tuple[list[str], list[str]]:
    """The image paths and captions of a CSV, or one clear error naming the file (and the row)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: CSV file not found")
    if not os.path.isfile(path):  # a FIFO would block, /dev/zero never end
        raise DataError(f"{path}: not a regular file")
    sep = detect_separator(path) if sep == AUTO_SEPARATOR else parse_separator(sep, "--csv-separator")
    header, rows = _rows(path, sep, skip_bad_rows)
    missing = [key for key in (img_key, caption_key) if key not in header]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))} (separator {sep!r}); "
            f"columns found: {', '.join(map(repr, header))}"
        )
    if not rows:
        raise DataError(f"{path}: the CSV has a header but no rows")
    image, caption = header.index(img_key), header.index(caption_key)
    return [row[image] for row in rows], [row[caption] for row in rows]

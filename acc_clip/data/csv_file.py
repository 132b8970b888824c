"""Reading the `filepath,title` CSVs that the trainer, the converter, the evaluator and coco-csv
share: one separator rule and one column reader, each with one-line errors naming the file."""

from __future__ import annotations

import os

import pandas as pd

from acc_clip.errors import AccClipError


def parse_separator(text: str, flag: str) -> str:
    """Accept a literal tab or the two characters backslash-t, as a shell passes `--sep '\\t'`."""
    separator = "\t" if text in ("\\t", "tab") else text
    if len(separator) != 1 or separator in ('"', "\n", "\r"):
        raise AccClipError(f"{flag} must be one character other than a quote or newline, got {text!r}")
    return separator


def read_csv_columns(path: str, *, img_key: str, caption_key: str, sep: str) -> tuple[list[str], list[str]]:
    """The image paths and captions of a CSV, or one clear error naming the file."""
    if not os.path.isfile(path):
        raise AccClipError(f"{path}: CSV file not found")
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise AccClipError(f"{path}: the CSV is empty (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise AccClipError(f"{path}: cannot parse the CSV with separator {sep!r}: {error}") from None
    missing = [key for key in (img_key, caption_key) if key not in frame.columns]
    if missing:
        raise AccClipError(
            f"{path}: no column {', '.join(map(repr, missing))} (separator {sep!r}); "
            f"columns found: {', '.join(map(repr, map(str, frame.columns)))}"
        )
    if len(frame) == 0:
        raise AccClipError(f"{path}: the CSV has a header but no rows")
    return frame[img_key].tolist(), frame[caption_key].tolist()

"""COCO captions JSON -> `filepath,title` CSV, one row per caption (replaces the vendor's create_coco_csv.py).

Rows follow the annotation file: images in its order, then each image's captions in theirs, so the
output is deterministic. Image paths are absolute. Images missing on disk, images without
captions and empty captions are skipped and counted. The CSV is written to a temporary file
beside the target and moved into place, so bad input never leaves a half-written or clobbered CSV.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

import pandas as pd

from acc_clip.data.csv_file import parse_separator
from acc_clip.errors import DataError, ResourceError, UsageError
from acc_clip.io.atomic import write_atomically


def clean_caption(caption: str) -> str:
    """Newlines (and the spaces around them) become one space; surrounding whitespace goes."""
    return re.sub(r"\s*[\r\n]+\s*", " ", caption).strip()


def load_annotations(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"coco-csv: annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except json.JSONDecodeError as error:
        raise DataError(
            f"coco-csv: {path}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    except UnicodeDecodeError as error:
        raise DataError(f"coco-csv: {path}: not UTF-8 text at byte {error.start}") from None
    if not isinstance(document, dict):
        raise DataError(f"coco-csv: {path}: expected a JSON object at the top level")
    for key in ("images", "annotations"):
        if key not in document:
            raise DataError(f"coco-csv: {path}: missing key '{key}'")
        if not isinstance(document[key], list):
            raise DataError(f"coco-csv: {path}: '{key}' must be a list")
    return document


def require(entry: Any, key: str, where: str, path: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"coco-csv: {path}: {where} has no key '{key}'")
    return entry[key]


def captions_by_image(document: dict[str, Any], path: str) -> dict[Any, list[Any]]:
    """image id -> its raw captions, in annotation-file order."""
    grouped: dict[Any, list[Any]] = {}
    for number, annotation in enumerate(document["annotations"]):
        where = f"annotations[{number}]"
        image_id = require(annotation, "image_id", where, path)
        caption = require(annotation, "caption", where, path)
        if caption is not None and not isinstance(caption, str):
            raise DataError(f"coco-csv: {path}: {where} 'caption' is not a string")
        grouped.setdefault(image_id, []).append(caption)
    return grouped


def write_csv_atomically(frame: pd.DataFrame, out_csv: str, sep: str) -> None:
    folder = os.path.dirname(os.path.abspath(out_csv))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ResourceError(f"coco-csv: cannot write {out_csv}: {error.strerror or error}") from None
    write_atomically(out_csv, lambda partial: frame.to_csv(partial, index=False, sep=sep))


def create_coco_csv(annotations: str, images_dir: str, out_csv: str, sep: str = ",") -> dict[str, int]:
    """Write `out_csv` (columns filepath, title) and return the counts of what was written and skipped."""
    sep = parse_separator(sep, "coco-csv: --sep")
    document = load_annotations(annotations)
    if not os.path.isdir(images_dir):
        raise UsageError(f"coco-csv: images folder not found: {images_dir}")
    grouped = captions_by_image(document, annotations)
    images_root = os.path.abspath(images_dir)
    counts = {
        "rows": 0,
        "images": 0,
        "images_missing": 0,
        "images_without_captions": 0,
        "empty_captions": 0,
        "captions_of_unknown_images": 0,
    }
    filepaths: list[str] = []
    titles: list[str] = []
    known_ids = set()
    for number, image in enumerate(document["images"]):
        where = f"images[{number}]"
        image_id = require(image, "id", where, annotations)
        file_name = require(image, "file_name", where, annotations)
        known_ids.add(image_id)
        filepath = os.path.join(images_root, file_name)
        if not os.path.isfile(filepath):
            counts["images_missing"] += 1
            continue
        captions = grouped.get(image_id, [])
        if not captions:
            counts["images_without_captions"] += 1
            continue
        rows_before = len(titles)
        for caption in captions:
            title = clean_caption(caption or "")
            if not title:
                counts["empty_captions"] += 1
                continue
            filepaths.append(filepath)
            titles.append(title)
        counts["images"] += len(titles) > rows_before
    counts["captions_of_unknown_images"] = sum(
        len(captions) for image_id, captions in grouped.items() if image_id not in known_ids
    )
    counts["rows"] = len(titles)
    if not titles:
        raise DataError(f"coco-csv: {annotations}: no rows to write ({summary(counts)}); {out_csv} left as it was")
    write_csv_atomically(pd.DataFrame({"filepath": filepaths, "title": titles}), out_csv, sep)
    return counts


def summary(counts: dict[str, int]) -> str:
    return (
        f"{counts['rows']} rows for {counts['images']} images; skipped: "
        f"{counts['images_missing']} images missing on disk, "
        f"{counts['images_without_captions']} images without captions, "
        f"{counts['empty_captions']} empty captions, "
        f"{counts['captions_of_unknown_images']} captions of images not listed"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acc-clip coco-csv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="COCO captions JSON, e.g. captions_train2017.json")
    parser.add_argument("--images-dir", required=True, help="folder holding the images, e.g. train2017")
    parser.add_argument("--out", required=True, help="CSV to write (replaced only when the new one is complete)")
    parser.add_argument("--sep", default=",", help="field separator (default ','; '\\t' for tab separated)")
    args = parser.parse_args(argv)
    counts = create_coco_csv(args.annotations, args.images_dir, args.out, args.sep)
    print(f"wrote {args.out}: {summary(counts)}")
    return 0

"""CSV (`filepath,title`) -> webdataset shards, and a checker for them.

Layout written under OUT:

    00000.tar 00001.tar ...     per sample KEY.jpg, KEY.txt (caption), KEY.json (source, row, size, key)
    00000_stats.json ...        per shard: samples written, rows skipped with reasons, bytes, seconds
    sizes.json                  {"00000.tar": n, ...}, what open_clip_train's get_dataset_size reads
    _conversion.json            the parameters; a rerun with other parameters is refused

Keys. KEY is the zero-padded number of the input item: the CSV data row (0-based), or with
--group-by-image the number of the distinct image in order of first appearance. A skipped item
leaves a gap, so a key never depends on what happened to other rows, and shard i always covers
items [i*N, (i+1)*N). That is what makes shards independent units of work: any number of processes
writes the same bytes.

Resume. A shard is written to `00000.tar.tmp`, renamed, and only then gets its `_stats.json`
(the completion mark). A rerun skips shards with a mark whose size matches and redoes the rest.
Tar members have fixed mtime/owner/mode, so shards are byte-identical to an uninterrupted run
(the stats files differ only in "seconds").

Images. Copy mode (default) stores JPEG bytes untouched after a cheap check (acc_clip/jpeg.py):
the marker segments must walk from start-of-image to the first scan, the start-of-frame gives the
size, and an end-of-image marker must follow the first scan. That catches truncated and garbage
files in microseconds instead of the ~2.5 ms a decode costs (entropy-data corruption inside a
complete file is left to `shards verify`, which decodes everything); files the walk cannot size go
through PIL. Non-JPEG sources are decoded and re-encoded as JPEG at --quality. --resize S scales the shorter
side to S (bicubic, with libjpeg's DCT downscaling first when the image is at least twice too large) and re-encodes at
--quality. EXIF orientation is not applied, as open_clip's loader does not apply it either.

Parts (--part I/N, e.g. a SLURM array of N tasks, I = $SLURM_ARRAY_TASK_ID): N processes, on any machines
sharing OUT, each convert shards [I*S//N, (I+1)*S//N) of the S shards one run makes, with the same keys and
bytes, since shard i always covers items [i*n, (i+1)*n). Parts need --samples-per-shard (the automatic size
reads images, which one machine may fail to read and another not). Each part writes its shards, their stats,
and last `_part_I_of_N.json` ({shard: count} of its shards); whichever part finds every shard of the set
complete after its own writes sizes.json (the last to finish always does; two finishing together write the
same bytes, atomically). `shards verify OUT` checks every part's record and every shard.

Shard size. --samples-per-shard defaults to what makes a shard about 256 MB, from the encoded size
of the first few usable images (clamped to 100..100000); the value is stored in _conversion.json
and reused on rerun.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, cast

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from acc_clip.data.csv_file import AUTO_SEPARATOR, detect_separator, parse_separator, read_csv_table
from acc_clip.data.parquet import data_files, detect_parquet, read_parquet_table
from acc_clip.data.table import RowTable
from acc_clip.errors import DataError, UsageError
from acc_clip.io import jpeg
from acc_clip.io.atomic import write_atomically
from acc_clip.io.files import MAX_IMAGE_BYTES, PIL_FORMATS, ImageFileError, file_sha256, read_image_file
from acc_clip.prep.shards.tar import finish_tar, write_member

TARGET_SHARD_BYTES = 256 * 2**20
SAMPLES_PER_SHARD_RANGE = (100, 100_000)
SIZE_PROBE_IMAGES = 16
KEY_DIGITS = 9
CONVERSION_NAME = "_conversion.json"
SIZES_NAME = "sizes.json"
FORMAT_VERSION = 1
# Re-encoding quality. 90, not 95: a re-encode above the source's own quality (COCO's and most web
# photos' are about 90) only adds bytes; at 256 px q90 shards are ~35% smaller and decode ~33% faster
# than q95, at ~1.3 dB less PSNR against the resized image (docs/shards.md).
DEFAULT_QUALITY = 90
# not_read: not a regular file (a FIFO, a device), or above --max-image-bytes
SKIP_REASONS = ("missing_file", "unreadable_file", "not_read", "corrupt_image", "empty_caption")
# Every file this module writes; anything else in OUT means the folder belongs to someone else.
# (.<16 hex digits>: a file written by several parts at once goes through a temporary name of its writer's own)
OWN_FILE = re.compile(
    r"^(\d{5,}\.tar(\.tmp)?|\d{5,}_stats\.json(\.tmp)?|"
    r"(sizes|_conversion|_part_\d+_of_\d+)\.json(\.[0-9a-f]{16})?(\.tmp)?)$"
)
PART_RECORD = re.compile(r"^_part_(\d+)_of_(\d+)\.json$")


class BadImage(Exception):
    """One source image that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Item:
    """One output sample before it is read: a CSV row, or all rows of one image with --group-by-image."""

    number: int  # becomes the key
    source: str
    rows: tuple[int, ...]
    captions: tuple[str, ...]
    data: bytes | None = None  # the image's bytes when the rows hold them (parquet), else read from `source`


@dataclass(frozen=True)
class ShardJob:
    out_dir: str
    shard: int
    items: tuple[Item, ...]
    resize: int | None
    quality: int
    grouped: bool


def shard_name(shard: int) -> str:
    return f"{shard:05d}.tar"


def stats_name(shard: int) -> str:
    return f"{shard:05d}_stats.json"


def part_record_name(part: int, parts: int) -> str:
    return f"_part_{part}_of_{parts}.json"


def parse_part(text: str) -> tuple[int, int]:
    """--part 'I/N' as (I, N), 0 <= I < N."""
    index, slash, count = text.partition("/")
    if slash and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count):
        return int(index), int(count)
    raise UsageError(f"--part {text!r}: expected I/N with 0 <= I < N, e.g. 0/4 (a SLURM array's task id / its size)")


def part_shards(num_shards: int, part: int, parts: int) -> range:
    """The shards part `part` of `parts` writes: a contiguous block, the blocks covering every shard once."""
    return range(part * num_shards // parts, (part + 1) * num_shards // parts)


def sample_key(number: int) -> str:
    return f"{number:0{KEY_DIGITS}d}"


# ---------------------------------------------------------------------------------------------
# Reading the CSV


def read_rows(path: str, *, img_key: str, caption_key: str, sep: str, skip_bad_rows: bool) -> RowTable:
    """The rows to convert: a parquet file, glob or folder (or a `datasets` save_to_disk folder), else a CSV."""
    if detect_parquet(path):
        return read_parquet_table(path, img_key=img_key, caption_key=caption_key)
    return read_csv_table(path, img_key=img_key, caption_key=caption_key, sep=sep, skip_bad_rows=skip_bad_rows)


def read_items(
    csv_path: str, *, img_key: str, caption_key: str, sep: str, group_by_image: bool, skip_bad_rows: bool = False
) -> list[Item]:
    """One item per row, or per distinct image with `group_by_image`. An image given as bytes (parquet) goes
    with its item; its `source` is then `sha256:HEX` of the bytes (no file path), which also groups rows
    holding identical bytes. A caption cell with several captions (a JSON list) gives them all."""
    rows = read_rows(csv_path, img_key=img_key, caption_key=caption_key, sep=sep, skip_bad_rows=skip_bad_rows)
    images, captions = rows.images, rows.captions
    if not group_by_image:
        return [
            Item(row, images[row], (row,), tuple(captions.choices(row)), images.bytes_of(row))
            for row in range(len(rows))
        ]
    rows_of: dict[str, list[int]] = {}
    for row in range(len(rows)):
        rows_of.setdefault(images[row], []).append(row)  # dicts keep first-appearance order
    return [
        Item(
            number,
            source,
            tuple(group),
            tuple(caption for row in group for caption in captions.choices(row)),
            images.bytes_of(group[0]),
        )
        for number, (source, group) in enumerate(rows_of.items())
    ]


def input_sha256(path: str) -> str:
    """The hash of the input: a file's own, or for several files (parquet) of their names and hashes in order."""
    if os.path.isfile(path):
        return file_sha256(path)
    files = data_files(path)
    return hashlib.sha256(json.dumps([[os.path.basename(f), file_sha256(f)] for f in files]).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# One image


def _read_source(path: str, max_bytes: int) -> bytes:
    try:
        return read_image_file(path, max_bytes)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BadImage("missing_file", f"no such file: {path}") from None
    except ImageFileError as error:
        raise BadImage("not_read", str(error)) from None
    except OSError as error:
        raise BadImage("unreadable_file", f"cannot read {path}: {error.strerror or error}") from None


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _resized(size: tuple[int, int], shorter_side: int) -> tuple[int, int]:
    scale = shorter_side / min(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def prepare_image(
    path: str, resize: int | None, quality: int, data: bytes | None = None
) -> tuple[bytes, int, int, int, int]:
    """(JPEG bytes to store, width, height, source width, source height), or BadImage. `data`: the image's
    bytes when the rows hold them (then `path` only names it)."""
    data = _read_source(path, MAX_IMAGE_BYTES) if data is None else data
    header = jpeg.read_header(data)
    if (why := jpeg.too_many_pixels(header.size)) is not None:
        raise BadImage("corrupt_image", f"{path}: {why}")
    if resize is None and header.complete and header.size is not None:
        return data, *header.size, *header.size  # copy mode's usual case: the header walk alone, no PIL
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as image:
            source_size = image.size
            is_jpeg = image.format in ("JPEG", "MPO")  # MPO: a JPEG with extra pictures appended
            if resize is None and is_jpeg:
                if not header.complete:
                    raise BadImage("corrupt_image", f"{path}: truncated JPEG (no end-of-image marker)")
                return data, *source_size, *source_size
            size = _resized(source_size, resize) if resize else source_size
            if 2 * size[0] <= source_size[0]:
                image.draft("RGB", size)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below `size`
            image.load()
            if image.mode != "RGB":
                image = image.convert("RGB")  # grey, CMYK, palette, alpha: stored as plain RGB
            if image.size != size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            return _encode_jpeg(image, quality), *size, *source_size
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadImage("corrupt_image", f"{path}: {error}") from None


# ---------------------------------------------------------------------------------------------
# One shard


def write_json_atomically(path: str, document: dict) -> None:
    write_atomically(path, json.dumps(document, indent=1, sort_keys=True) + "\n")


def write_shared_json(path: str, document: dict) -> None:
    """`write_json_atomically` for a file that parts on several machines may write at the same moment: each
    writes a temporary file of its own and renames it over `path` (they write the same content)."""
    own = f"{path}.{secrets.token_hex(8)}"
    write_json_atomically(own, document)
    os.replace(own, path)


def write_samples(tar: BinaryIO, job: ShardJob, skipped_rows: list[dict]) -> int:
    """The job's samples as tar members; returns how many were written (the rest go to `skipped_rows`)."""
    count = 0
    for item in job.items:
        captions = [c for c in item.captions if c.strip()]
        try:
            if not captions:
                raise BadImage("empty_caption", "empty caption")
            prepared = prepare_image(item.source, job.resize, job.quality, item.data)
            image, width, height, source_width, source_height = prepared
        except BadImage as bad:
            skipped_rows.append(
                {"rows": list(item.rows), "source": item.source, "reason": bad.reason, "detail": bad.detail}
            )
            continue
        key = sample_key(item.number)
        meta = {"source": item.source, "row": item.rows[0], "width": width, "height": height, "key": key}
        if job.resize:
            meta.update(source_width=source_width, source_height=source_height)
        if job.grouped:
            meta.update(rows=list(item.rows))
        if job.grouped or len(captions) > 1:  # a row's several captions too: training draws one per epoch
            meta.update(captions=captions)
        write_member(tar, key + ".jpg", image)
        write_member(tar, key + ".txt", captions[0].encode("utf-8"))
        write_member(tar, key + ".json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        count += 1
    finish_tar(tar)
    return count


def write_shard(job: ShardJob) -> dict:
    """Write one shard (atomically: `00000.tar.tmp`, then renamed) and then its stats file; returns the stats."""
    started = time.perf_counter()
    tar_path = os.path.join(job.out_dir, shard_name(job.shard))
    skipped_rows: list[dict] = []
    counts = []

    def write_tar(partial: str) -> None:
        with open(partial, "wb") as tar:
            counts.append(write_samples(tar, job, skipped_rows))

    write_atomically(tar_path, write_tar)
    stats = {
        "shard": shard_name(job.shard),
        "count": counts[0],
        "skipped": {reason: sum(r["reason"] == reason for r in skipped_rows) for reason in SKIP_REASONS},
        "skipped_rows": skipped_rows,
        "bytes": os.path.getsize(tar_path),
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomically(os.path.join(job.out_dir, stats_name(job.shard)), stats)
    return stats


def read_complete_stats(out_dir: str, shard: int) -> dict | None:
    """The stats of a shard that was finished, or None when it must be (re)written."""
    stats_path = os.path.join(out_dir, stats_name(shard))
    tar_path = os.path.join(out_dir, shard_name(shard))
    try:
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
        return stats if os.path.getsize(tar_path) == stats["bytes"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# The output folder


def _check_out_dir(out_dir: str, *, in_parts: bool = False) -> dict | None:
    """Make sure OUT is new, empty or one of our conversions; returns its _conversion.json if any. With
    `in_parts`, a folder of our files alone is ours too: another part may be writing its _conversion.json."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"{out_dir}: output path exists and is not a folder")
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    foreign = [name for name in names if not OWN_FILE.match(name)]
    if names and (foreign or (CONVERSION_NAME not in names and not in_parts)):
        example = (foreign or names)[0]
        raise UsageError(
            f"{out_dir}: output folder holds other files (e.g. {example!r}); "
            f"choose a new or empty folder (nothing was written)"
        )
    if CONVERSION_NAME not in names:
        return None
    try:
        with open(os.path.join(out_dir, CONVERSION_NAME), encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:
        raise DataError(f"{os.path.join(out_dir, CONVERSION_NAME)}: unreadable ({error})") from None


def _auto_samples_per_shard(items: list[Item], resize: int | None, quality: int) -> int:
    sizes: list[int] = []
    for item in items:
        if len(sizes) == SIZE_PROBE_IMAGES:
            break
        try:
            sizes.append(len(prepare_image(item.source, resize, quality, item.data)[0]) + 3 * 512)  # + tar headers
        except BadImage:
            continue
    if not sizes:
        return 1000  # nothing readable to measure; the conversion will report why
    low, high = SAMPLES_PER_SHARD_RANGE
    return max(low, min(high, round(TARGET_SHARD_BYTES / (sum(sizes) / len(sizes)))))


# ---------------------------------------------------------------------------------------------
# Conversion


def convert_csv_to_shards(
    csv_path: str,
    out_dir: str,
    *,
    img_key: str = "filepath",
    caption_key: str = "title",
    sep: str = AUTO_SEPARATOR,
    samples_per_shard: int | None = None,
    workers: int | None = None,
    resize: int | None = None,
    quality: int = DEFAULT_QUALITY,
    group_by_image: bool = False,
    progress: bool = True,
    skip_bad_rows: bool = False,
    part: tuple[int, int] | None = None,
) -> dict:
    """Convert a CSV of image paths and captions into shards under `out_dir` (see the module
    docstring). `samples_per_shard=None`: about 256 MB per shard; `workers=None`: all cores; `part`:
    (I, N), this process's part of the shards (--part I/N). Returns totals of the shards this call
    covers: shards, samples, skipped (by reason), shards_reused, bytes, seconds; and sizes_written."""
    started = time.perf_counter()
    if part is not None and samples_per_shard is None:
        raise UsageError(
            "--part needs --samples-per-shard: every part must cut the rows into the same shards, and the "
            "automatic size reads images that one machine may fail to read and another not"
        )
    if samples_per_shard is not None and samples_per_shard < 1:
        raise UsageError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be 0 (all cores) or more, got {workers}")
    if resize is not None and resize < 1:
        raise UsageError(f"--resize must be at least 1 pixel, got {resize}")
    if not 1 <= quality <= 100:
        raise UsageError(f"--quality must be in 1..100, got {quality}")
    previous = _check_out_dir(out_dir, in_parts=part is not None)
    # Recorded as the character the file used, so an `auto` conversion resumes one given the separator.
    sep = detect_separator(csv_path) if sep == AUTO_SEPARATOR else parse_separator(sep, "--csv-separator")
    items = read_items(
        csv_path,
        img_key=img_key,
        caption_key=caption_key,
        sep=sep,
        group_by_image=group_by_image,
        skip_bad_rows=skip_bad_rows,
    )
    parameters = {
        "format_version": FORMAT_VERSION,
        "csv": os.path.abspath(csv_path),
        "csv_sha256": input_sha256(csv_path),
        "img_key": img_key,
        "caption_key": caption_key,
        "sep": sep,
        "samples_per_shard": samples_per_shard,
        "resize": resize,
        "quality": quality,
        "group_by_image": group_by_image,
        **({"skip_bad_rows": True} if skip_bad_rows else {}),  # absent when off: earlier conversions still resume
    }
    if previous is not None:
        if previous.get("parameters") != parameters:
            changed = sorted(k for k in parameters if previous.get("parameters", {}).get(k) != parameters[k])
            raise UsageError(
                f"{out_dir} holds a conversion with other parameters ({', '.join(changed)} differ); "
                f"use a new folder or the same parameters"
            )
        per_shard = int(previous["resolved_samples_per_shard"])
    else:
        per_shard = samples_per_shard or _auto_samples_per_shard(items, resize, quality)
        os.makedirs(out_dir, exist_ok=True)
        write_shared_json(
            os.path.join(out_dir, CONVERSION_NAME),
            {
                "parameters": parameters,
                "resolved_samples_per_shard": per_shard,
                "num_items": len(items),
            },
        )

    num_shards = -(-len(items) // per_shard)
    own = range(num_shards) if part is None else part_shards(num_shards, *part)
    stats_by_shard = {shard: read_complete_stats(out_dir, shard) for shard in own}
    reused = [shard for shard, stats in stats_by_shard.items() if stats is not None]
    jobs = [
        ShardJob(
            out_dir, shard, tuple(items[shard * per_shard : (shard + 1) * per_shard]), resize, quality, group_by_image
        )
        for shard, stats in stats_by_shard.items()
        if stats is None
    ]
    items_of = {shard: min(per_shard, len(items) - shard * per_shard) for shard in own}
    with tqdm(
        total=sum(items_of.values()),
        initial=sum(items_of[s] for s in reused),
        unit="img",
        desc="shards",
        disable=not progress,
    ) as bar:
        for stats in run_jobs(jobs, workers):
            stats_by_shard[int(stats["shard"].split(".")[0])] = stats
            bar.update(stats["count"] + len(stats["skipped_rows"]))

    done = cast(dict[int, dict], stats_by_shard)  # every shard of this call has its stats now
    counts = {shard_name(shard): done[shard]["count"] for shard in own}
    if part is None:
        write_json_atomically(os.path.join(out_dir, SIZES_NAME), counts)
        sizes_written = True
    else:
        record = {"part": part[0], "parts": part[1], "shards": counts}
        write_json_atomically(os.path.join(out_dir, part_record_name(*part)), record)
        sizes_written = merge_sizes_when_complete(out_dir, num_shards)
    all_stats = list(done.values())
    return {
        "out_dir": out_dir,
        "shards": len(own),
        "samples_per_shard": per_shard,
        "samples": sum(counts.values()),
        "skipped": {reason: sum(s["skipped"][reason] for s in all_stats) for reason in SKIP_REASONS},
        "shards_reused": len(reused),
        "bytes": sum(s["bytes"] for s in all_stats),
        "seconds": round(time.perf_counter() - started, 3),
        "sizes_written": sizes_written,
    }


def merge_sizes_when_complete(out_dir: str, num_shards: int) -> bool:
    """Write sizes.json from every shard's stats if every shard of the set is complete; whether it did. Each part
    calls it after its own shards' stats are written, so the last part to finish finds them all."""
    stats = [read_complete_stats(out_dir, shard) for shard in range(num_shards)]
    if any(s is None for s in stats):
        return False
    sizes = {shard_name(shard): cast(dict, s)["count"] for shard, s in enumerate(stats)}
    write_shared_json(os.path.join(out_dir, SIZES_NAME), sizes)
    return True


def run_jobs(jobs: list, workers: int | None, function=write_shard) -> Iterable[dict]:
    """Results of `function` over whole shards, in completion order, over `workers` processes."""
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        yield from map(function, jobs)
        return
    # fork where there is one: a spawned process would spend seconds re-importing torch and pandas.
    # The children only run PIL and file writes, never torch, so torch's threads in the parent do not matter.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        yield from pool.imap_unordered(function, jobs)

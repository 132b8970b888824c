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
through PIL. Non-JPEG sources are decoded and re-encoded as JPEG at --quality. --resize S scales the shorter side to S (bicubic, with
libjpeg's DCT downscaling first when the image is at least twice too large) and re-encodes at
--quality. EXIF orientation is not applied, as open_clip's loader does not apply it either.

Shard size. --samples-per-shard defaults to what makes a shard about 256 MB, from the encoded size
of the first few usable images (clamped to 100..100000); the value is stored in _conversion.json
and reused on rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from acc_clip import jpeg
from acc_clip.data.csv import read_csv_columns
from acc_clip.errors import AccClipError

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
SKIP_REASONS = ("missing_file", "unreadable_file", "corrupt_image", "empty_caption")
# Every file this module writes; anything else in OUT means the folder belongs to someone else.
OWN_FILE = re.compile(r"^(\d{5,}\.tar(\.tmp)?|\d{5,}_stats\.json(\.tmp)?|sizes\.json(\.tmp)?|_conversion\.json(\.tmp)?)$")


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


@dataclass(frozen=True)
class ShardJob:
    out_dir: str
    shard: int
    items: tuple[Item, ...]
    resize: Optional[int]
    quality: int
    grouped: bool


def shard_name(shard: int) -> str:
    return f"{shard:05d}.tar"


def stats_name(shard: int) -> str:
    return f"{shard:05d}_stats.json"


def sample_key(number: int) -> str:
    return f"{number:0{KEY_DIGITS}d}"


# ---------------------------------------------------------------------------------------------
# Reading the CSV


def read_items(csv_path: str, *, img_key: str, caption_key: str, sep: str, group_by_image: bool) -> list[Item]:
    paths, captions = read_csv_columns(csv_path, img_key=img_key, caption_key=caption_key, sep=sep)
    if not group_by_image:
        return [Item(row, path, (row,), (caption,)) for row, (path, caption) in enumerate(zip(paths, captions))]
    rows_of: dict[str, list[int]] = {}
    for row, path in enumerate(paths):
        rows_of.setdefault(path, []).append(row)  # dicts keep first-appearance order
    return [
        Item(number, path, tuple(rows), tuple(captions[row] for row in rows))
        for number, (path, rows) in enumerate(rows_of.items())
    ]


# ---------------------------------------------------------------------------------------------
# One image


def _read_source(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BadImage("missing_file", f"no such file: {path}") from None
    except OSError as error:
        raise BadImage("unreadable_file", f"cannot read {path}: {error.strerror or error}") from None


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _resized(size: tuple[int, int], shorter_side: int) -> tuple[int, int]:
    scale = shorter_side / min(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def prepare_image(path: str, resize: Optional[int], quality: int) -> tuple[bytes, int, int, int, int]:
    """(JPEG bytes to store, width, height, source width, source height), or BadImage."""
    data = _read_source(path)
    header = jpeg.read_header(data)
    if (why := jpeg.too_many_pixels(header.size)) is not None:
        raise BadImage("corrupt_image", f"{path}: {why}")
    if resize is None and header.complete and header.size is not None:
        return data, *header.size, *header.size  # copy mode's usual case: the header walk alone, no PIL
    try:
        with Image.open(io.BytesIO(data)) as image:
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


TAR_BLOCK, TAR_RECORD = 512, 20 * 512  # tar's block, and the record size an archive is padded to


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file with fixed metadata (mode 0644, owner 0, mtime 0), so
    the bytes of a shard depend on nothing but its samples. The same bytes as Python's tarfile
    writes for such a member (tested), built directly: tarfile's per-member work was over half of
    copy mode's time."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or size >= 8**11:  # the ustar fields: 100 bytes of name, 11 octal digits of size
        raise ValueError(f"tar member {name!r} of {size} bytes does not fit a ustar header")
    header = bytearray(TAR_BLOCK)
    header[0:len(encoded)] = encoded
    header[100:108] = _octal(0o644, 8)  # mode
    header[108:116] = header[116:124] = _octal(0, 8)  # uid, gid
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(0, 12)  # mtime
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"  # magic and version; device numbers stay empty for a file
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def _write_member(tar, name: str, data: bytes) -> None:
    tar.write(ustar_header(name, len(data)))
    tar.write(data)
    tar.write(bytes(-len(data) % TAR_BLOCK))


def _finish_tar(tar) -> None:
    """Two zero blocks end the archive; zeros then fill the last record, as tar and tarfile do."""
    tar.write(bytes(2 * TAR_BLOCK))
    tar.write(bytes(-tar.tell() % TAR_RECORD))


def _write_json_atomically(path: str, document: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def write_shard(job: ShardJob) -> dict:
    """Write one shard and then its stats file; returns the stats."""
    started = time.perf_counter()
    tar_path = os.path.join(job.out_dir, shard_name(job.shard))
    skipped_rows: list[dict] = []
    count = 0
    with open(tar_path + ".tmp", "wb") as tar:
        for item in job.items:
            captions = [c for c in item.captions if c.strip()]
            try:
                if not captions:
                    raise BadImage("empty_caption", "empty caption")
                image, width, height, source_width, source_height = prepare_image(item.source, job.resize, job.quality)
            except BadImage as bad:
                skipped_rows.append({"rows": list(item.rows), "source": item.source, "reason": bad.reason,
                                     "detail": bad.detail})
                continue
            key = sample_key(item.number)
            meta = {"source": item.source, "row": item.rows[0], "width": width, "height": height, "key": key}
            if job.resize:
                meta.update(source_width=source_width, source_height=source_height)
            if job.grouped:
                meta.update(rows=list(item.rows), captions=captions)
            _write_member(tar, key + ".jpg", image)
            _write_member(tar, key + ".txt", captions[0].encode("utf-8"))
            _write_member(tar, key + ".json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
            count += 1
        _finish_tar(tar)
    os.replace(tar_path + ".tmp", tar_path)
    stats = {
        "shard": shard_name(job.shard),
        "count": count,
        "skipped": {reason: sum(r["reason"] == reason for r in skipped_rows) for reason in SKIP_REASONS},
        "skipped_rows": skipped_rows,
        "bytes": os.path.getsize(tar_path),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _write_json_atomically(os.path.join(job.out_dir, stats_name(job.shard)), stats)
    return stats


def read_complete_stats(out_dir: str, shard: int) -> Optional[dict]:
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


def _csv_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_out_dir(out_dir: str) -> Optional[dict]:
    """Make sure OUT is new, empty or one of our conversions; returns its _conversion.json if any."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise AccClipError(f"{out_dir}: output path exists and is not a folder")
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    foreign = [name for name in names if not OWN_FILE.match(name)]
    if names and (foreign or CONVERSION_NAME not in names):
        example = (foreign or names)[0]
        raise AccClipError(f"{out_dir}: output folder holds other files (e.g. {example!r}); "
                           f"choose a new or empty folder (nothing was written)")
    if CONVERSION_NAME not in names:
        return None
    try:
        with open(os.path.join(out_dir, CONVERSION_NAME), encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:
        raise AccClipError(f"{os.path.join(out_dir, CONVERSION_NAME)}: unreadable ({error})") from None


def _auto_samples_per_shard(items: list[Item], resize: Optional[int], quality: int) -> int:
    sizes = []
    for item in items:
        if len(sizes) == SIZE_PROBE_IMAGES:
            break
        try:
            sizes.append(len(prepare_image(item.source, resize, quality)[0]) + 3 * 512)  # + tar headers
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
    sep: str = ",",
    samples_per_shard: Optional[int] = None,
    workers: Optional[int] = None,
    resize: Optional[int] = None,
    quality: int = DEFAULT_QUALITY,
    group_by_image: bool = False,
    progress: bool = True,
) -> dict:
    """Convert a CSV of image paths and captions into shards under `out_dir` (see the module
    docstring). `samples_per_shard=None`: about 256 MB per shard; `workers=None`: all cores.
    Returns totals: shards, samples, skipped (by reason), shards_reused, bytes, seconds."""
    started = time.perf_counter()
    if samples_per_shard is not None and samples_per_shard < 1:
        raise AccClipError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if workers is not None and workers < 0:
        raise AccClipError(f"--workers must be 0 (all cores) or more, got {workers}")
    if resize is not None and resize < 1:
        raise AccClipError(f"--resize must be at least 1 pixel, got {resize}")
    if not 1 <= quality <= 100:
        raise AccClipError(f"--quality must be in 1..100, got {quality}")
    previous = _check_out_dir(out_dir)
    items = read_items(csv_path, img_key=img_key, caption_key=caption_key, sep=sep, group_by_image=group_by_image)
    parameters = {
        "format_version": FORMAT_VERSION, "csv": os.path.abspath(csv_path), "csv_sha256": _csv_sha256(csv_path),
        "img_key": img_key, "caption_key": caption_key, "sep": sep, "samples_per_shard": samples_per_shard,
        "resize": resize, "quality": quality, "group_by_image": group_by_image,
    }
    if previous is not None:
        if previous.get("parameters") != parameters:
            changed = sorted(k for k in parameters if previous.get("parameters", {}).get(k) != parameters[k])
            raise AccClipError(f"{out_dir} holds a conversion with other parameters ({', '.join(changed)} differ); "
                               f"use a new folder or the same parameters")
        per_shard = int(previous["resolved_samples_per_shard"])
    else:
        per_shard = samples_per_shard or _auto_samples_per_shard(items, resize, quality)
        os.makedirs(out_dir, exist_ok=True)
        _write_json_atomically(os.path.join(out_dir, CONVERSION_NAME), {
            "parameters": parameters, "resolved_samples_per_shard": per_shard, "num_items": len(items),
        })

    num_shards = -(-len(items) // per_shard)
    stats_by_shard = {shard: read_complete_stats(out_dir, shard) for shard in range(num_shards)}
    reused = [shard for shard, stats in stats_by_shard.items() if stats is not None]
    jobs = [
        ShardJob(out_dir, shard, tuple(items[shard * per_shard:(shard + 1) * per_shard]), resize, quality,
                 group_by_image)
        for shard, stats in stats_by_shard.items() if stats is None
    ]
    with tqdm(total=len(items), initial=sum(min(per_shard, len(items) - s * per_shard) for s in reused),
              unit="img", desc="shards", disable=not progress) as bar:
        for stats in _run_jobs(jobs, workers):
            stats_by_shard[int(stats["shard"].split(".")[0])] = stats
            bar.update(stats["count"] + len(stats["skipped_rows"]))

    sizes = {shard_name(shard): stats_by_shard[shard]["count"] for shard in range(num_shards)}
    _write_json_atomically(os.path.join(out_dir, SIZES_NAME), sizes)
    all_stats = list(stats_by_shard.values())
    return {
        "out_dir": out_dir,
        "shards": num_shards,
        "samples_per_shard": per_shard,
        "samples": sum(sizes.values()),
        "skipped": {reason: sum(s["skipped"][reason] for s in all_stats) for reason in SKIP_REASONS},
        "shards_reused": len(reused),
        "bytes": sum(s["bytes"] for s in all_stats),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _run_jobs(jobs: list, workers: Optional[int], function=write_shard) -> Iterable[dict]:
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


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class VerifyJob:
    path: str
    expected: Optional[int]


def verify_shard(job: VerifyJob) -> dict:
    """Read every member of one shard and decode every image; returns count and problems."""
    name = os.path.basename(job.path)
    problems: list[str] = []
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(job.path, "r:") as tar:
            for member in tar:
                if member.isfile():
                    key, _, extension = member.name.partition(".")
                    samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        problems.append(f"{name}: unreadable tar ({error})")
    for key, files in samples.items():
        problems += [f"{name}: sample {key}: {p}" for p in _sample_problems(key, files)]
    if job.expected is not None and job.expected != len(samples):
        problems.append(f"{name}: {len(samples)} samples, sizes.json says {job.expected}")
    return {"shard": name, "count": len(samples), "problems": problems}


def _sample_problems(key: str, files: dict[str, bytes]) -> list[str]:
    missing = [extension for extension in ("jpg", "txt", "json") if extension not in files]
    if missing:
        return [f"no .{', .'.join(missing)}"]
    problems = []
    try:
        with Image.open(io.BytesIO(files["jpg"])) as image:
            image.load()
            size = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        problems.append(f"image does not decode ({error})")
        size = None
    try:
        caption = files["txt"].decode("utf-8")
        meta = json.loads(files["json"])
    except ValueError as error:
        return problems + [f"caption or json unreadable ({error})"]
    if not caption.strip():
        problems.append("empty caption")
    if meta.get("key") != key:
        problems.append(f"json key {meta.get('key')!r} differs")
    if size is not None and (meta.get("width"), meta.get("height")) != size:
        problems.append(f"image is {size[0]}x{size[1]}, json says {meta.get('width')}x{meta.get('height')}")
    return problems


def verify_shards(out_dir: str, *, workers: int = 1) -> dict:
    """Check every shard of `out_dir` against sizes.json and decode every image.
    Returns {"ok", "shards", "samples", "problems": [one line each]}."""
    if not os.path.isdir(out_dir):
        raise AccClipError(f"{out_dir}: no such folder")
    names = sorted(os.listdir(out_dir))
    shards = [name for name in names if re.fullmatch(r"\d{5,}\.tar", name)]
    problems = [f"{name}: unfinished shard (rerun the conversion)" for name in names if name.endswith(".tar.tmp")]
    sizes: dict = {}
    try:
        with open(os.path.join(out_dir, SIZES_NAME), encoding="utf-8") as f:
            sizes = json.load(f)
    except (OSError, ValueError) as error:
        problems.append(f"{SIZES_NAME}: missing or unreadable ({error})")
    problems += [f"{name}: listed in {SIZES_NAME} but missing" for name in sorted(set(sizes) - set(shards))]
    if not shards:
        problems.append(f"{out_dir}: no shards")
    jobs = [VerifyJob(os.path.join(out_dir, name), sizes.get(name)) for name in shards]
    results = sorted(_run_jobs(jobs, workers, verify_shard), key=lambda r: r["shard"])
    for result in results:
        problems += result["problems"]
    return {"ok": not problems, "shards": len(shards), "samples": sum(r["count"] for r in results),
            "problems": problems}


# ---------------------------------------------------------------------------------------------
# Command line


def _separator(text: str) -> str:
    return {"\\t": "\t", "tab": "\t"}.get(text, text)


def _convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="acc-clip shards", description="CSV -> webdataset shards "
                                     "(`acc-clip shards verify DIR` checks them)")
    parser.add_argument("--csv", required=True, help="CSV with an image path and a caption column")
    parser.add_argument("--out", required=True, help="output folder: new, empty, or a previous run to resume")
    parser.add_argument("--csv-img-key", default="filepath")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--csv-separator", default=",", help="',' (default), or '\\t' for tab")
    parser.add_argument("--samples-per-shard", type=int, default=None, help="default: about 256 MB per shard")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--resize", type=int, default=None, metavar="S", help="scale the shorter side to S px")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                        help=f"JPEG quality when re-encoding (default {DEFAULT_QUALITY})")
    parser.add_argument("--group-by-image", action="store_true", help="one sample per image, all its captions")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = convert_csv_to_shards(
        args.csv, args.out, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
        sep=_separator(args.csv_separator), samples_per_shard=args.samples_per_shard, workers=args.workers,
        resize=args.resize, quality=args.quality, group_by_image=args.group_by_image, progress=not args.no_progress,
    )
    skipped = ", ".join(f"{count} {reason}" for reason, count in result["skipped"].items() if count) or "none"
    print(f"{result['out_dir']}: {result['samples']} samples in {result['shards']} shards "
          f"({result['shards_reused']} reused), {result['bytes'] / 2**20:.1f} MB, skipped: {skipped}, "
          f"{result['seconds']:.1f} s")
    return 0


def _verify_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="acc-clip shards verify",
                                     description="decode every sample of every shard, check counts")
    parser.add_argument("dir")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    result = verify_shards(args.dir, workers=args.workers or os.cpu_count() or 1)
    for problem in result["problems"]:
        print(problem)
    status = "ok" if result["ok"] else f"{len(result['problems'])} problems"
    print(f"{args.dir}: {result['samples']} samples in {result['shards']} shards: {status}")
    return 0 if result["ok"] else 1


def main(argv: Optional[list[str]] = None) -> int:
    """`acc-clip shards --csv CSV --out DIR [...]` or `acc-clip shards verify DIR`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        return _verify_main(argv[1:])
    return _convert_main(argv)

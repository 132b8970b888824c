"""`acc-clip shards verify DIR`: read every shard, decode every image, check counts against sizes.json; for a
conversion (its _conversion.json) that every shard it makes is there, and for one made in parts (--part I/N)
that every part finished and its record's counts are the shards' own."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from acc_clip.errors import UsageError
from acc_clip.prep.shards.convert import CONVERSION_NAME, PART_RECORD, SIZES_NAME, run_jobs, shard_name


@dataclass(frozen=True)
class VerifyJob:
    path: str
    expected: int | None


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
                    content = tar.extractfile(member)  # a file member: never None
                    samples.setdefault(key, {})[extension] = content.read() if content is not None else b""
            end = tar.offset  # where the member after the last one would start
        if not _ends_with_end_marker(job.path, end):
            problems.append(f"{name}: cut short (no end-of-archive marker after its last member, at byte {end})")
    except (tarfile.TarError, OSError, EOFError) as error:
        problems.append(f"{name}: unreadable tar ({error})")
    for key, files in samples.items():
        problems += [f"{name}: sample {key}: {p}" for p in _sample_problems(key, files)]
    if job.expected is not None and job.expected != len(samples):
        problems.append(f"{name}: {len(samples)} samples, sizes.json says {job.expected}")
    return {"shard": name, "count": len(samples), "problems": problems}


def _ends_with_end_marker(path: str, end: int) -> bool:
    """Whether two zero blocks follow the last member, as every finished tar has. Python's tarfile reads
    a tar cut at a member boundary as a shorter archive, without a word."""
    with open(path, "rb") as file:
        file.seek(end)
        marker = file.read(2 * tarfile.BLOCKSIZE)
    return len(marker) == 2 * tarfile.BLOCKSIZE and not any(marker)


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
        raise UsageError(f"{out_dir}: no such folder")
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
    results = sorted(run_jobs(jobs, workers, verify_shard), key=lambda r: r["shard"])
    for result in results:
        problems += result["problems"]
    problems += _set_problems(out_dir, names, {r["shard"]: r["count"] for r in results})
    return {
        "ok": not problems,
        "shards": len(shards),
        "samples": sum(r["count"] for r in results),
        "problems": problems,
    }


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
        return document if isinstance(document, dict) else None
    except (OSError, ValueError):
        return None


def _set_problems(out_dir: str, names: list[str], counts: dict[str, int]) -> list[str]:
    """The whole set: every shard its conversion makes, every part's record, each record's counts."""
    problems = []
    conversion = _read_json(os.path.join(out_dir, CONVERSION_NAME))
    if conversion is not None:
        try:
            num_shards = -(-int(conversion["num_items"]) // int(conversion["resolved_samples_per_shard"]))
        except (KeyError, TypeError, ValueError):
            num_shards = 0
            problems.append(f"{CONVERSION_NAME}: unreadable")
        absent = [shard_name(i) for i in range(num_shards) if shard_name(i) not in counts]
        if absent:
            problems.append(f"{absent[0]}: missing ({len(absent)} of the {num_shards} shards of this conversion)")
    records = [(name, match) for name in names if (match := PART_RECORD.match(name))]
    for parts in sorted({int(match.group(2)) for _, match in records}):
        finished = {int(match.group(1)) for _, match in records if int(match.group(2)) == parts}
        problems += [
            f"part {i}/{parts}: not finished (no _part_{i}_of_{parts}.json)" for i in range(parts) if i not in finished
        ]
    for name, _ in records:
        record = _read_json(os.path.join(out_dir, name)) or {}
        for shard, count in (record.get("shards") or {}).items():
            if counts.get(shard, count) != count:
                problems.append(f"{name}: says {shard} holds {count} samples, it holds {counts[shard]}")
    return problems

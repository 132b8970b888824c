"""`acc-clip shards --csv CSV --out DIR [...]`, `acc-clip shards verify DIR` and `acc-clip shards index SHARDS`.
The CSV's flags are the CSV source's own (data/csv.py), as training reads them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from acc_clip.config.parsing import parse
from acc_clip.config.schema import NON_NEGATIVE, POSITIVE, REQUIRED, Domain, Section, option
from acc_clip.data.csv import CsvOptions
from acc_clip.prep.shards.convert import DEFAULT_QUALITY, convert_csv_to_shards, parse_part
from acc_clip.prep.shards.index import index_shards
from acc_clip.prep.shards.verify import verify_shards

QUALITY = Domain("within 1..100", lambda v: 1 <= v <= 100, ("0", "101"))


@dataclass
class ConvertOptions(Section):
    title: ClassVar[str] = "shards"
    csv: str = option(
        REQUIRED,
        "CSV with an image path and a caption column; or parquet files or a datasets save_to_disk folder (an image "
        "column of paths, bytes or datasets Images)",
    )
    out: str = option(REQUIRED, "output folder: new, empty, or a previous run to resume")
    samples_per_shard: int | None = option(None, "samples per shard (default: about 256 MB per shard)", domain=POSITIVE)
    # Conversion processes, not loader workers: this command's own quantity, under its historical name.
    workers: int | None = option(None, "conversion processes (default: all cores)", domain=NON_NEGATIVE)
    resize: int | None = option(None, "scale the shorter side to this many pixels", domain=POSITIVE)
    quality: int = option(DEFAULT_QUALITY, "JPEG quality when re-encoding", domain=QUALITY)
    group_by_image: bool = option(False, "one sample per image, all its captions")
    part: str | None = option(
        None,
        "I/N: write part I (0-based) of the N parts of the shard set, e.g. a SLURM array task; needs "
        "--samples-per-shard",
    )
    no_progress: bool = option(False, "no progress bar")


@dataclass
class VerifyOptions(Section):
    title: ClassVar[str] = "verify"
    dir: str = option(REQUIRED, "the shard folder", positional=True)
    workers: int | None = option(None, "processes (default: all cores)", domain=POSITIVE)


@dataclass
class IndexOptions(Section):
    title: ClassVar[str] = "index"
    shards: str = option(
        REQUIRED, "the shards as --train-data takes them: folder, brace pattern, URLs, pipe:", positional=True
    )
    out: str | None = option(None, "sizes.json to write (default: beside local shards; remote shards need it)")
    workers: int | None = option(None, "processes (default: all cores)", domain=POSITIVE)


def _convert_main(argv: list[str]) -> int:
    config = parse(
        argv,
        [ConvertOptions, CsvOptions],
        prog="acc-clip shards",
        train=False,
        description="CSV -> webdataset shards (`acc-clip shards verify DIR` checks them)",
    )
    options, csv = config[ConvertOptions], config[CsvOptions]
    result = convert_csv_to_shards(
        options.csv,
        options.out,
        img_key=csv.csv_img_key,
        caption_key=csv.csv_caption_key,
        sep=csv.csv_separator,
        samples_per_shard=options.samples_per_shard,
        workers=options.workers,
        resize=options.resize,
        quality=options.quality,
        group_by_image=options.group_by_image,
        progress=not options.no_progress,
        skip_bad_rows=csv.skip_bad_rows,
        part=None if options.part is None else parse_part(options.part),
    )
    skipped = ", ".join(f"{count} {reason}" for reason, count in result["skipped"].items() if count) or "none"
    print(
        f"{result['out_dir']}: {result['samples']} samples in {result['shards']} shards "
        f"({result['shards_reused']} reused), {result['bytes'] / 2**20:.1f} MB, skipped: {skipped}, "
        f"{result['seconds']:.1f} s"
        + ("" if options.part is None else f"; part {options.part}")
        + ("" if result["sizes_written"] else "; sizes.json is written by the last part to finish")
    )
    return 0


def _verify_main(argv: list[str]) -> int:
    options = parse(
        argv,
        [VerifyOptions],
        prog="acc-clip shards verify",
        train=False,
        description="decode every sample of every shard, check counts",
    )[VerifyOptions]
    result = verify_shards(options.dir, workers=options.workers or os.cpu_count() or 1)
    for problem in result["problems"]:
        print(problem)
    status = "ok" if result["ok"] else f"{len(result['problems'])} problems"
    print(f"{options.dir}: {result['samples']} samples in {result['shards']} shards: {status}")
    return 0 if result["ok"] else 1


def _index_main(argv: list[str]) -> int:
    options = parse(
        argv,
        [IndexOptions],
        prog="acc-clip shards index",
        train=False,
        description="count the samples of every shard (local: tar headers, remote: a full read) into sizes.json",
    )[IndexOptions]
    result = index_shards(options.shards, out=options.out, workers=options.workers)
    print(
        f"{options.shards}: {result['samples']} samples in {result['shards']} shards, in {', '.join(result['written'])}"
    )
    return 0


def main(argv: list[str]) -> int:
    """`acc-clip shards --csv CSV --out DIR [...]`, `acc-clip shards verify DIR` or `acc-clip shards index SHARDS`."""
    if argv[:1] == ["verify"]:
        return _verify_main(argv[1:])
    if argv[:1] == ["index"]:
        return _index_main(argv[1:])
    return _convert_main(argv)

"""`acc-clip shards --csv CSV --out DIR [...]` and `acc-clip shards verify DIR`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from acc_clip.data.csv_file import parse_separator
from acc_clip.prep.shards.convert import DEFAULT_QUALITY, convert_csv_to_shards
from acc_clip.prep.shards.verify import verify_shards


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
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="skip CSV rows whose field count differs from the header's (counted, named) instead of stopping")
    parser.add_argument("--group-by-image", action="store_true", help="one sample per image, all its captions")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = convert_csv_to_shards(
        args.csv, args.out, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
        sep=parse_separator(args.csv_separator, "--csv-separator"), samples_per_shard=args.samples_per_shard, workers=args.workers,
        resize=args.resize, quality=args.quality, group_by_image=args.group_by_image, progress=not args.no_progress,
        skip_bad_rows=args.skip_bad_rows,
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

#!/usr/bin/env python3
"""Peak memory and time of validation retrieval against the set's rows: acc_clip's blocked ranks against
open_clip_train's `get_clip_metrics` (the whole logit matrix and its argsort), on the same features.

    python -m benchmarks.bench_retrieval [--rows 5000 25000 100000 1000000] [--open-clip-up-to 10000]
                                         [--sample-above 25000] [--sample-queries 2048] [--threads 1]
                                         [--repeats 3] [--chunk-size N]

Each measurement runs in a fresh process: random 512-d unit features (COCO-like, 5 captions per image, so
the COCO protocol runs too), then the metrics; "above features" is the process's peak resident memory
(ru_maxrss) minus its resident memory with the features built, so it is what the metrics add. acc_clip's
run is the retrieval evaluation computes after encoding: row-protocol and COCO ranks, with the default
block (--val-retrieval-chunk-size unset) or --chunk-size (the CLIP validation loss, not timed here, is
one more pass of the same blocks in float32). open_clip's is
get_clip_metrics alone (no COCO protocol; its validation loss is a per-batch mean), up to
--open-clip-up-to rows: above that its rows x rows matrix, its argsort's int64 indices and its masks do
not fit this machine (COCO's 25k rows need about 9 GB).

Above --sample-above rows, acc_clip ranks a sample of --sample-queries queries (at least one block; both
protocols, every key) and its time is extrapolated linearly in the queries (each query costs the same: one
row of scores against every key), beside the part that does not grow with them (casting the features,
numbering the images), timed once; the memory is measured, as a block's size does not depend on how many
blocks run. Times and memory are medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

FEATURE_DIM = 512
CAPTIONS_PER_IMAGE = 5


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(side: str, rows: int, sample: int | None, chunk_size: int | None, threads: int) -> dict:
    """Runs in the child process: build features, then time the metrics; the figures as a dict."""
    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(rows)
    images = torch.nn.functional.normalize(
        torch.randn(rows // CAPTIONS_PER_IMAGE, FEATURE_DIM, generator=generator), dim=1
    )
    image_rows = images.repeat_interleave(CAPTIONS_PER_IMAGE, dim=0)[:rows]
    texts = torch.nn.functional.normalize(
        image_rows + 0.8 * torch.randn(rows, FEATURE_DIM, generator=generator) / FEATURE_DIM**0.5, dim=1
    )
    keys = [f"{row // CAPTIONS_PER_IMAGE}" for row in range(rows)]
    scale = torch.tensor(100.0)
    from open_clip_train.train import get_clip_metrics

    from acc_clip.evaluation.retrieval import Distinct, coco_ranks, default_chunk_size, pair_ranks

    def acc_clip_ranks(queries: int) -> torch.Tensor:
        images, captions = Distinct.of(keys, rows), Distinct.of(None, rows)
        i2t, _ = pair_ranks(image_rows, texts, scale, range(queries), chunk, images=images, captions=captions)
        image_queries = range(queries // CAPTIONS_PER_IMAGE)
        coco_ranks(image_rows, texts, images, captions, image_queries, range(queries), chunk)
        return i2t

    chunk = default_chunk_size(rows) if chunk_size is None else chunk_size
    # A sample holds at least one whole block, so the memory measured is a block's.
    queries = rows if side == "open_clip" else min(max(sample, chunk) if sample else rows, rows)
    fixed = 0.0
    if queries < rows:  # what does not grow with the queries: the features' casts, the images' keys
        start = time.perf_counter()
        acc_clip_ranks(0)
        fixed = time.perf_counter() - start
    before = _rss_bytes()
    start = time.perf_counter()
    if side == "open_clip":
        r1 = float(get_clip_metrics(image_rows, texts, scale)["image_to_text_R@1"])
    else:
        r1 = (acc_clip_ranks(queries) < 1).float().mean().item()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": fixed + (seconds - fixed) * rows / queries,
        "above_features": peak - before,
        "queries": queries,
        "r1": r1,
    }


def run_child(args: list[str]) -> dict:
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_retrieval", "--child", *args], capture_output=True, text=True
    )
    if child.returncode != 0:
        return {"error": child.stderr.strip().splitlines()[-1] if child.stderr.strip() else f"exit {child.returncode}"}
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[5000, 25000, 100000, 1000000])
    parser.add_argument("--open-clip-up-to", type=int, default=10000)
    parser.add_argument("--sample-above", type=int, default=25000)
    parser.add_argument("--sample-queries", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--child", nargs=5, metavar=("SIDE", "ROWS", "SAMPLE", "CHUNK", "THREADS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        side, rows, sample, chunk, threads = args.child
        figures = measure(
            side, int(rows), int(sample) or None, None if chunk == "default" else int(chunk), int(threads)
        )
        print(json.dumps(figures))
        return 0

    chunk = "default" if args.chunk_size is None else str(args.chunk_size)
    print(f"threads {args.threads}, {FEATURE_DIM}-d features, {CAPTIONS_PER_IMAGE} captions per image")
    print(f"medians of {args.repeats} runs, each in its own process")
    header = ("rows", "side", "queries", "seconds", "GB above features", "time ratio", "memory ratio")
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, (9, 9, 8, 9, 18, 10, 12))))
    for rows in args.rows:
        sample = args.sample_queries if rows > args.sample_above else 0
        results = {}
        for side in ("acc_clip", "open_clip"):
            if side == "open_clip" and rows > args.open_clip_up_to:
                continue
            runs = [
                run_child([side, str(rows), str(sample if side == "acc_clip" else 0), chunk, str(args.threads)])
                for _ in range(args.repeats)
            ]
            errors = [run["error"] for run in runs if "error" in run]
            if errors:
                print(f"{rows:>9} {side:>9} failed: {errors[0]}")
                continue
            results[side] = {
                key: statistics.median(run[key] for run in runs) for key in ("seconds", "above_features", "queries")
            }
        for side, figures in results.items():
            ratio = ""
            if side == "acc_clip" and "open_clip" in results:
                other = results["open_clip"]
                time_ratio = figures["seconds"] / other["seconds"]
                ratio = f"{time_ratio:>10.2f} {figures['above_features'] / other['above_features']:>12.2f}"
            extrapolated = "*" if figures["queries"] < rows else " "
            gigabytes = figures["above_features"] / 1e9
            seconds = f"{figures['seconds']:>8.1f}{extrapolated}"
            print(f"{rows:>9} {side:>9} {int(figures['queries']):>8} {seconds} {gigabytes:>18.2f} {ratio}")
    print("* extrapolated from the sampled queries; ratios are acc_clip / open_clip")
    return 0


if __name__ == "__main__":
    sys.exit(main())

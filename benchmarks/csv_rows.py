#!/usr/bin/env python3
"""Memory and load time of a large CSV: acc_clip's Arrow row store against open_clip_train 3.3's
`CsvDataset` (pandas, then a Python list of str per column), driven the same way.

    python -m benchmarks.csv_rows [--rows 200000,2000000] [--big] [--repeats 3] [--workers 2] [--work DIR]

For each size a CSV is made once under --work (paths of ~50 bytes, captions of ~60 bytes: 111 bytes a row).
Each measurement is a fresh Python process (nothing left from the one before) that
  1. loads the CSV: acc_clip `acc_clip.data.csv.CsvDataset`, open_clip `open_clip_train.data.CsvDataset`
     (load rate: rows / seconds of the constructor);
  2. reads every row's path and caption in --workers forked DataLoader workers (batches of 4096 indices,
     each worker reading its rows' two fields as `str`; no image is opened, on both sides), while a
     thread samples the PSS of the main process and its workers every 100 ms: the peak of that sum is
     "peak, all processes" (the load's own transient included);
  3. records each worker's PSS after its last batch ("per worker after the pass") and the growth of its
     private memory (USS) from its first batch to its last ("worker growth": flat means the rows were
     read without copying their pages).
Bytes per row: the slope of the peak between the two smallest sizes, (peak(n2) - peak(n1)) / (n2 - n1), so
what every process holds regardless of the rows (the interpreter, torch) cancels out.
Runs alternate sides; medians of --repeats are printed with the ratio acc_clip / open_clip.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [
    "a",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "dog",
    "cat",
    "man",
    "woman",
    "child",
    "red",
    "blue",
    "green",
    "old",
    "new",
    "photo",
    "picture",
    "view",
    "street",
    "house",
    "car",
    "tree",
    "river",
    "beach",
    "mountain",
    "city",
    "park",
    "table",
    "chair",
    "window",
    "light",
    "dark",
    "small",
    "large",
    "running",
]


def make_csv(path: str, rows: int, seed: int = 0) -> None:
    """`filepath,title` rows: a ~50-byte path and a ~60-byte caption each."""
    rng = random.Random(seed)
    with open(path + ".tmp", "w") as file:
        file.write("filepath,title\n")
        for start in range(0, rows, 100_000):
            lines = []
            for row in range(start, min(rows, start + 100_000)):
                caption = " ".join(rng.choice(WORDS) for _ in range(14))[:60]
                lines.append(
                    f"/data/cc12m/images/{row // 10000:05d}/{row:09d}_{rng.getrandbits(40):010x}.jpg,{caption}\n"
                )
            file.write("".join(lines))
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# One measurement (a child process)


class RowFields:
    """A dataset that reads row i's path and caption as str, and no image."""

    def __init__(self, paths, captions):
        self.paths, self.captions = paths, captions

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> int:
        return len(self.paths[index]) + len(self.captions[index])


def worker_reading(lengths: list[int]) -> tuple[int, int, int, int]:
    """What a worker reports per batch: the characters read, its pid, PSS and USS."""
    import psutil

    info = psutil.Process().memory_full_info()
    return sum(lengths), os.getpid(), info.pss, info.uss


def loader_of(side: str):
    """A function CSV -> RowFields; its modules imported here, before the clock starts."""
    if side == "acc_clip":
        from acc_clip.data.csv import CsvDataset

        def ours(path: str) -> RowFields:
            dataset = CsvDataset(path, transform=None, tokenizer=None, sep=",")
            return RowFields(dataset.filepaths, dataset.captions)

        return ours
    import logging

    from open_clip_train.data import CsvDataset as OpenClipCsvDataset

    logging.disable(logging.INFO)

    def theirs(path: str) -> RowFields:
        dataset = OpenClipCsvDataset(path, None, "filepath", "title", sep=",")
        return RowFields(dataset.images, dataset.captions)

    return theirs


def measure(side: str, path: str, workers: int) -> dict:
    import psutil
    import torch  # noqa: F401  # imported before the clock starts on both sides
    from torch.utils.data import DataLoader

    me = psutil.Process()
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_full_info().pss
            peak[0] = max(peak[0], total)
            time.sleep(0.1)

    load = loader_of(side)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    rows = load(path)
    load_seconds = time.perf_counter() - started
    loader = DataLoader(rows, batch_size=4096, num_workers=workers, collate_fn=worker_reading)
    first: dict[int, int] = {}
    last: dict[int, tuple[int, int]] = {}
    characters = 0
    for read, pid, pss, uss in loader:
        characters += read
        first.setdefault(pid, uss)
        last[pid] = (pss, uss)
    stop.set()
    sampler.join()
    return {
        "side": side,
        "rows": len(rows),
        "characters": characters,
        "load_seconds": load_seconds,
        "rows_per_second": len(rows) / load_seconds,
        "peak_pss_all": peak[0],
        "worker_pss_after": statistics.mean(pss for pss, _ in last.values()),
        "worker_uss_growth": max(last[pid][1] - first[pid] for pid in last),
    }


# ---------------------------------------------------------------------------------------------
# The comparison (the parent process)


def run_one(side: str, path: str, workers: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.csv_rows", "--one", side, path, "--workers", str(workers)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{side} on {path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def report(sizes: list[int], results: dict[tuple[str, int], list[dict]], workers: int) -> None:
    mib = 2**20
    print(f"\n{workers} loader workers; medians of {len(next(iter(results.values())))} run(s); PSS in MiB")
    print("| rows | side | load (rows/s) | peak, all processes | per worker after the pass | worker growth (USS) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for rows in sizes:
        for side in ("acc_clip", "open_clip"):
            runs = results[(side, rows)]
            print(
                f"| {rows:,} | {side} | {median_of(runs, 'rows_per_second') / 1e6:.2f} M "
                f"| {median_of(runs, 'peak_pss_all') / mib:,.0f} | {median_of(runs, 'worker_pss_after') / mib:,.0f} "
                f"| {median_of(runs, 'worker_uss_growth') / mib:,.1f} |"
            )
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[1]
        slopes = {
            side: (
                median_of(results[(side, large)], "peak_pss_all") - median_of(results[(side, small)], "peak_pss_all")
            )
            / (large - small)
            for side in ("acc_clip", "open_clip")
        }
        print(
            f"\nbytes per row, all processes (peak slope {small:,} -> {large:,} rows): acc_clip "
            f"{slopes['acc_clip']:.0f}, open_clip {slopes['open_clip']:.0f}, "
            f"ratio {slopes['acc_clip'] / slopes['open_clip']:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="200000,2000000", help="comma-separated CSV sizes")
    parser.add_argument("--big", action="store_true", help="add 12,000,000 rows (minutes; open_clip peaks at ~6 GB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "acc_clip_csv_rows"))
    parser.add_argument("--one", nargs=2, metavar=("SIDE", "CSV"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.workers)))
        return
    sizes = sorted({int(n) for n in args.rows.split(",")} | ({12_000_000} if args.big else set()))
    os.makedirs(args.work, exist_ok=True)
    results: dict[tuple[str, int], list[dict]] = {}
    for rows in sizes:
        path = os.path.join(args.work, f"rows_{rows}.csv")
        if not os.path.isfile(path):
            make_csv(path, rows)
        for repeat in range(args.repeats):
            for side in ("acc_clip", "open_clip"):
                run = run_one(side, path, args.workers)
                assert run["rows"] == rows, run
                results.setdefault((side, rows), []).append(run)
                print(f"{rows:,} rows, {side}, run {repeat + 1}: {json.dumps(run)}", flush=True)
    report(sizes, results, args.workers)


if __name__ == "__main__":
    main()

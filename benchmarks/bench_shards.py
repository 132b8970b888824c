#!/usr/bin/env python3
"""Rough speed of `acc-clip shards`: copy mode against `cp -r` of the same images, and --resize per core.

    python -m benchmarks.bench_shards [--images 300] [--repeats 3] [--keep DIR]

Makes N 640x480 JPEGs of gradients, ellipses and pixel noise (~100-120 KB each, like photos; the
demo dataset's flat shapes compress to 25-65 KB, too small for a fair MB/s), reads them once so
every timing starts from the page cache, and prints the median of --repeats runs for: `cp -r` of the
image folder, copy mode on one process, --resize 256 on one process, and --resize 256 on all cores,
each as wall time and as CPU time (this process plus its children). On a shared machine the wall
figures sink with the load; the CPU ones measure the work per core.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

# Run from a checkout without installing: the package lives one folder up.
from acc_clip.prep.shards.convert import convert_csv_to_shards  # noqa: E402


def photo_like(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image.Image:
    x, y = np.meshgrid(np.linspace(0, 1, width, dtype=np.float32), np.linspace(0, 1, height, dtype=np.float32))
    a, b, c = rng.uniform(0.3, 1.0, 3)
    base = np.stack([255 * a * x, 255 * b * y, 127 * c * (x + y)], axis=2)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = (int(v) for v in rng.integers(10, 200, 2))
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def make_images(folder: str, count: int) -> str:
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        path = os.path.join(folder, "images", f"{i:06d}.jpg")
        photo_like(rng).save(path, quality=90)
        rows.append((path, f"a synthetic photo number {i}"))
    csv_path = os.path.join(folder, "images.csv")
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "title"), *rows])
    return csv_path


def median_seconds(run, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of `run`; CPU counts this process and finished child processes, so
    it shows the work per core even when other jobs share the machine."""
    walls, cpus = [], []
    for _ in range(repeats):
        cpu_before = _cpu_seconds()
        started = time.perf_counter()
        run()
        walls.append(time.perf_counter() - started)
        cpus.append(_cpu_seconds() - cpu_before)
    return statistics.median(walls), statistics.median(cpus)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="bench_shards_")
    csv_path = make_images(work, args.images)
    image_dir = os.path.join(work, "images")
    paths = sorted(os.listdir(image_dir))
    total_bytes = 0
    for name in paths:  # warm the page cache, so cp and the converter read from the same place
        with open(os.path.join(image_dir, name), "rb") as f:
            total_bytes += len(f.read())
    mb = total_bytes / 1e6
    print(
        f"{len(paths)} images 640x480, {mb:.1f} MB, {total_bytes / len(paths) / 1024:.0f} KB each; "
        f"{os.cpu_count()} cores; median of {args.repeats}"
    )

    def fresh(name: str) -> str:
        path = os.path.join(work, name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    def line(label: str, wall: float, cpu: float) -> str:
        return (
            f"{label:<34} {wall:6.3f} s wall {len(paths) / wall:6.0f} img/s {mb / wall:5.0f} MB/s | "
            f"{cpu:6.3f} s CPU {len(paths) / cpu:6.0f} img/s {mb / cpu:5.0f} MB/s per CPU second"
        )

    cp = median_seconds(lambda: subprocess.run(["cp", "-r", image_dir, fresh("cp_copy")], check=True), args.repeats)
    print(line("cp -r", *cp))

    def convert(name: str, **kwargs) -> None:
        convert_csv_to_shards(csv_path, fresh(name), samples_per_shard=100, progress=False, **kwargs)

    copy = median_seconds(lambda: convert("copy", workers=1), args.repeats)
    print(line("shards, copy, 1 process", *copy))
    print(f"  copy mode reaches {cp[0] / copy[0]:.2f} of cp's wall MB/s (target >= 0.5)")
    resize = median_seconds(lambda: convert("resize1", workers=1, resize=256), args.repeats)
    print(line("shards, --resize 256, 1 process", *resize))
    print(f"  --resize 256: {len(paths) / resize[1]:.0f} img/s per core (CPU time; target >= 150)")
    cores = os.cpu_count() or 1
    if cores > 1:
        print(
            line(
                f"shards, --resize 256, {cores} processes",
                *median_seconds(lambda: convert("resize_all", workers=cores, resize=256), args.repeats),
            )
        )
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())

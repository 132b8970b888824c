#!/usr/bin/env python3
"""Input pipeline speed: acc_clip's shard loader on `--resize 256` shards against open_clip's CSV
loader on the original 640x480 JPEGs, with the same transform and tokenizer.

    python -m benchmarks.bench_input [--images 512] [--samples 2048] [--batch-size 64] [--workers 2]
                                [--repeats 3] [--work DIR] [--stages]

Both sides decode, transform with open_clip's RN50 train transform (RandomResizedCrop to 224,
to tensor, normalize; random weights, nothing downloaded), tokenize, and collate into batches in
--workers DataLoader workers; they are built as the trainers build them:
  - acc_clip: `acc_clip.data.build_train_data` (what `acc-clip train --train-data SHARDS` runs);
  - open_clip: `open_clip_train.data.get_csv_dataset` (its CsvDataset in its DataLoader).
Runs alternate (acc_clip, open_clip, acc_clip, ...) so a change in the machine's load hits both;
medians of --repeats runs are printed as images/s of wall time, and as CPU milliseconds per
image (this process and its finished workers), which depend far less on other jobs sharing the
machine; they include starting and stopping the workers, once per epoch on both sides (~0.45 s of
CPU per worker on the 2-core development machine). `--stages` adds a one-process breakdown of where the
time goes on each side.

Images come from benchmarks/bench_shards.py's generator (gradients, ellipses, noise: ~115 KB each, like
photos); the CSV lists each of the --images files --samples / --images times (with its own caption),
so an epoch is long enough that starting the workers does not dominate, without generating
thousands of images. --work keeps images and shards for the next run. Besides the epoch's rate,
the steady rate leaves out the wait for the first batch (worker start, first reads).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from argparse import Namespace
from collections.abc import Callable, Iterable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run from a checkout without installing: the package lives one folder up, bench_shards beside us.

from acc_clip.prep.shards.convert import DEFAULT_QUALITY, convert_csv_to_shards  # noqa: E402
from benchmarks.bench_shards import make_images  # noqa: E402

RESIZE = 256


def prepare(work: str, images: int, samples: int) -> tuple[str, str]:
    """A CSV of `samples` rows over `images` 640x480 files, and the --resize 256 shards made from it;
    both reused when already there."""
    image_csv = os.path.join(work, "images.csv")
    paths: list[str] = []
    if os.path.isfile(image_csv):
        with open(image_csv, newline="") as file:
            paths = [row[0] for row in list(csv.reader(file))[1:]]
    if len(paths) != images:
        with open(make_images(work, images), newline="") as file:
            paths = [row[0] for row in list(csv.reader(file))[1:]]
    csv_path = os.path.join(work, f"train_{images}x{samples}.csv")
    if not os.path.isfile(csv_path):
        with open(csv_path + ".tmp", "w", newline="") as file:
            csv.writer(file).writerows(
                [("filepath", "title")]
                + [
                    (paths[row % len(paths)], f"a synthetic photo, row {row} of file {row % len(paths)}")
                    for row in range(samples)
                ]
            )
        os.replace(csv_path + ".tmp", csv_path)
    shard_dir = os.path.join(work, f"shards{RESIZE}_q{DEFAULT_QUALITY}_{images}x{samples}")
    per_shard = max(1, samples // 16)  # 16 shards: 8 per worker with 2 workers
    convert_csv_to_shards(csv_path, shard_dir, resize=RESIZE, samples_per_shard=per_shard, progress=False)
    for folder in (os.path.join(work, "images"), shard_dir):  # from the page cache on every run
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as file:
                file.read()
    return csv_path, shard_dir


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Epoch:
    images: int
    wall: float  # seconds from asking for the first batch to having the last
    cpu: float  # CPU seconds of this process and its workers, which start and stop inside
    first_images: int  # images in the first batch
    first_wall: float  # seconds until the first batch came

    @property
    def rate(self) -> float:
        return self.images / self.wall

    @property
    def steady_rate(self) -> float:
        return (self.images - self.first_images) / (self.wall - self.first_wall)

    @property
    def cpu_ms_per_image(self) -> float:
        return self.cpu / self.images * 1e3


def timed_epoch(batches: Iterable) -> Epoch:
    cpu_before, started, images, first = cpu_seconds(), time.perf_counter(), 0, None
    for batch in batches:
        images += len(batch[0])
        if first is None:
            first = (images, time.perf_counter() - started)
    return Epoch(images, time.perf_counter() - started, cpu_seconds() - cpu_before, *first)


def acc_clip_epoch(
    shard_dir: str, preprocess: Callable, tokenizer: Callable, batch_size: int, workers: int, epoch: int
):
    """The trainer's input path: its loader, then its normalisation of the uint8 batches (on the CPU
    here, in this process: the part a GPU would take over is counted too)."""
    from acc_clip.data import build_train_data
    from acc_clip.data.pixels import model_input, train_transform
    from acc_clip.train.config import parse_train_config

    config, _ = parse_train_config(
        ["--train-data", shard_dir, "--batch-size", str(batch_size), "--workers", str(workers)]
    )
    transform = train_transform(preprocess, decode_on_device=False, device="cpu")
    data = build_train_data(
        config, transform, tokenizer, seed=config.runtime.seed, rank=0, world_size=1, pin_memory=False
    )
    for batch in data.batches(epoch):
        yield model_input(batch.images, transform, "cpu", channels_last=False), batch.texts


def open_clip_epoch(csv_path: str, preprocess: Callable, tokenizer: Callable, batch_size: int, workers: int):
    from open_clip_train.data import get_csv_dataset

    args = Namespace(
        train_data=csv_path,
        csv_img_key="filepath",
        csv_caption_key="title",
        csv_separator=",",
        distributed=False,
        batch_size=batch_size,
        workers=workers,
    )
    return get_csv_dataset(args, preprocess, is_train=True, tokenizer=tokenizer).dataloader


# ---------------------------------------------------------------------------------------------
# Where the time goes: one process, one thread (as in a loader worker), CPU time per image.


def _called_deep(depth: int, run: Callable[[], object]) -> object:
    """`run()` called `depth` frames down: some torch calls format the caller's stack, and a loader
    worker calls the transforms about 20 frames deep."""
    return _called_deep(depth - 1, run) if depth else run()


def stage_breakdown(csv_path: str, shard_dir: str, preprocess: Callable, tokenizer: Callable, count: int) -> None:
    import pandas as pd
    import torch
    from PIL import Image

    from acc_clip.data.common import sample_seed, seeded_torch_rng
    from acc_clip.data.pixels import DECODER, decode_rgb, run_geometric, split_transform
    from acc_clip.data.wds import expand_shard_urls, read_raw_samples

    torch.set_num_threads(1)
    rows = pd.read_csv(csv_path).head(count)
    paths, captions = rows["filepath"].tolist(), rows["title"].tolist()

    def per_image(label: str, run: Callable[[int], object], items: int = count) -> list:
        started = time.process_time()
        out = [run(i) for i in range(items)]
        print(f"  {label:<52} {(time.process_time() - started) / items * 1e3:6.2f} ms")
        return out

    print(f"where the time goes, CPU ms per image, one thread, {count} images; open_clip, 640x480 files:")
    per_image("open + RN50 train transform (decodes inside)", lambda i: preprocess(Image.open(paths[i])))
    big = per_image("  decode to RGB", lambda i: Image.open(paths[i]).convert("RGB"))
    images = big
    for step in preprocess.transforms:
        images = per_image(f"  {type(step).__name__}", lambda i, step=step, images=images: step(images[i]))
    per_image("tokenize", lambda i: tokenizer([str(captions[i])])[0])

    print(f"acc_clip, --resize {RESIZE} shards:")
    started = time.process_time()
    raw = [sample for sample, _ in zip(read_raw_samples(expand_shard_urls(shard_dir)), range(count))]
    print(f"  {'read tar members':<52} {(time.process_time() - started) / len(raw) * 1e3:6.2f} ms")
    count = len(raw)
    split = split_transform(preprocess)
    small = per_image(f"decode to uint8 RGB ({DECODER})", lambda i: decode_rgb(raw[i]["jpg"]), count)
    images = small
    for step in split.geometric.transforms:
        images = per_image(
            f"{type(step).__name__} on uint8",
            lambda i, step=step, images=images: run_geometric([step], images[i]),
            count,
        )
    batch = torch.stack(images)
    started = time.process_time()
    split.to_model_input(batch, "cpu")
    print(
        f"  {'to float + Normalize (the device part; one batch)':<52} "
        f"{(time.process_time() - started) / count * 1e3:6.2f} ms"
    )

    def seed_only(i: int) -> None:
        with seeded_torch_rng(sample_seed(0, 0, i)):
            pass

    per_image("per-sample seeding (seeded_torch_rng)", seed_only, count)
    per_image(
        "  the same, 20 frames deep as in a loader worker", lambda i: _called_deep(20, lambda: seed_only(i)), count
    )
    per_image("tokenize", lambda i: tokenizer([raw[i]["txt"].decode()])[0], count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="distinct 640x480 files")
    parser.add_argument("--samples", type=int, default=2048, help="samples per epoch (CSV rows)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", help="keep images and shards in this folder (default: a temporary one)")
    parser.add_argument("--stages", action="store_true", help="also print where the time goes")
    args = parser.parse_args()

    import warnings

    import open_clip
    import torch

    # open_clip's loader asks for pinned memory, which has no meaning without a GPU
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    work = args.work or tempfile.mkdtemp(prefix="bench_input_")
    os.makedirs(work, exist_ok=True)
    csv_path, shard_dir = prepare(work, args.images, args.samples)
    _, preprocess, _ = open_clip.create_model_and_transforms("RN50")
    tokenizer = open_clip.get_tokenizer("RN50")
    with tarfile.open(os.path.join(shard_dir, "00000.tar")) as tar:
        shard_kb = statistics.mean(m.size for m in tar if m.name.endswith(".jpg")) / 1024
    source_kb = (
        statistics.mean(
            os.path.getsize(os.path.join(work, "images", n)) for n in os.listdir(os.path.join(work, "images"))
        )
        / 1024
    )
    print(
        f"{args.samples} samples over {args.images} files: 640x480 {source_kb:.0f} KB each; --resize {RESIZE} "
        f"shards {shard_kb:.0f} KB each; batch {args.batch_size}, {args.workers} workers; {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    # The trainer's compute threads on the CPU: the cores left to this process beside its workers.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - args.workers))
    runs: dict[str, list[Epoch]] = {"acc_clip": [], "open_clip": []}
    for repeat in range(args.repeats):
        runs["acc_clip"].append(
            timed_epoch(acc_clip_epoch(shard_dir, preprocess, tokenizer, args.batch_size, args.workers, epoch=repeat))
        )
        runs["open_clip"].append(
            timed_epoch(open_clip_epoch(csv_path, preprocess, tokenizer, args.batch_size, args.workers))
        )
        print(
            f"  run {repeat + 1}: "
            + "; ".join(
                f"{name} {r[-1].rate:.0f} img/s (steady {r[-1].steady_rate:.0f}), "
                f"{r[-1].cpu_ms_per_image:.2f} ms CPU/img"
                for name, r in runs.items()
            )
        )
    median = {
        name: {
            key: statistics.median(getattr(epoch, key) for epoch in r)
            for key in ("rate", "steady_rate", "cpu_ms_per_image")
        }
        for name, r in runs.items()
    }
    for name, m in median.items():
        print(
            f"{name:<10} median {m['rate']:5.0f} img/s, steady {m['steady_rate']:5.0f} img/s, "
            f"{m['cpu_ms_per_image']:5.2f} ms CPU per image"
        )
    acc, reference = median["acc_clip"], median["open_clip"]
    print(
        f"acc_clip / open_clip (target >= 3x): {acc['rate'] / reference['rate']:.2f}x images/s, "
        f"{acc['steady_rate'] / reference['steady_rate']:.2f}x steady, "
        f"{reference['cpu_ms_per_image'] / acc['cpu_ms_per_image']:.2f}x less CPU per image; "
        f"load average now {os.getloadavg()[0]:.1f}"
    )
    if args.stages:
        stage_breakdown(csv_path, shard_dir, preprocess, tokenizer, min(args.samples, 100))
    if not args.work:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())

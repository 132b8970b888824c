"""What the tests share besides fixtures (conftest.py holds those): paths and model configs, data
makers, the trainer as a subprocess, reading what a run wrote, and stand-ins for a full disk."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_RN = f"local-dir:{REPO / 'configs' / 'models' / 'tiny-rn'}"
TINY_VIT = f"local-dir:{REPO / 'configs' / 'models' / 'tiny-vit'}"
TINY_COCA = f"local-dir:{REPO / 'configs' / 'models' / 'tiny-coca'}"  # the name holds coca: the CoCa loss
# Plain SGD through the trainer's own flags (timm's "momentum" optimizer with momentum 0, no weight decay, no
# schedule, lr 1): the update is the gradient, so a gradient off by any factor shows, where AdamW would hide it.
PLAIN_SGD = ["--opt", "timm/momentum", "--momentum", "0", "--wd", "0", "--skip-scheduler", "--lr", "1"]
# The vendor's default command exactly as its README prints it (empty values print as nothing).
SEED_COMMAND = (
    "--train-data /../COCO/train_data.csv --dataset-type auto --csv-separator , --csv-img-key filepath "
    "--csv-caption-key title --logs ./logs/ --workers 4 --batch-size 64 --epochs 32 --lr 0.0005 --beta1 0.9 "
    "--beta2 0.999 --eps 1e-08 --wd 0.2 --warmup 10000 --opt adamw --lr-scheduler cosine --lr-cooldown-end 0.0 "
    "--lr-cooldown-power 1.0 --save-frequency 1 --zeroshot-frequency 2 --val-frequency 1 --precision amp "
    "--model RN50 --pretrained  --lock-image-unlocked-groups 0 --accum-freq 1 --device sdaa --report-to  "
    "--wandb-notes  --wandb-project-name open-clip --seed 0 --lock-text-unlocked-layers 0 --log-every-n-steps 100 "
    "--coca-caption-loss-weight 2.0 --coca-contrastive-loss-weight 1.0 --remote-sync-frequency 300 "
    "--remote-sync-protocol s3"
)


FLAT_IMAGES, FLAT_CAPTIONS = 64, 5


def make_flat_colour_csv(out: Path, images: int = FLAT_IMAGES, captions: int = FLAT_CAPTIONS,
                         size: tuple[int, int] = (80, 60), seed: int = 0) -> Path:
    """`images` PNGs, each one flat colour, and a `filepath,title` CSV of `captions` distinct captions
    per image (images x captions rows). Every crop of a flat image, resized, is the same flat image, so
    two trainers whose crop draws differ still see identical pixels (checked in
    tests/integration/test_parity.py)."""
    import csv
    import random

    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for image in range(images):
        rgb = tuple(rng.randrange(256) for _ in range(3))
        path = out / f"flat_{image:04d}.png"
        Image.new("RGB", size, rgb).save(path)
        words = ("dark" if sum(rgb) < 384 else "light", "reddish" if rgb[0] >= max(rgb[1:]) else
                 "greenish" if rgb[1] >= rgb[2] else "bluish")
        for k in range(captions):
            rows.append((str(path), f"a {words[0]} {words[1]} square, colour {rgb[0]} {rgb[1]} {rgb[2]}, view {k}"))
    csv_path = out / "flat.csv"
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return csv_path


SMALL_CSV_ROWS = 160


def tiny_train_args(train_csv: Path, logs: Path, name: str, *extra: str) -> list[str]:
    return ["--train-data", str(train_csv), "--csv-separator", ",", "--model", TINY_RN, "--batch-size", "16",
            "--epochs", "2", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--lr", "1e-3",
            "--warmup", "5", "--log-every-n-steps", "1", "--logs", str(logs), "--name", name,
            "--save-frequency", "0", *extra]


def run_trainer(args: list[str], *, launcher: list[str] | None = None, timeout: float = 300,
                check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m acc_clip.train ARGS` (or under `launcher`, e.g. accelerate launch) in a subprocess;
    `env`: extra environment variables."""
    command = (launcher or [sys.executable]) + ["-m", "acc_clip.train", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"trainer exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def open_clip_cosine_lr(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """open_clip_train.scheduler.cosine_lr written out: linear warm-up to base_lr over `warmup`
    steps (step s gets base_lr * (s + 1) / warmup), then half a cosine from base_lr to 0 at total_steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total_steps - warmup))) * base_lr


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as file:
        return [json.loads(line) for line in file]


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """`folder` on a tmpfs of `size` bytes ('2m'): a real full disk, ENOSPC and all. Needs the right to
    mount (root here and in CI); where that is missing the test is skipped, saying why."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here for a full disk: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder: Path, leave_bytes: int = 0) -> Path:
    """Write a filler file in `folder` until its disk has `leave_bytes` or less left; returns the file."""
    filler = folder / "filler.bin"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while (free := shutil.disk_usage(folder).free) > leave_bytes:
            os.write(descriptor, b"\0" * min(1 << 20, max(4096, free - leave_bytes)))
    except OSError:
        pass  # the disk is full
    finally:
        os.close(descriptor)
    return filler

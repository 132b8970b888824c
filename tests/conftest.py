"""Shared fixtures: a tiny COCO-shaped dataset, its CSV, tiny model configs, and a way to run the
trainer as a user does (a subprocess, so each run gets a fresh Accelerate state)."""

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    from acc_clip.prep.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "coco", num_train=64, num_val=21, size=(160, 120), seed=0, zeroshot_per_class=3)
    return root / "coco"


def _coco_csv(demo_dataset: Path, split: str) -> Path:
    from acc_clip.prep.coco_csv import create_coco_csv

    out = demo_dataset / f"{split}_data.csv"
    if not out.exists():
        create_coco_csv(str(demo_dataset / "annotations" / f"captions_{split}2017.json"),
                        str(demo_dataset / f"{split}2017"), str(out))
    return out


@pytest.fixture(scope="session")
def train_csv(demo_dataset) -> Path:
    """64 images x 5 captions = 320 rows."""
    return _coco_csv(demo_dataset, "train")


@pytest.fixture(scope="session")
def val_csv(demo_dataset) -> Path:
    """21 images x 5 captions = 105 rows."""
    return _coco_csv(demo_dataset, "val")


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


@pytest.fixture(scope="session")
def flat_csv(tmp_path_factory) -> Path:
    """64 flat-colour images x 5 captions = 320 rows, the shape of `train_csv`."""
    return make_flat_colour_csv(tmp_path_factory.mktemp("flat"))


SMALL_CSV_ROWS = 160


@pytest.fixture(scope="session")
def small_csv(train_csv, tmp_path_factory) -> Path:
    """The first 160 rows of `train_csv`: 10 steps per epoch at batch 16, for the many-run resume tests."""
    lines = train_csv.read_text().splitlines(keepends=True)
    out = tmp_path_factory.mktemp("csv") / "train160.csv"
    out.write_text("".join(lines[:SMALL_CSV_ROWS + 1]))
    return out


@pytest.fixture(scope="module")
def accelerator():
    """A CPU Accelerator for in-process tests; its global state is reset so other modules may use others."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


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


@pytest.fixture
def in_process(monkeypatch):
    """For tests that run the trainer inside the test process: train() sets up what a process sets up
    once (the root logger's handlers, SIGTERM/SIGINT handlers, torch's thread count, Accelerate's
    global state); they are put back afterwards. One compute thread: the tiny model's ops are too
    small to share, and two spinning OpenMP threads on a loaded 2-core machine made a run 9x slower."""
    import logging
    import signal

    import torch
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # with it set, train() leaves the thread count alone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    signals = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    for signum, handler in signals.items():
        signal.signal(signum, handler)
    for handler in set(root.handlers) - set(handlers):
        handler.close()  # the run's out.log
    root.handlers[:], root.level = handlers, level
    torch.set_num_threads(threads)


@pytest.fixture
def train_in_process(in_process, capsys):
    """`acc-clip train ARGS` in this process, for runs that end in a one-line error before training
    (a process start costs seconds; the code path from the command line to the error is the same).
    Returns (exit status, the stderr lines that start with 'error:')."""
    from acc_clip.cli import main

    def run(args: list[str]) -> tuple[int, list[str]]:
        status = main(["train", *args])
        return status, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]

    return run


def open_clip_cosine_lr(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """open_clip_train.scheduler.cosine_lr written out: linear warm-up to base_lr over `warmup`
    steps (step s gets base_lr * (s + 1) / warmup), then half a cosine from base_lr to 0 at total_steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total_steps - warmup))) * base_lr


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as file:
        return [json.loads(line) for line in file]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A TINY_VIT teacher with weights (seed 1) in a local-dir: folder."""
    from acc_clip.checkpoint.export import write_seeded_local_dir

    return write_seeded_local_dir(TINY_VIT, str(tmp_path_factory.mktemp("teacher") / "tiny-vit-teacher"), seed=1)


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

"""What the tests share besides fixtures (conftest.py holds those): paths and model configs, data
makers, the trainer as a subprocess, reading and comparing what runs wrote, stand-ins for a full disk,
and a CheckpointManager on a tiny model in the test process. (The scripts tests launch as processes,
and background_trainer.py's background runs, are their own modules in tests/.)"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

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


def coco_csv(demo_dataset: Path, split: str) -> Path:
    """The `filepath,title` CSV of a demo dataset's split ("train", "val"), made once."""
    from acc_clip.prep.coco_csv import create_coco_csv

    out = demo_dataset / f"{split}_data.csv"
    if not out.exists():
        create_coco_csv(
            str(demo_dataset / "annotations" / f"captions_{split}2017.json"),
            str(demo_dataset / f"{split}2017"),
            str(out),
        )
    return out


FLAT_IMAGES, FLAT_CAPTIONS = 64, 5


def make_flat_colour_csv(
    out: Path, images: int = FLAT_IMAGES, captions: int = FLAT_CAPTIONS, size: tuple[int, int] = (80, 60), seed: int = 0
) -> Path:
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
        words = (
            "dark" if sum(rgb) < 384 else "light",
            "reddish" if rgb[0] >= max(rgb[1:]) else "greenish" if rgb[1] >= rgb[2] else "bluish",
        )
        for k in range(captions):
            rows.append((str(path), f"a {words[0]} {words[1]} square, colour {rgb[0]} {rgb[1]} {rgb[2]}, view {k}"))
    csv_path = out / "flat.csv"
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return csv_path


SMALL_CSV_ROWS = 160


def without_csv_separator(args: list[str]) -> list[str]:
    """`args` less `--csv-separator X` (tiny_train_args gives one; shards have no CSV separator)."""
    at = args.index("--csv-separator")
    return args[:at] + args[at + 2 :]


def tiny_train_args(train_csv: Path, logs: Path, name: str, *extra: str) -> list[str]:
    return [
        "--train-data",
        str(train_csv),
        "--csv-separator",
        ",",
        "--model",
        TINY_RN,
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--lr",
        "1e-3",
        "--warmup",
        "5",
        "--log-every-n-steps",
        "1",
        "--logs",
        str(logs),
        "--name",
        name,
        "--save-frequency",
        "0",
        *extra,
    ]


def run_trainer(
    args: list[str],
    *,
    launcher: list[str] | None = None,
    timeout: float = 300,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python -m acc_clip.train ARGS` (or under `launcher`, e.g. accelerate launch) in a subprocess;
    `env`: extra environment variables."""
    command = (launcher or [sys.executable]) + ["-m", "acc_clip.train", *args]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"trainer exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def acc_clip_eval(*args: str, env: dict[str, str] | None = None) -> dict:
    """`acc-clip eval ARGS` in a subprocess (`env`: extra environment variables); its first JSON line (the
    first evaluation's metrics)."""
    result = subprocess.run(
        [sys.executable, "-m", "acc_clip.cli", "eval", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[0])


def zeroshot_flags(demo_dataset: Path) -> list[str]:
    """The trainer's flags for the demo dataset's zero-shot set, evaluated every epoch."""
    zeroshot = demo_dataset / "zeroshot"
    return [
        "--zeroshot-data",
        str(zeroshot),
        "--zeroshot-classnames",
        str(zeroshot / "classnames.txt"),
        "--zeroshot-templates",
        str(zeroshot / "templates.txt"),
        "--zeroshot-frequency",
        "1",
    ]


def open_clip_cosine_lr(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """open_clip_train.scheduler.cosine_lr written out: linear warm-up to base_lr over `warmup`
    steps (step s gets base_lr * (s + 1) / warmup), then half a cosine from base_lr to 0 at total_steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total_steps - warmup))) * base_lr


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as file:
        return [json.loads(line) for line in file]


def read_samples(run_dir: Path) -> list[dict]:
    """The run's samples.jsonl (trainer flag --log-samples): one record per step and process."""
    with open(run_dir / "samples.jsonl") as file:
        return [json.loads(line) for line in file]


def assert_same_training(
    resumed: Path, reference: Path, *, rows: int, epochs: int, steps_per_epoch: int, loss_tolerance: float
) -> float:
    """A resumed run trained as its uninterrupted reference (both with --log-samples): every step once,
    none missing, losses within `loss_tolerance`, the same learning rates and sample counts; no step of a
    process recorded twice, each epoch saw each of the `rows` samples exactly once, and every process
    trained on the reference's samples at every step, in the same order. Returns the largest loss
    difference."""
    got, want = read_metrics(resumed), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(epochs * steps_per_epoch))  # each step once, none missing
    assert [r["step"] for r in want] == [r["step"] for r in got]
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(got, want)]
    worst = max(differences)
    assert worst <= loss_tolerance, f"resumed losses differ from the uninterrupted run's: {differences}"
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    assert [r["samples_seen"] for r in got] == [r["samples_seen"] for r in want]

    records, reference_records = read_samples(resumed), read_samples(reference)
    assert len({(r["step"], r["rank"]) for r in records}) == len(records), "a step of a process was recorded twice"
    for epoch in range(epochs):
        seen = Counter(i for r in records if r["epoch"] == epoch for i in r["indices"])
        twice, skipped = sorted(i for i, n in seen.items() if n > 1), sorted(set(range(rows)) - set(seen))
        assert not twice, f"epoch {epoch}: samples seen twice: {twice}"
        assert not skipped, f"epoch {epoch}: samples skipped: {skipped}"

    def by_rank(samples: list[dict]) -> dict[int, list[tuple]]:  # each process's records in the order written
        result: dict[int, list[tuple]] = {}
        for r in samples:
            result.setdefault(r["rank"], []).append((r["step"], r["epoch"], r["indices"]))
        return result

    assert by_rank(records) == by_rank(reference_records)  # the same samples, in the same order
    return worst


def max_difference(a: dict, b: dict) -> float:
    """The largest |a[k] - b[k]| over two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def flip_a_bit(path: Path, offset_from_end: int = 16) -> None:
    """One bit of a tensor's bytes (the end of a safetensors file is tensor data), size unchanged."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """`folder` on a tmpfs of `size` bytes ('2m'): a real full disk, ENOSPC and all. Needs the right to
    mount (root here and in CI); where that is missing the test is skipped, saying why."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
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


# a CheckpointManager in the test process ---------------------------------------------------------


class TinyNet(torch.nn.Module):
    def __init__(self, outputs: int = 3):
        super().__init__()
        self.layer = torch.nn.Linear(4, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def make_manager_parts(run_dir: Path, *, grad_scaler: bool = False):
    """A CPU Accelerator, a prepared TinyNet and AdamW, and `manager(**settings)`, which starts a
    CheckpointManager on `run_dir` with the given settings: RunRecord fields (epochs, seed, batch_size,
    accum_freq, ...) and CheckpointOptions fields (resume, keep_checkpoints, save_frequency, ...) by name.
    Returns (accelerator, model, optimizer, manager); the caller resets Accelerate's state afterwards.

    grad_scaler: put torch's CPU GradScaler where Accelerate puts its own fp16 scaler. Accelerator builds
    one only for fp16 on a device other than the CPU (accelerator.py, `mixed_precision == "fp16" and
    self.device.type != "cpu"`), and acc_clip plans fp16 on the CPU as bf16; torch's CPU GradScaler has the
    same class and state_dict as on CUDA (scale, growth factor, backoff factor, growth interval, growth
    tracker), set as `accelerator.scaler` before `prepare`, as Accelerate does. Everything else is the real
    path: `accelerator.backward` scales the loss, the prepared optimizer steps and updates the scaler, and
    the manager saves and restores through save_state / load_state (scaler.pt) and the epoch file."""
    from accelerate import Accelerator

    from acc_clip.checkpoint.manager import CheckpointManager, CheckpointOptions, RunRecord

    accelerator = Accelerator(cpu=True)
    if grad_scaler:
        assert accelerator.scaler is None  # Accelerate makes none on the CPU, hence this one
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    net = TinyNet()
    model, optimizer = accelerator.prepare(net, torch.optim.AdamW(net.parameters(), lr=0.1))
    record_fields = {f.name for f in dataclasses.fields(RunRecord)}

    def manager(**settings) -> CheckpointManager:
        record = RunRecord(
            **{
                "name": "unit",
                "epochs": 32,
                "model": "tiny-net",
                "batch_size": 16,
                "seed": 0,
                "accum_freq": 1,
                "train_data": "unused.csv",
                **{k: v for k, v in settings.items() if k in record_fields},
            }
        )
        options = CheckpointOptions(**{k: v for k, v in settings.items() if k not in record_fields})
        saver = CheckpointManager(str(run_dir), options, record, accelerator)
        saver.steps_per_epoch = 10
        return saver

    return accelerator, model, optimizer, manager


def train_a_step(model, optimizer) -> None:
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


# A tiny CLIP for evaluation tests: 32 px ResNet, one text layer.
TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_model_dir(path: Path, embed_dim: int = 32) -> str:
    """TINY_MODEL_CFG as a local-dir: folder (no weights); returns its model name."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": {**TINY_MODEL_CFG, "embed_dim": embed_dim}, "preprocess_cfg": {}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    return f"local-dir:{path}"


def write_image(path: Path, seed: int) -> str:
    """A 36x36 PNG of 3x3 random blocks drawn from `seed`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((3, 3, 3)) * 255).astype(np.uint8).repeat(12, axis=0).repeat(12, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return str(path)


def eval_loader(csv_path: str, tiny, accelerator, batch_size: int):
    """The validation loader of `csv_path` for the `tiny` fixture's model, split over the accelerator's processes."""
    from acc_clip.data.csv import CsvDataset, build_eval_loader

    _, _, preprocess, tokenizer = tiny
    dataset = CsvDataset(csv_path, transform=preprocess, tokenizer=tokenizer, augment_seeded=False)
    return build_eval_loader(
        dataset, batch_size=batch_size, workers=0, rank=accelerator.process_index, world_size=accelerator.num_processes
    )

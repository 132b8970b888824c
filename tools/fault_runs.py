"""What tools/fault_injection.py and tools/soak.py share: the tiny trainer run they fault, its demo data,
and the comparison of a faulted-then-resumed run with an uninterrupted one (from the run folders' records:
metrics.jsonl, and samples.jsonl written under --log-samples)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the scripts run from a checkout, installed or not

MODEL = f"local-dir:{REPO / 'configs' / 'models' / 'tiny-rn'}"
# One thread per process: the same sums, so the same losses to the last bit, in every run.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def train_flags(data: Path, logs: Path, name: str, *extra: str) -> list[str]:
    """The trainer's flags for the tiny run; `extra` comes last, so it may override any of them."""
    return [
        "--train-data",
        str(data),
        "--csv-separator",
        ",",
        "--model",
        MODEL,
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
        "--save-every-n-steps",
        "3",
        "--log-samples",
        *extra,
    ]


def train_args(data: Path, logs: Path, name: str, *extra: str) -> list[str]:
    """`python -m acc_clip.train` with train_flags."""
    return [sys.executable, "-m", "acc_clip.train", *train_flags(data, logs, name, *extra)]


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**ENV, **(env or {})}, timeout=900)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {result.returncode}"


def records(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sample_count_differences(run_dir: Path, reference: Path) -> int:
    """Samples of an epoch trained a different number of times than in the reference (twice, or never)."""

    def counts(folder: Path) -> Counter:
        return Counter((r["epoch"], i) for r in records(folder, "samples.jsonl") for i in r["indices"])

    ours, theirs = counts(run_dir), counts(reference)
    return sum(abs(ours[key] - theirs[key]) for key in ours.keys() | theirs.keys())


def loss_differences(run_dir: Path, reference: Path) -> list[int]:
    """The reference's steps whose loss the run lacks or has another value for (compared with !=)."""
    losses = {r["step"]: r["loss"] for r in records(run_dir, "metrics.jsonl")}
    wanted = {r["step"]: r["loss"] for r in records(reference, "metrics.jsonl")}
    return [step for step, loss in wanted.items() if losses.get(step) != loss]


def data_lost(run_dir: Path, reference: Path) -> int:
    """Samples trained a different number of times than in the reference, plus steps whose loss differs."""
    return sample_count_differences(run_dir, reference) + len(loss_differences(run_dir, reference))


def make_data(work: Path, num_train: int = 32, size: tuple[int, int] = (160, 120)) -> Path:
    """The demo dataset's `filepath,title` CSV: `num_train` images of `size`, five captions each."""
    from acc_clip.prep.coco_csv import create_coco_csv
    from acc_clip.prep.demo_data import make_demo_data

    make_demo_data(str(work / "coco"), num_train=num_train, num_val=4, size=size, seed=0, zeroshot_per_class=1)
    full = work / "coco" / "train.csv"
    create_coco_csv(
        str(work / "coco" / "annotations" / "captions_train2017.json"), str(work / "coco" / "train2017"), str(full)
    )
    return full

#!/usr/bin/env python3
"""Train open_clip's own trainer and acc_clip side by side on the same CSV, model, seed and
hyperparameters, then compare the loss curves with `acc-clip compare-loss` and the speed.

    python -m benchmarks.parity_open_clip --train-data DATA.csv --objective clip|siglip|coca|distill \
        [--model local-dir:configs/models/tiny-rn] --batch-size 16 --epochs 2 --workers 2 --out /tmp/parity

(`python tools/parity_open_clip.py ...` is the same.) Objectives, each with both trainers' own flags:
clip (the default); siglip (`--siglip`); coca (a CoCa model, by default configs/models/tiny-coca);
distill (`--distill-model`, `--distill-pretrained`: a teacher of --model's architecture with other
weights, written under --out as a local-dir: folder, which both trainers load). A CoCa model also starts
from weights written there: open_clip leaves its decoder's projection uninitialised (whatever memory
held), so two fresh CoCa models would not start equal.

Both runs start from the same weights (both seed the RNGs with --seed before creating the model) and
visit the samples in the same order (acc_clip rebuilds open_clip's epoch order). Augmentation draws
differ: open_clip's come from per-worker streams, acc_clip's from (seed, epoch, sample), which is what
makes exact resume possible; so on real images the curves agree closely but not bit for bit.

Besides the curves it checks what the curves alone cannot: that acc_clip trained on open_clip_train's
batches (its order replayed in-process from open_clip_train's own dataset and loader, against the
samples acc_clip records with --log-samples) at open_clip_train's learning rates (the
`LR:` of every logged step of its out.log, and its scheduler's values in full precision).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path

from acc_clip.errors import AccClipError
from acc_clip.reports.compare_loss import compare_curves, two_sided_report_lines, vendor_report_lines
from acc_clip.reports.curves import read_loss_curve
from acc_clip.runtime.run_dir import LOG_FILE, METRICS_FILE, SAMPLES_FILE
from benchmarks.bench_train import acc_clip_steps, open_clip_steps, run_logged, steady_samples_per_second

REPO = Path(__file__).resolve().parents[1]


def common_flags(args: argparse.Namespace) -> list[str]:
    return [
        *getattr(args, "objective_flags", []),
        *shlex.split(args.trainer_args),
        "--train-data",
        str(args.train_data),
        "--csv-separator",
        ",",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--workers",
        str(args.workers),
        "--precision",
        args.precision,
        "--lr",
        str(args.lr),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--wd",
        "0.2",
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--pretrained",
        "",
        "--device",
        "cpu",
    ]


Row = tuple[str, str]  # (image path, caption): a CSV row as a trainer reads it


def _image_path(image) -> str:
    """Stands in for open_clip's image transform in the replay: the opened image's path."""
    return image.filename


def _captions(texts: list[str]) -> list[str]:
    """Stands in for the tokenizer in the replay: the captions themselves."""
    return texts


def open_clip_batches(args: argparse.Namespace) -> tuple[list[list[Row]], int]:
    """The rows of open_clip_train's training batches in order, replayed in-process with its own CSV
    dataset and DataLoader (`open_clip_train.data.get_csv_dataset`, the same flags), and its batches
    per epoch. Only the transform and tokenizer are replaced, by ones that return the image path and
    the caption, so each batch names its rows.

    The RNG state matches the real run: open_clip_train's `main` calls `random_seed(seed, rank)` after
    creating the model, and nothing draws from torch's global generator before the first epoch's loader
    starts (no evaluation, zero-shot or checkpoint at frequency 0). With loader workers the crops draw in
    the workers, so every epoch is replayed; with workers 0 they draw from the main generator between
    batches, so only the first batch is (the later epochs' orders depend on those draws)."""
    import warnings

    from open_clip_train.data import get_csv_dataset
    from open_clip_train.main import random_seed
    from open_clip_train.params import parse_args

    open_clip_args = parse_args(common_flags(args))
    open_clip_args.distributed = False  # what open_clip_train's init_distributed_device sets for one process
    random_seed(open_clip_args.seed, 0)
    data = get_csv_dataset(open_clip_args, _image_path, is_train=True, epoch=0, tokenizer=_captions)
    batches = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory=True without an accelerator
        for epoch in range(open_clip_args.epochs if open_clip_args.workers > 0 else 1):
            data.set_epoch(epoch)
            for paths, captions in data.dataloader:
                batches.append(list(zip(paths, captions)))
                if open_clip_args.workers == 0:
                    break
    return batches, data.dataloader.num_batches


def acc_clip_batches(run_dir: Path, train_csv: str) -> list[list[Row]]:
    """The rows acc_clip trained on, per step, from its --log-samples record."""
    import pandas as pd

    frame = pd.read_csv(train_csv, sep=",")
    rows = list(zip(map(str, frame["filepath"]), map(str, frame["title"])))
    records = [json.loads(line) for line in (run_dir / SAMPLES_FILE).read_text().splitlines() if line.strip()]
    return [[rows[i] for i in record["indices"]] for record in sorted(records, key=lambda r: r["step"])]


def first_difference(ref: list[list[Row]], new: list[list[Row]]) -> int | None:
    """The first step whose batch differs (None when all of `ref` equals the start of `new`)."""
    for step, batch in enumerate(ref):
        if step >= len(new) or new[step] != batch:
            return step
    return None


_OPEN_CLIP_LR = re.compile(r"Train Epoch: \d+ \[.*?\] .*?LR: ([0-9.]+) ")


def open_clip_logged_lrs(out_log: Path) -> dict[int, float]:
    """The `LR: x` (6 decimals) of every step open_clip_train logged, by global step."""
    lines = out_log.read_text(errors="replace").splitlines()
    lrs = [float(m.group(1)) for m in map(_OPEN_CLIP_LR.search, lines) if m]
    steps = read_loss_curve(out_log).steps
    if steps is None or len(steps) != len(lrs):
        raise AccClipError(f"{out_log}: {len(lrs)} LR values for {len(steps or [])} logged steps")
    return dict(zip(steps, lrs))


def open_clip_scheduled_lrs(args: argparse.Namespace, batches_per_epoch: int) -> list[float]:
    """open_clip_train's cosine schedule (`open_clip_train.scheduler.cosine_lr`, as its main builds it)
    for every step, in full precision."""
    import torch
    from open_clip_train.scheduler import cosine_lr

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    total_steps = batches_per_epoch * args.epochs
    schedule = cosine_lr(optimizer, args.lr, args.warmup, total_steps)
    return [schedule(step) for step in range(total_steps)]


# acc_clip with open_clip_train's arithmetic: its two fast paths that change float rounding turned off.
OPEN_CLIP_ARITHMETIC_FLAGS = ["--no-channels-last", "--no-fused-adamw"]


def acc_clip_command(args: argparse.Namespace) -> list[str]:
    # --log-samples: the samples of every step, to compare with open_clip_train's batches
    return [
        sys.executable,
        "-m",
        "acc_clip.train",
        "--log-samples",
        *(OPEN_CLIP_ARITHMETIC_FLAGS if args.open_clip_arithmetic else []),
    ]


def open_clip_command(args: argparse.Namespace, out: Path) -> list[str]:
    """open_clip_train 3.3, or with --group-args open_clip main's optimizer groups given to it by
    tests/open_clip_train_groups.py (3.3 has no layer decay), which writes them to <out>/open_clip_groups.json."""
    if not args.group_args:
        return [sys.executable, "-m", "open_clip_train.main"]
    wrapper = REPO / "tests" / "open_clip_train_groups.py"
    groups_out = str(out / "open_clip_groups.json")
    return [sys.executable, str(wrapper), *shlex.split(args.group_args), "--groups-out", groups_out, "--"]


MODELS = REPO / "configs" / "models"
OBJECTIVES = ("clip", "siglip", "coca", "distill")


def seeded_folder(model: str, folder: Path, seed: int) -> str:
    import shutil

    from acc_clip.checkpoint.export import write_seeded_local_dir

    shutil.rmtree(folder, ignore_errors=True)  # derived from (model, seed): rewritten every run
    return write_seeded_local_dir(model, str(folder), seed)


def prepare_objective(args: argparse.Namespace, out: Path) -> None:
    """Sets args.model (the objective's default when not given) and args.objective_flags: the flags
    both trainers get for the objective."""
    args.model = args.model or f"local-dir:{MODELS / ('tiny-coca' if args.objective == 'coca' else 'tiny-rn')}"
    args.objective_flags = []
    if args.objective == "siglip":
        args.objective_flags = ["--siglip"]
    elif args.objective == "coca":
        args.model = seeded_folder(args.model, out / "coca-model", args.seed)
    elif args.objective == "distill":
        teacher = seeded_folder(args.model, out / "teacher", args.seed + 1)
        # open_clip_train distils only when both flags are set; it takes a local-dir: teacher's weights from
        # its folder, acc_clip from --distill-pretrained: the same file.
        args.objective_flags = [
            "--distill-model",
            teacher,
            "--distill-pretrained",
            str(out / "teacher" / "open_clip_model.safetensors"),
        ]


def run_parity(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_objective(args, out)
    flags = common_flags(args)
    reference = out / "open_clip"
    candidate = out / "acc_clip"
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    seconds_ref = run_logged(
        [*open_clip_command(args, out), *flags, "--logs", str(out), "--name", "open_clip"],
        out / "open_clip.stdout",
        threads,
    )
    group_flags = shlex.split(args.group_args)
    seconds_new = run_logged(
        [*acc_clip_command(args), *group_flags, *flags, "--logs", str(out), "--name", "acc_clip"],
        out / "acc_clip.stdout",
        threads,
    )
    result = compare_curves(
        read_loss_curve(reference / LOG_FILE),
        read_loss_curve(candidate / METRICS_FILE),
        ema=args.ema,
        tolerance=args.tolerance,
    )

    ref_batches, batches_per_epoch = open_clip_batches(args)
    new_batches = acc_clip_batches(candidate, args.train_data)
    acc_clip_lrs = {
        record["step"]: float(record["lr"])
        for record in map(json.loads, (candidate / METRICS_FILE).read_text().splitlines())
        if "lr" in record
    }
    logged = open_clip_logged_lrs(reference / LOG_FILE)
    scheduled = open_clip_scheduled_lrs(args, batches_per_epoch)
    steps = sorted(acc_clip_lrs)
    lr = {
        "steps": steps,
        "acc_clip": [acc_clip_lrs[s] for s in steps],
        "open_clip_logged": [logged.get(s, math.nan) for s in steps],
        "open_clip_scheduled": [scheduled[s] if s < len(scheduled) else math.nan for s in steps],
    }
    skip = args.warm_steps
    batch = args.batch_size
    speed_ref = steady_samples_per_second(open_clip_steps(reference / "out.log", batch), batch, skip)
    speed_new = steady_samples_per_second(acc_clip_steps(candidate / "metrics.jsonl"), batch, skip)
    return {
        "result": result,
        "open_clip_samples_per_second": speed_ref,
        "acc_clip_samples_per_second": speed_new,
        "speed_ratio": speed_new / speed_ref,
        "open_clip_seconds": seconds_ref,
        "acc_clip_seconds": seconds_new,
        "open_clip_batches": ref_batches,
        "acc_clip_batches": new_batches,
        "first_differing_step": first_difference(ref_batches, new_batches),
        "lr": lr,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--objective", choices=OBJECTIVES, default="clip")
    parser.add_argument("--model", help="default: configs/models/tiny-coca for coca, else configs/models/tiny-rn")
    parser.add_argument(
        "--trainer-args",
        default="",
        help="more open_clip_train flags for both trainers, one string: '--force-patch-dropout 0.5'",
    )
    parser.add_argument(
        "--group-args",
        default="",
        help="open_clip main's optimizer-group flags, one string ('--image-layer-decay 0.75'): acc_clip takes them, "
        "open_clip_train 3.3 gets the same groups through tests/open_clip_train_groups.py",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.9)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument(
        "--open-clip-arithmetic",
        action="store_true",
        help="run acc_clip without channels_last and with unfused AdamW, as open_clip_train computes: "
        "on flat-colour images the curves then agree to the 4 decimals open_clip logs",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for both trainers (default: unset, each trainer's own choice)",
    )
    parser.add_argument("--warm-steps", type=int, default=3, help="steps left out of the speed medians")
    parser.add_argument("--out", default="/tmp/acc_clip_parity")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run_parity(args)
    except AccClipError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    result = report["result"]
    print("\n".join(vendor_report_lines(result) + two_sided_report_lines(result)))
    differing = report["first_differing_step"]
    print(
        f"batches: {len(report['open_clip_batches'])} of open_clip_train's replayed, "
        + ("all equal to acc_clip's" if differing is None else f"step {differing} differs from acc_clip's")
    )
    lr = report["lr"]
    worst = max(abs(a - b) / b if b else abs(a) for a, b in zip(lr["acc_clip"], lr["open_clip_scheduled"]))
    print(
        f"learning rate: largest relative difference from open_clip_train's schedule {worst:.3g} "
        f"over {len(lr['steps'])} steps"
    )
    print(
        f"samples/s (steady steps): open_clip {report['open_clip_samples_per_second']:.1f}, "
        f"acc_clip {report['acc_clip_samples_per_second']:.1f}, ratio {report['speed_ratio']:.3f}"
    )
    print(
        f"wall seconds incl. start-up: open_clip {report['open_clip_seconds']:.1f}, "
        f"acc_clip {report['acc_clip_seconds']:.1f}"
    )
    return 0 if result.passed and differing is None and worst <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())

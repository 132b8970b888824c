#!/usr/bin/env python3
"""Train open_clip's own trainer and acc_clip side by side on the same CSV, model, seed and
hyperparameters, then compare the loss curves with `acc-clip compare-loss` and the speed.

    python -m benchmarks.parity_open_clip --train-data DATA.csv --model local-dir:configs/models/tiny-rn \
        --batch-size 16 --epochs 2 --workers 2 --out /tmp/parity

Both runs start from the same weights (both seed the RNGs with --seed before creating the model) and
visit the samples in the same order (acc_clip rebuilds open_clip's epoch order). Augmentation draws
differ: open_clip's come from per-worker streams, acc_clip's from (seed, epoch, sample), which is what
makes exact resume possible; so on real images the curves agree closely but not bit for bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from acc_clip.compare_loss import compare_curves, two_sided_report_lines, vendor_report_lines  # noqa: E402
from acc_clip.curves import read_loss_curve  # noqa: E402
from acc_clip.errors import AccClipError  # noqa: E402
from benchmarks.bench_train import acc_clip_steps, open_clip_steps, run_logged, steady_samples_per_second  # noqa: E402


def common_flags(args: argparse.Namespace) -> list[str]:
    return ["--train-data", str(args.train_data), "--csv-separator", ",", "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--model", args.model, "--batch-size", str(args.batch_size),
            "--epochs", str(args.epochs), "--workers", str(args.workers), "--precision", args.precision,
            "--lr", str(args.lr), "--warmup", str(args.warmup), "--seed", str(args.seed), "--wd", "0.2",
            "--log-every-n-steps", "1", "--save-frequency", "0", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--pretrained", "", "--device", "cpu"]


def run_parity(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = common_flags(args)
    reference = out / "open_clip"
    candidate = out / "acc_clip"
    seconds_ref = run_logged([sys.executable, "-m", "open_clip_train.main", *flags, "--logs", str(out),
                              "--name", "open_clip"], out / "open_clip.stdout")
    seconds_new = run_logged([sys.executable, "-m", "acc_clip.train", *flags, "--logs", str(out),
                              "--name", "acc_clip"], out / "acc_clip.stdout")
    result = compare_curves(read_loss_curve(reference / "out.log"), read_loss_curve(candidate / "metrics.jsonl"),
                            ema=args.ema, tolerance=args.tolerance)
    skip = args.warm_steps
    batch = args.batch_size
    speed_ref = steady_samples_per_second(open_clip_steps(reference / "out.log", batch), batch, skip)
    speed_new = steady_samples_per_second(acc_clip_steps(candidate / "metrics.jsonl"), batch, skip)
    return {"result": result, "open_clip_samples_per_second": speed_ref, "acc_clip_samples_per_second": speed_new,
            "speed_ratio": speed_new / speed_ref, "open_clip_seconds": seconds_ref, "acc_clip_seconds": seconds_new}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--model", default=f"local-dir:{REPO / 'configs/models/tiny-rn'}")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.9)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--warm-steps", type=int, default=3, help="steps left out of the speed medians")
    parser.add_argument("--out", default="/tmp/acc_clip_parity")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run_parity(args)
    except AccClipError as error:
        raise SystemExit(f"error: {error}") from None
    result = report["result"]
    print("\n".join(vendor_report_lines(result) + two_sided_report_lines(result)))
    print(f"samples/s (steady steps): open_clip {report['open_clip_samples_per_second']:.1f}, "
          f"acc_clip {report['acc_clip_samples_per_second']:.1f}, ratio {report['speed_ratio']:.3f}")
    print(f"wall seconds incl. start-up: open_clip {report['open_clip_seconds']:.1f}, "
          f"acc_clip {report['acc_clip_seconds']:.1f}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())

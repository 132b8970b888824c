#!/usr/bin/env python3
"""Step time of each objective on 2 CPU processes, against open_clip_train on the same cores in the same run.

    python -m benchmarks.bench_objectives [--batch-size 16] [--steps 24] [--skip 4] [--repeats 3]
                                          [--settings clip siglip-bidir ...] [--json OUT]

Settings: clip, siglip with each --loss-dist-impl (bidir, shift, reduce, gather), coca and distill.
acc_clip runs 2 processes on the CPU (gloo), one compute thread each, batch b per process.
open_clip_train 3.3 cannot run several processes on the CPU (its DDP wrapper passes device_ids=[cpu],
which torch refuses: "DistributedDataParallel device_ids ... only work with ... GPU modules"), so it
runs one process with the same global batch 2b and two compute threads: the same work on the same
cores. Both: fp32, --workers 0, synthetic data (`--dataset-type synthetic`: the objective's cost, not JPEG
decoding), with --gather-with-grad, from the same weights: tiny-vit for clip, siglip and distill (the teacher is a
tiny-vit with other weights), tiny-coca for coca, each written to a local-dir: folder here (open_clip
leaves CoCa's decoder projection uninitialised, so a fresh CoCa could start from garbage).
acc_clip runs under `accelerate launch --config_file launch/cpu_2proc.yaml`. A run's figure is the
median step time after --skip warm-up steps (from metrics.jsonl and from out.log's samples/s); a setting's, the
median of --repeats runs, the two trainers alternating so that a change in machine load hits both. Ratios are
open_clip's step time over acc_clip's (above 1: acc_clip is faster). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from acc_clip.checkpoint.export import write_seeded_local_dir
from acc_clip.loss.siglip import DIST_IMPLS as SIGLIP_DIST_IMPLS
from benchmarks.bench_scaling import launcher
from benchmarks.bench_train import acc_clip_steps, open_clip_steps, run_logged

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "configs" / "models"
SETTINGS = ["clip", *(f"siglip-{impl}" for impl in SIGLIP_DIST_IMPLS), "coca", "distill"]


def objective_flags(setting: str, folders: dict[str, str]) -> tuple[str, list[str]]:
    """(model, flags) of a setting, the same for both trainers."""
    if setting.startswith("siglip-"):
        return folders["vit"], ["--siglip", "--loss-dist-impl", setting.split("-", 1)[1]]
    if setting == "coca":
        return folders["coca"], []
    if setting == "distill":
        teacher = folders["teacher"]
        return folders["vit"], [
            "--distill-model",
            teacher,
            "--distill-pretrained",
            os.path.join(teacher[len("local-dir:") :], "open_clip_model.safetensors"),
        ]
    return folders["vit"], []


def common_flags(args, model: str, logs: str, name: str, batch_size: int) -> list[str]:
    return [
        "--dataset-type",
        "synthetic",
        "--train-num-samples",
        str(args.steps * args.batch_size * 2),
        "--model",
        model,
        "--batch-size",
        str(batch_size),
        "--epochs",
        "1",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--gather-with-grad",
        "--lr",
        "1e-4",
        "--warmup",
        "1",
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--logs",
        logs,
        "--name",
        name,
        "--seed",
        "0",
    ]


def run_pair(args, setting: str, folders: dict[str, str], logs: str, repeat: int) -> tuple[float, float]:
    """(acc_clip, open_clip) median step seconds of one run each."""
    model, flags = objective_flags(setting, folders)
    name = f"{setting}_r{repeat}"
    run_logged(
        [
            *launcher(2),
            "-m",
            "acc_clip.train",
            *common_flags(args, model, logs, f"acc_{name}", args.batch_size),
            *flags,
        ],
        Path(logs) / f"acc_{name}.stdout",
        {"OMP_NUM_THREADS": "1"},
    )
    run_logged(
        [
            sys.executable,
            "-m",
            "open_clip_train.main",
            *common_flags(args, model, logs, f"oc_{name}", 2 * args.batch_size),
            *flags,
        ],
        Path(logs) / f"oc_{name}.stdout",
        {"OMP_NUM_THREADS": "2"},
    )
    ours = [s.batch_time for s in acc_clip_steps(Path(logs) / f"acc_{name}" / "metrics.jsonl")][args.skip :]
    theirs = [s.batch_time for s in open_clip_steps(Path(logs) / f"oc_{name}" / "out.log", args.batch_size * 2)][
        args.skip :
    ]
    if not ours or not theirs:
        raise SystemExit(f"{setting}: no steps left after skipping {args.skip}")
    return statistics.median(ours), statistics.median(theirs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--skip", type=int, default=4, help="warm-up steps left out of each run's median")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.skip >= args.steps:
        parser.error("--skip must be smaller than --steps")

    load_before, started = os.getloadavg(), time.time()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        folders = {
            "vit": write_seeded_local_dir(f"local-dir:{MODELS / 'tiny-vit'}", os.path.join(folder, "vit"), 0),
            "teacher": write_seeded_local_dir(f"local-dir:{MODELS / 'tiny-vit'}", os.path.join(folder, "teacher"), 1),
            "coca": write_seeded_local_dir(f"local-dir:{MODELS / 'tiny-coca'}", os.path.join(folder, "coca"), 0),
        }
        logs = os.path.join(folder, "logs")
        os.makedirs(logs)
        for setting in args.settings:
            pairs = [run_pair(args, setting, folders, logs, repeat) for repeat in range(args.repeats)]
            ours, theirs = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            results[setting] = {
                "acc_clip_step_s": ours,
                "open_clip_step_s": theirs,
                "runs": pairs,
                "ratio_open_clip_over_acc_clip": theirs / ours,
            }
            print(
                f"{setting:>14}: acc_clip 2x{args.batch_size} {ours * 1000:7.1f} ms/step, open_clip_train "
                f"1x{2 * args.batch_size} {theirs * 1000:7.1f} ms/step, "
                f"ratio {theirs / ours:.2f} (median of {args.repeats})",
                flush=True,
            )
    load_after = os.getloadavg()
    print(
        f"acc_clip 2 processes x batch {args.batch_size} x 1 thread; open_clip_train 1 process x batch "
        f"{2 * args.batch_size} x 2 threads; {os.cpu_count()} CPUs; load average (1/5/15 min) "
        f"{' '.join(f'{x:.1f}' for x in load_before)} before, {' '.join(f'{x:.1f}' for x in load_after)} after; "
        f"{time.time() - started:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {
                    "batch_size": args.batch_size,
                    "steps": args.steps,
                    "skip": args.skip,
                    "repeats": args.repeats,
                    "load_average_before": load_before,
                    "load_average_after": load_after,
                    "settings": results,
                },
                file,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

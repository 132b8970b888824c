#!/usr/bin/env python3
"""Samples/s of 1 process against N processes on the CPU for the same global batch, and the
data-parallel scaling efficiency.

    python -m benchmarks.bench_scaling [--processes 2] [--global-batch 32] [--steps 12] [--skip 2] [--repeats 3]
                                  [--threads-per-process 1] [--model local-dir:configs/models/tiny-vit]
                                  [--train-data CSV] [--json OUT]

Each process plays one card: it gets --threads-per-process threads, so N processes use N times the
cores of one, and perfect scaling is N times the samples/s (efficiency = samples/s(N) / (N x samples/s(1))).
Runs are the real trainer under `accelerate launch` (launch/single_card.yaml, launch/cpu_2proc.yaml
for 2 processes, else `--multi_gpu --num_processes N`), --device cpu, fp32, --workers 0,
--gather-with-grad; a run's figure is the median of its steps' samples/s from metrics.jsonl after
--skip warm-up steps, and each setting's figure the median of --repeats runs, alternating settings so
a change in machine load hits both. The load average is printed before and after: on a shared
machine the figures sink with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_csv(folder: str) -> str:
    from acc_clip.prep.coco_csv import create_coco_csv
    from acc_clip.prep.demo_data import make_demo_data

    make_demo_data(os.path.join(folder, "coco"), num_train=64, num_val=1, size=(160, 120), seed=0, zeroshot_per_class=1)
    out = os.path.join(folder, "train.csv")
    create_coco_csv(
        os.path.join(folder, "coco", "annotations", "captions_train2017.json"),
        os.path.join(folder, "coco", "train2017"),
        out,
    )
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(processes: int) -> list[str]:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    if processes == 1:
        return [accelerate, "launch", "--config_file", os.path.join(REPO, "launch", "single_card.yaml")]
    if processes == 2:
        return [
            accelerate,
            "launch",
            "--config_file",
            os.path.join(REPO, "launch", "cpu_2proc.yaml"),
            "--main_process_port",
            str(free_port()),
        ]
    return [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def run_once(args, processes: int, logs: str, name: str) -> float:
    batch = args.global_batch // processes
    command = launcher(processes) + [
        "-m",
        "acc_clip.train",
        "--train-data",
        args.train_data,
        "--csv-separator",
        ",",
        "--model",
        args.model,
        "--batch-size",
        str(batch),
        "--max-steps",
        str(args.steps),
        "--epochs",
        "100",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--gather-with-grad",
        "--warmup",
        "1",
        "--log-every-n-steps",
        str(args.steps),
        "--save-frequency",
        "0",
        "--logs",
        logs,
        "--name",
        name,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_process), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"run {name} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(logs, name, "metrics.jsonl")) as file:
        records = [json.loads(line) for line in file]
    return statistics.median(r["samples_per_second"] for r in records[args.skip :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of each run's median")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--model", default=f"local-dir:{os.path.join(REPO, 'configs', 'models', 'tiny-vit')}")
    parser.add_argument("--train-data", help="CSV (filepath,title); default: a 320-row demo set made here")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.global_batch % args.processes:
        parser.error(f"--global-batch {args.global_batch} does not split into {args.processes} processes")
    if args.skip >= args.steps:
        parser.error("--skip must be smaller than --steps")

    with tempfile.TemporaryDirectory() as folder:
        args.train_data = args.train_data or demo_csv(folder)
        load_before = os.getloadavg()
        runs: dict[int, list[float]] = {1: [], args.processes: []}
        started = time.time()
        for repeat in range(args.repeats):
            for processes in runs:
                runs[processes].append(
                    run_once(args, processes, os.path.join(folder, "logs"), f"p{processes}_r{repeat}")
                )
                print(f"repeat {repeat}: {processes} process(es): {runs[processes][-1]:.1f} samples/s", flush=True)
        load_after = os.getloadavg()

    one, many = statistics.median(runs[1]), statistics.median(runs[args.processes])
    efficiency = many / (args.processes * one)
    summary = {
        "global_batch": args.global_batch,
        "steps": args.steps,
        "skip": args.skip,
        "repeats": args.repeats,
        "threads_per_process": args.threads_per_process,
        "model": args.model,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "runs": runs,
        "samples_per_second_1": one,
        f"samples_per_second_{args.processes}": many,
        "speedup": many / one,
        "scaling_efficiency": efficiency,
        "wall_seconds": time.time() - started,
    }
    print(
        f"global batch {args.global_batch}, {os.cpu_count()} CPUs, load average (1/5/15 min) "
        f"{' '.join(f'{x:.1f}' for x in load_before)} before, {' '.join(f'{x:.1f}' for x in load_after)} after"
    )
    print(f"1 process x batch {args.global_batch}: {one:.1f} samples/s (median of {args.repeats})")
    print(
        f"{args.processes} processes x batch {args.global_batch // args.processes}: {many:.1f} samples/s "
        f"(median of {args.repeats})"
    )
    print(
        f"speed-up {many / one:.2f}x, scaling efficiency {efficiency:.0%} "
        f"({args.threads_per_process} thread(s) per process)"
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

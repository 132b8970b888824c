#!/usr/bin/env python3
"""Training throughput of open_clip_train and acc_clip side by side: same data, model, batch,
precision, workers and number of steps, runs alternated, medians with min and max.

    python -m benchmarks.bench_train --mode csv,shards --images 400 --size 640x480 \
        --model local-dir:configs/models/tiny-rn --precision fp32 --batch-size 32 --workers 2 \
        --steps 40 --skip 5 --runs 3 --json /tmp/bench.json

Modes (several may be given, comma-separated; a baseline they share runs once per round):
  csv     open_clip from the CSV    against acc_clip from the same CSV (like for like)
  shards  open_clip from the CSV    against acc_clip from --resize shards of that CSV
  model   open_clip synthetic data  against acc_clip synthetic data (the model step alone)
`--variant NAME=FLAGS` adds acc_clip runs with extra flags (fast paths on and off), e.g.
`--variant channels_last=--channels-last`.

The dataset (acc_clip's demo data, its CSV, shards) is made once under --data-dir and reused.
open_clip has no --max-steps, so both read a CSV of exactly steps x batch rows for one epoch
(or, synthetic, --train-num-samples of that size); acc_clip also gets --max-steps.

Every figure comes from the trainers' own per-step logs (`--log-every-n-steps 1`: open_clip's
out.log, acc_clip's metrics.jsonl), whose step times tile the run: step i runs from the end of
step i-1 to its own end, and its data time is the part spent waiting for the batch. A run's
samples/s is the samples of its steady steps (the first --skip left out) over the sum of their
step times. Peak memory is read inside each trainer process at exit (CUDA allocator peak; host
peak RSS of the main process). This module also holds the helpers benchmarks/parity_open_clip.py uses
to run both trainers and read their logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from acc_clip.errors import AccClipError  # noqa: E402

MODES = ("csv", "shards", "model")
# mode -> (open_clip's input, acc_clip's input)
MODE_SOURCES = {"csv": ("csv", "csv"), "shards": ("csv", "shards"), "model": ("synthetic", "synthetic")}
OPEN_CLIP_STEP = re.compile(r"Train Epoch: \d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), ([\d.]+)/s")
PEAK_MARKER = "BENCH_PEAK "
PART_IMAGES = 250  # demo images per generated part; parts are made in parallel
# Runs a trainer module as `python -m` would, and reports its peak memory at exit; the same for both
# trainers, so neither's own reporting is trusted over the other's.
PEAK_WRAPPER = f"""
import atexit, json, resource, runpy, sys
def _report():
    import torch
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    print({PEAK_MARKER!r} + json.dumps({{
        "device_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}}), flush=True)
atexit.register(_report)
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


# ---------------------------------------------------------------------------------------------
# Running a trainer and reading its per-step log (shared with benchmarks/parity_open_clip.py)


@dataclass(frozen=True)
class StepTime:
    data_time: float  # seconds waiting for the batch (and, on an accelerator, for the previous step to drain)
    batch_time: float  # seconds of the whole step, data time included


def trainer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(extra or {}),
    }


def run_logged(
    command: list[str], log_path: Path, env: dict[str, str] | None = None, timeout: float | None = None
) -> float:
    """Run `command` from the repository root with stdout and stderr into `log_path` (`env`: extra
    variables); its wall seconds. A failed run stops everything: a benchmark or a parity check over
    a broken run means nothing. A run past `timeout` seconds is killed and counts as failed."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=trainer_env(env), cwd=REPO, timeout=timeout
        )
    if result.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise AccClipError(f"{' '.join(command[:4])}... exited {result.returncode}; see {log_path}:\n{tail}")
    return time.perf_counter() - start


def open_clip_steps(out_log: Path, batch_size: int) -> list[StepTime]:
    """Per-step times from open_clip_train's out.log, which must log every step. The step time is
    taken from the samples/s figure (6 significant digits) rather than the 3-decimal Batch (t)."""
    steps = []
    for match in OPEN_CLIP_STEP.finditer(out_log.read_text()):
        steps.append(StepTime(float(match.group(1)), batch_size / float(match.group(3))))
    return steps


def acc_clip_steps(metrics_jsonl: Path) -> list[StepTime]:
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    return [StepTime(row["data_time"], row["batch_time"]) for row in rows]


def steady_samples_per_second(steps: list[StepTime], batch_size: int, skip: int) -> float:
    """Samples of the steps after the first `skip` over the sum of their step times."""
    steady = steps[skip:]
    if not steady:
        raise AccClipError(f"only {len(steps)} steps logged, none left after skipping {skip}")
    return len(steady) * batch_size / sum(step.batch_time for step in steady)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class BenchData:
    run_csv: Path | None  # exactly steps x batch rows
    shards: Path | None
    num_samples: int  # steps x batch


def _csv_rows(path: Path) -> int:
    with open(path, "rb") as file:
        return sum(1 for _ in file) - 1


def _warm_page_cache(paths: list[Path]) -> None:
    """Read every file once, so no contender pays for the first read from disk."""
    for path in paths:
        with open(path, "rb") as file:
            while file.read(1 << 20):
                pass


def _make_part(job: tuple[Path, int, tuple[int, int], int]) -> Path:
    from acc_clip.prep.coco_csv import create_coco_csv
    from acc_clip.prep.demo_data import make_demo_data

    folder, images, size, seed = job
    paths = make_demo_data(str(folder), num_train=images, num_val=1, size=size, seed=seed, zeroshot_per_class=0)
    part_csv = folder / "train.csv"
    if not part_csv.exists():
        create_coco_csv(paths["train_annotations"], paths["train_images"], str(part_csv))
    return part_csv


def make_images(root: Path, images: int, size: tuple[int, int]) -> Path:
    """`images` demo images with 5 captions each, and their CSV. Made in parts of PART_IMAGES, one
    process per part (the demo generator is sequential); the parts do not depend on the core count."""
    import pandas as pd

    full_csv = root / "train.csv"
    if full_csv.exists():
        return full_csv
    jobs = [
        (root / f"part{k:03d}", min(PART_IMAGES, images - k * PART_IMAGES), size, k)
        for k in range(math.ceil(images / PART_IMAGES))
    ]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        part_csvs = list(pool.map(_make_part, jobs))
    frame = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in part_csvs], ignore_index=True)
    frame.to_csv(f"{full_csv}.tmp", index=False)
    os.replace(f"{full_csv}.tmp", full_csv)
    return full_csv


def prepare_data(
    data_dir: Path,
    *,
    images: int,
    size: tuple[int, int],
    steps: int,
    batch_size: int,
    need_csv: bool,
    resize: int | None,
    samples_per_shard: int,
) -> BenchData:
    """Make or reuse the demo images, their CSV, the run CSV of steps x batch rows and the shards."""
    import pandas as pd

    from acc_clip.prep.shards.convert import DEFAULT_QUALITY, convert_csv_to_shards

    num_samples = steps * batch_size
    if not need_csv and resize is None:
        return BenchData(None, None, num_samples)
    root = data_dir / f"coco_{images}_{size[0]}x{size[1]}"
    full_csv = make_images(root, images, size)
    rows = _csv_rows(full_csv)
    if rows < num_samples:
        raise AccClipError(
            f"{full_csv}: {rows} rows, but {steps} steps of {batch_size} need {num_samples}; "
            f"raise --images to at least {math.ceil(num_samples / 5)} or lower --steps"
        )
    run_csv = root / f"train_{num_samples}.csv"
    if not run_csv.exists():
        frame = pd.read_csv(full_csv, dtype=str, keep_default_na=False).head(num_samples)
        frame.to_csv(f"{run_csv}.tmp", index=False)
        os.replace(f"{run_csv}.tmp", run_csv)
    warm = [Path(p) for p in pd.read_csv(run_csv, dtype=str)["filepath"].unique()]
    shards = None
    if resize is not None:
        shards = root / f"shards_r{resize}_q{DEFAULT_QUALITY}_n{samples_per_shard}"
        convert_csv_to_shards(
            str(full_csv), str(shards), resize=resize, samples_per_shard=samples_per_shard, progress=False
        )
        warm += sorted(shards.glob("*.tar"))
    _warm_page_cache(warm)
    return BenchData(run_csv, shards, num_samples)


# ---------------------------------------------------------------------------------------------
# Contenders and their command lines


@dataclass(frozen=True)
class Contender:
    trainer: str  # "open_clip" or "acc_clip"
    source: str  # "csv", "shards" or "synthetic"
    variant: str = ""  # name of the extra acc_clip flags, "" for none
    extra: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.trainer}/{self.source}" + (f"+{self.variant}" if self.variant else "")

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    name, sep, flags = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS such as channels_last=--channels-last, got {text!r}")
    return name, tuple(shlex.split(flags))


def contenders_for(modes: list[str], variants: list[tuple[str, tuple[str, ...]]]) -> list[Contender]:
    """Each mode's open_clip baseline (shared between modes) and acc_clip runs, plus variants."""
    chosen: list[Contender] = []
    for mode in modes:
        reference, candidate = MODE_SOURCES[mode]
        for contender in [
            Contender("open_clip", reference),
            Contender("acc_clip", candidate),
            *(Contender("acc_clip", candidate, name, flags) for name, flags in variants),
        ]:
            if contender not in chosen:
                chosen.append(contender)
    return chosen


def baseline_of(contender: Contender) -> Contender:
    """The open_clip run an acc_clip run is compared with: open_clip reads the CSV unless synthetic."""
    return Contender("open_clip", "synthetic" if contender.source == "synthetic" else "csv")


def trainer_flags(args: argparse.Namespace) -> list[str]:
    """Flags both trainers take with the same meaning (the model, batch, precision, workers, schedule)."""
    flags = [
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--precision",
        args.precision,
        "--lr",
        "5e-4",
        "--warmup",
        "10",
        "--wd",
        "0.2",
        "--seed",
        "0",
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
    ]
    return flags + (["--device", args.device] if args.device else [])


def command_for(contender: Contender, args: argparse.Namespace, data: BenchData, logs: Path, name: str) -> list[str]:
    module = "open_clip_train.main" if contender.trainer == "open_clip" else "acc_clip.train"
    flags = trainer_flags(args) + ["--logs", str(logs), "--name", name]
    if contender.source == "csv":
        flags += [
            "--train-data",
            str(data.run_csv),
            "--dataset-type",
            "csv",
            "--csv-separator",
            ",",
            "--csv-img-key",
            "filepath",
            "--csv-caption-key",
            "title",
        ]
    elif contender.source == "shards":
        flags += [
            "--train-data",
            str(data.shards),
            "--dataset-type",
            "webdataset",
            "--train-num-samples",
            str(data.num_samples),
        ]
    else:
        flags += ["--dataset-type", "synthetic", "--train-num-samples", str(data.num_samples)]
    if contender.trainer == "acc_clip":
        # Capped one epoch of two, so no end-of-training checkpoint is written: --channels-last weights
        # cannot be saved yet (safetensors refuses them), and a save is no part of a step in either trainer.
        flags += ["--epochs", "2", "--max-steps", str(args.steps), *contender.extra]
    else:
        flags += ["--epochs", "1"]
    return [sys.executable, "-c", PEAK_WRAPPER, module, *flags]


# ---------------------------------------------------------------------------------------------
# Runs and their summary


@dataclass
class RunResult:
    contender: str
    round: int
    steps: int
    samples_per_second: float  # steady steps
    data_ms: float  # mean data wait per steady step
    compute_ms: float  # mean step time less data wait
    step_ms: float
    wall_seconds: float  # the whole process, start-up included
    cpu_seconds: float  # user + system of the process and its loader workers, start-up included
    load_average: tuple[float, float]  # 1-minute load before and after the run
    device_peak_bytes: int | None
    host_peak_rss_bytes: int | None
    device_name: str = ""


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _peak_report(stdout_log: Path) -> dict:
    lines = [line for line in stdout_log.read_text(errors="replace").splitlines() if line.startswith(PEAK_MARKER)]
    return json.loads(lines[-1][len(PEAK_MARKER) :]) if lines else {}


def run_once(contender: Contender, round_: int, args: argparse.Namespace, data: BenchData, logs: Path) -> RunResult:
    name = f"r{round_}_{contender.slug}"
    command = command_for(contender, args, data, logs, name)
    load_before, cpu_before = os.getloadavg()[0], _children_cpu_seconds()
    wall = run_logged(
        command, logs / f"{name}.stdout", {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    )
    cpu, load_after = _children_cpu_seconds() - cpu_before, os.getloadavg()[0]
    run_dir = logs / name
    if contender.trainer == "open_clip":
        steps = open_clip_steps(run_dir / "out.log", args.batch_size)
    else:
        steps = acc_clip_steps(run_dir / "metrics.jsonl")
    if len(steps) != args.steps:
        raise AccClipError(f"{run_dir}: {len(steps)} steps logged, expected {args.steps}")
    steady = steps[args.skip :]
    data_ms = 1000 * statistics.fmean(s.data_time for s in steady)
    step_ms = 1000 * statistics.fmean(s.batch_time for s in steady)
    peak = _peak_report(logs / f"{name}.stdout")
    return RunResult(
        contender.name,
        round_,
        len(steps),
        steady_samples_per_second(steps, args.batch_size, args.skip),
        data_ms,
        step_ms - data_ms,
        step_ms,
        wall,
        cpu,
        (load_before, load_after),
        peak.get("device_peak_bytes"),
        peak.get("host_peak_rss_bytes"),
        peak.get("device_name", ""),
    )


def summarise(results: list[RunResult], contenders: list[Contender]) -> dict:
    """Per contender: median, min and max samples/s over its runs, median step split and peak memory;
    per acc_clip contender: the ratio of medians to its open_clip baseline and the range of the
    per-round ratios (each round's runs ran back to back, so they saw about the same load)."""
    summary: dict = {"contenders": {}, "ratios": {}}
    for contender in contenders:
        runs = [r for r in results if r.contender == contender.name]
        speeds = [r.samples_per_second for r in runs]
        device_peaks = [r.device_peak_bytes for r in runs if r.device_peak_bytes is not None]
        summary["contenders"][contender.name] = {
            "runs": len(runs),
            "samples_per_second": {"median": statistics.median(speeds), "min": min(speeds), "max": max(speeds)},
            "data_ms": statistics.median(r.data_ms for r in runs),
            "compute_ms": statistics.median(r.compute_ms for r in runs),
            "step_ms": statistics.median(r.step_ms for r in runs),
            "cpu_seconds": statistics.median(r.cpu_seconds for r in runs),
            "wall_seconds": statistics.median(r.wall_seconds for r in runs),
            "device_peak_mib": max(device_peaks) / 2**20 if device_peaks else None,
            "host_peak_rss_mib": max(r.host_peak_rss_bytes or 0 for r in runs) / 2**20,
        }
    for contender in contenders:
        if contender.trainer != "acc_clip":
            continue
        base = baseline_of(contender).name
        by_round = {r.round: r.samples_per_second for r in results if r.contender == base}
        paired = [
            r.samples_per_second / by_round[r.round]
            for r in results
            if r.contender == contender.name and r.round in by_round
        ]
        medians = summary["contenders"]
        summary["ratios"][f"{contender.name} / {base}"] = {
            "of_medians": medians[contender.name]["samples_per_second"]["median"]
            / medians[base]["samples_per_second"]["median"],
            "per_round_min": min(paired),
            "per_round_max": max(paired),
        }
    return summary


def report_lines(report: dict) -> list[str]:
    setup = report["setup"]
    width = max(28, *(len(name) for name in report["summary"]["contenders"]))
    lines = [
        f"bench_train: modes {','.join(setup['modes'])} | model {setup['model']} | batch {setup['batch_size']} | "
        f"{setup['precision']} | workers {setup['workers']} | OMP_NUM_THREADS {setup['threads'] or 'unset'} | "
        f"{setup['steps']} steps per run, first "
        f"{setup['skip']} left out | {setup['runs']} runs each, alternating | device {report['device_name']}",
        f"load average (1 min) over the runs: min {report['load_average']['min']:.2f}, median "
        f"{report['load_average']['median']:.2f}, max {report['load_average']['max']:.2f} on "
        f"{report['cpu_count']} CPUs",
        f"{'contender':<{width}} {'samples/s median [min-max]':>30} {'data ms':>8} {'compute ms':>11} "
        f"{'peak dev MiB':>13} {'peak RSS MiB':>13} {'CPU s/run':>10}",
    ]
    for name, row in report["summary"]["contenders"].items():
        speed = row["samples_per_second"]
        device = f"{row['device_peak_mib']:.0f}" if row["device_peak_mib"] is not None else "-"
        lines.append(
            f"{name:<{width}} {speed['median']:>12.1f} [{speed['min']:>7.1f}-{speed['max']:>7.1f}] "
            f"{row['data_ms']:>8.1f} {row['compute_ms']:>11.1f} {device:>13} "
            f"{row['host_peak_rss_mib']:>13.0f} {row['cpu_seconds']:>10.1f}"
        )
    for name, ratio in report["summary"]["ratios"].items():
        lines.append(
            f"ratio {name}: {ratio['of_medians']:.2f}x (per round {ratio['per_round_min']:.2f}-"
            f"{ratio['per_round_max']:.2f}x)"
        )
    if report["stopped_early"]:
        lines.append(report["stopped_early"])
    return lines


def build_report(
    args: argparse.Namespace,
    modes: list[str],
    contenders: list[Contender],
    results: list[RunResult],
    logs: Path,
    stopped_early: str = "",
) -> dict:
    loads = [load for r in results for load in r.load_average]
    ran = [c for c in contenders if any(r.contender == c.name for r in results)]
    return {
        "setup": {
            "modes": modes,
            "model": args.model,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "workers": args.workers,
            "threads": args.threads,
            "steps": args.steps,
            "skip": args.skip,
            "runs": args.runs,
            "images": args.images,
            "size": list(args.size),
            "resize": args.resize,
            "variants": {name: list(flags) for name, flags in args.variant},
            "logs": str(logs),
            "command": [sys.executable, *sys.argv],
        },
        "device_name": next((r.device_name for r in results if r.device_name), "cpu"),
        "cpu_count": os.cpu_count(),
        "load_average": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "rounds_done": len({r.round for r in results}),
        "stopped_early": stopped_early,
        "runs": [asdict(r) for r in results],
        "summary": summarise(results, ran),
    }


def write_json(report: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{path}.tmp").write_text(json.dumps(report, indent=1))
        os.replace(f"{path}.tmp", path)


def run_bench(args: argparse.Namespace) -> dict:
    """Prepare the data, run every contender once per round, rounds until --runs or until the next
    round would pass --time-budget; the JSON (--json) is rewritten after every run, so a run killed
    from outside still leaves its figures so far."""
    started = time.perf_counter()
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise AccClipError(f"--mode {args.mode!r}: expected a comma-separated list of {', '.join(MODES)}")
    if args.skip >= args.steps:
        raise AccClipError(f"--skip {args.skip} leaves none of --steps {args.steps}")
    contenders = contenders_for(modes, args.variant)
    needs = {c.source for c in contenders}
    data = prepare_data(
        Path(args.data_dir),
        images=args.images,
        size=args.size,
        steps=args.steps,
        batch_size=args.batch_size,
        need_csv="csv" in needs,
        resize=args.resize if "shards" in needs else None,
        samples_per_shard=args.samples_per_shard,
    )
    print(f"data ready after {time.perf_counter() - started:.0f} s", flush=True)
    logs = Path(args.out or REPO / ".bench" / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    logs.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    stopped_early = ""
    for round_ in range(args.runs):
        round_started = time.perf_counter()
        # Each round starts one further along, so no contender always runs first after a rival.
        order = contenders[round_ % len(contenders) :] + contenders[: round_ % len(contenders)]
        for contender in order:
            result = run_once(contender, round_, args, data, logs)
            results.append(result)
            print(
                f"round {round_} {contender.name}: {result.samples_per_second:.1f} samples/s, data "
                f"{result.data_ms:.1f} ms + compute {result.compute_ms:.1f} ms per step, "
                f"{result.wall_seconds:.0f} s in all, load {result.load_average[0]:.2f}->"
                f"{result.load_average[1]:.2f}",
                flush=True,
            )
            write_json(build_report(args, modes, contenders, results, logs), args.json)
        elapsed, last_round = time.perf_counter() - started, time.perf_counter() - round_started
        if args.time_budget and round_ + 1 < args.runs and elapsed + last_round > args.time_budget:
            stopped_early = (
                f"stopped after {round_ + 1} of {args.runs} rounds: another round of about "
                f"{last_round:.0f} s would pass --time-budget {args.time_budget:.0f} s"
            )
            print(stopped_early, flush=True)
            break
    report = build_report(args, modes, contenders, results, logs, stopped_early)
    write_json(report, args.json)
    return report


def build_parser() -> argparse.ArgumentParser:
    from acc_clip.prep.demo_data import parse_size

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", default="csv,shards", help="comma-separated: csv, shards, model")
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        help="NAME=FLAGS: also run acc_clip with these extra flags (repeatable)",
    )
    parser.add_argument("--model", default=f"local-dir:{REPO / 'configs/models/tiny-rn'}")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default=None, help="passed to both trainers; default: their own choice")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for both trainers (default: unset, each trainer's own choice)",
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=5, help="first steps of each run left out (warm-up)")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender")
    parser.add_argument("--images", type=int, default=400, help="demo images to make (5 CSV rows each)")
    parser.add_argument("--size", type=parse_size, default=(640, 480), help="image size, WIDTHxHEIGHT")
    parser.add_argument("--resize", type=int, default=256, help="shorter side of the images in the shards")
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--data-dir", default=str(REPO / ".bench" / "data"), help="made once, then reused")
    parser.add_argument("--out", default=None, help="run folders (default: .bench/runs/<time>)")
    parser.add_argument("--json", default=None, help="also write the results here (rewritten after every run)")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds from the start: start no round that would end past it"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run_bench(args)
    except AccClipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

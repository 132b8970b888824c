"""FLOPs per sample of an open_clip model and, given a bench_train result (benchmarks/gpu_seed_config.sh), the
MFU of each trainer: its samples/s per device times the model's FLOPs per sample (acc_clip.model.flops), over
the device's dense peak for the dtype --precision computes in (acc_clip.runtime.throughput). Both trainers
get the same count, so open_clip_train, which logs no FLOPs, is measured as acc_clip is; acc_clip's own
logged figures (metrics.jsonl: flops_per_sample, tflops_per_device, mfu) are printed beside, where its runs
wrote them.

    python -m benchmarks.mfu --model RN50                       # FLOPs per sample at the model's own sizes
    python -m benchmarks.mfu --results /tmp/bench_train_seed.json [--json mfu.json]  # model, precision from it
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

from acc_clip.model.flops import FlopCount, count_train_flops, describe, image_height_width
from acc_clip.runtime.throughput import compute_dtype, device_name, mfu, peak_tflops


def model_flops(name: str) -> tuple[FlopCount, tuple[int, int], int]:
    """The count for open_clip model `name` at its own image size and context length (as its tokenizer
    pads), in training mode; built on the CPU with random weights (the count does not read them)."""
    import open_clip

    logging.disable(logging.WARNING)  # open_clip's "no pretrained weights loaded": none are wanted
    try:
        model = open_clip.create_model(name, device="cpu", output_dict=True)
    finally:
        logging.disable(logging.NOTSET)
    image_size = image_height_width(model.visual.image_size)
    context_length = int(model.context_length)
    return count_train_flops(model, image_size=image_size, context_length=context_length), image_size, context_length


def logged_figures(logs: Path, skip: int) -> dict[str, dict[str, float]]:
    """Per acc_clip run folder under `logs`: the median of each logged FLOP figure over its steps after the
    first `skip` (open_clip's folders have no metrics.jsonl; rows without the fields are left out)."""
    figures = {}
    for metrics in sorted(logs.glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()][skip:]
        medians = {}
        for key in ("flops_per_sample", "tflops_per_device", "mfu"):
            values = [row[key] for row in rows if row.get(key) is not None]
            if values:
                medians[key] = statistics.median(values)
        figures[metrics.parent.name] = medians
    return figures


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="open_clip model name (default: the --results run's)")
    parser.add_argument("--precision", default=None, help="--precision of the runs (default: the run's, else amp)")
    parser.add_argument("--results", default=None, help="benchmarks/bench_train.py's --json output")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, where the table has none")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    report = json.loads(Path(args.results).read_text()) if args.results else {}
    setup = report.get("setup", {})
    model, precision = args.model or setup.get("model"), args.precision or setup.get("precision", "amp")
    if not model:
        parser.error("--model or --results is needed")
    count, image_size, context_length = model_flops(model)
    print(f"{model} at {image_size[0]}x{image_size[1]} px, {context_length} tokens: {describe(count)}")

    # Where the runs ran: bench_train's name for it (a GPU's, or "cpu"), else this machine's device.
    ran_on = report.get("device_name") or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = "cpu" if ran_on == "cpu" else "cuda"
    device = device_name(kind) if ran_on in ("cpu", "cuda") else ran_on
    dtype = compute_dtype(kind, precision)
    peak = args.peak_tflops or peak_tflops(device, dtype)
    print(
        f"device {device}: --precision {precision} computes in {dtype}, "
        + (f"peak {peak:g} TFLOP/s" if peak else "peak unknown (give --peak-tflops): no MFU")
    )
    figures: dict = {
        "model": model,
        "image_size": list(image_size),
        "context_length": context_length,
        "flops_per_sample": {"forward": count.forward, "backward": count.backward, "total": count.total},
        "device": device,
        "precision": precision,
        "compute_dtype": dtype,
        "peak_tflops": peak,
        "contenders": {},
        "logged": {},
    }
    for name, row in report.get("summary", {}).get("contenders", {}).items():
        speed = row["samples_per_second"]["median"]  # one process on one device: per device
        achieved = speed * count.total / 1e12
        figures["contenders"][name] = {"tflops_per_device": achieved, "mfu": mfu(achieved, peak)}
        print(f"  {name:<32} {speed:>8.1f} samples/s  {achieved:>7.3g} TFLOP/s  MFU {percent(mfu(achieved, peak))}")
    if setup.get("logs") and Path(setup["logs"]).is_dir():
        figures["logged"] = logged_figures(Path(setup["logs"]), int(setup.get("skip", 0)))
        for run, logged in figures["logged"].items():
            if not logged:
                print(f"  logged by {run}: no FLOP figures in its metrics.jsonl")
                continue
            print(
                f"  logged by {run}: {logged.get('flops_per_sample', 0) / 1e9:.1f} GFLOP per sample, "
                f"{logged.get('tflops_per_device', 0):.3g} TFLOP/s, MFU {percent(logged.get('mfu'))} (medians)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

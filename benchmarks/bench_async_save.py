"""Step time during step checkpoints, blocking against --async-save, for a ~100M-parameter model (RN50, random
init, fp32, AdamW) on the CPU, through acc_clip's CheckpointManager as the training loop calls it (save
when due, `poll` every step, `complete` at the end). Each step is a real forward and backward pass of
the model at a small input (so that the save, not the step, dominates on a CPU), then the optimizer.

For scale, the same process also times open_clip_train's save: its trainer writes `epoch_N.pt` at an
epoch's end with one blocking torch.save of the weights and optimizer state (no hash, no flush); it has
no step checkpoints and no asynchronous save.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_async_save [--steps 40] [--save-every 10] [--runs 3]

Printed per mode: the median step time of steps without a save, of steps with one, the time a run of
--steps takes, and the ratios. Figures are medians over --runs alternated runs (blocking, async, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

from acc_clip.checkpoint.folders import Progress
from acc_clip.checkpoint.manager import CheckpointManager
from acc_clip.model.optim import create_optimizer
from acc_clip.train.config import train_config
from acc_clip.train.loop import run_record


def build(model_name: str, image_size: int):
    import open_clip
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = open_clip.create_model(model_name, precision="fp32", device="cpu", force_image_size=image_size)
    config = train_config(train_data="unused.csv", model=model_name, name="bench")
    optimizer = create_optimizer(model, config.optimizer, "cpu")
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, config


def train_step(model, optimizer, images: torch.Tensor, texts: torch.Tensor) -> None:
    image_features, text_features, _ = model(images, texts)
    (image_features @ text_features.T).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(mode: str, parts, args, root: str) -> dict:
    accelerator, model, optimizer, config = parts
    run_dir = os.path.join(root, mode)
    shutil.rmtree(run_dir, ignore_errors=True)
    options = config.checkpoint
    options.async_save, options.keep_checkpoints = mode == "async", 2
    saver = CheckpointManager(run_dir, options, run_record(config), accelerator)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    texts = torch.randint(0, 49408, (args.batch_size, 77))
    plain, saving, started = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        begin = time.perf_counter()
        train_step(model, optimizer, images, texts)
        saver.poll()
        due = step % args.save_every == 0
        if due:
            saver.save(model, optimizer, Progress(global_step=step, step_in_epoch=step))
        (saving if due else plain).append(time.perf_counter() - begin)
    saver.complete()
    total = time.perf_counter() - started
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"plain_step_s": statistics.median(plain[1:]), "save_step_s": statistics.median(saving), "run_s": total}


def open_clip_save_seconds(model, optimizer, root: str) -> float:
    """The blocking call open_clip_train makes at an epoch's end (its checkpoint dict, one torch.save)."""
    path = os.path.join(root, "epoch_1.pt")
    begin = time.perf_counter()
    torch.save(
        {"epoch": 1, "name": "bench", "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path
    )
    seconds = time.perf_counter() - begin
    os.remove(path)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder, removed after)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="bench_async_save_")
    parts = build(args.model, args.image_size)
    millions = sum(p.numel() for p in parts[1].parameters()) / 1e6
    results: dict[str, list[dict]] = {"blocking": [], "async": []}
    open_clip_saves = []
    for _ in range(args.runs):
        for mode in results:
            results[mode].append(run(mode, parts, args, root))
        open_clip_saves.append(open_clip_save_seconds(parts[1], parts[2], root))
    report = {mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for mode, runs in results.items()}
    report["open_clip_epoch_save_s"] = statistics.median(open_clip_saves)
    blocking, asynchronous = report["blocking"], report["async"]
    print(
        f"{args.model}: {millions:.1f}M parameters, batch {args.batch_size} at {args.image_size}px, CPU threads "
        f"{torch.get_num_threads()}, {args.steps} steps, a save every {args.save_every}; medians of {args.runs} runs"
    )
    for mode in results:
        r = report[mode]
        print(
            f"  {mode:9s} step without a save {r['plain_step_s']:.2f} s, with a save {r['save_step_s']:.2f} s, "
            f"run {r['run_s']:.1f} s"
        )
    extra_blocking = blocking["save_step_s"] - blocking["plain_step_s"]
    extra_async = asynchronous["save_step_s"] - asynchronous["plain_step_s"]
    print(
        f"  a save's stall: blocking {extra_blocking:.2f} s, async {extra_async:.2f} s "
        f"({extra_async / extra_blocking:.2f} of blocking); run time async/blocking "
        f"{asynchronous['run_s'] / blocking['run_s']:.2f}"
    )
    print(
        f"  open_clip_train's epoch save (one blocking torch.save, no hash): {report['open_clip_epoch_save_s']:.2f} s; "
        f"async stall / it {extra_async / report['open_clip_epoch_save_s']:.2f}, blocking stall / it "
        f"{extra_blocking / report['open_clip_epoch_save_s']:.2f}"
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=1)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

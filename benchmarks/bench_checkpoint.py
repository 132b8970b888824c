"""Checkpoint size, save time and load time for a real open_clip model (RN50 by default, random
init, fp32) on the CPU, through acc_clip's CheckpointManager: the same code path as training
(Accelerate's save_state with the manifest, fsync and rename; load_state with the architecture
check). The AdamW state is filled by one update with zero gradients, so it has its full size.
Times are wall and CPU seconds of this process: on a shared machine the wall figures sink with the
load, the CPU ones much less.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_checkpoint [--model RN50] [--dir /tmp/bench] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from acc_clip.checkpoint.folders import Progress
from acc_clip.checkpoint.manager import CheckpointManager
from acc_clip.io.sealed import folder_bytes
from acc_clip.model.optim import create_optimizer
from acc_clip.train.config import train_config
from acc_clip.train.loop import run_record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder, removed after)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import open_clip
    from accelerate import Accelerator

    root = args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    run_dir = os.path.join(root, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    config = train_config(train_data="unused.csv", model=args.model, name="bench")
    accelerator = Accelerator(cpu=True)
    model = open_clip.create_model(args.model, precision="fp32", device="cpu")
    optimizer = create_optimizer(model, config.optimizer, "cpu")
    model, optimizer = accelerator.prepare(model, optimizer)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # creates exp_avg and exp_avg_sq for every parameter
    parameters = sum(p.numel() for p in model.parameters())

    saver = CheckpointManager(run_dir, config.checkpoint, run_record(config), accelerator)
    saver.steps_per_epoch = 1000
    results = []
    for repeat in range(args.repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        folder = saver.save(model, optimizer, Progress(global_step=repeat + 1))
        save_s, save_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
        files = {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}

        config.checkpoint.resume = folder
        loader = CheckpointManager(run_dir, config.checkpoint, run_record(config), accelerator)
        started, cpu_started = time.perf_counter(), time.process_time()
        loader.resume(model, optimizer, 1000)
        load_s, load_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
        config.checkpoint.resume = None
        results.append(
            {
                "save_s": round(save_s, 2),
                "save_cpu_s": round(save_cpu_s, 2),
                "load_s": round(load_s, 2),
                "load_cpu_s": round(load_cpu_s, 2),
                "bytes": folder_bytes(folder),
                "files": files,
            }
        )

    summary = {"model": args.model, "parameters": parameters, "torch_threads": torch.get_num_threads(), "runs": results}
    print(json.dumps(summary, indent=1))
    for result in results:
        print(
            f"{args.model}: {parameters / 1e6:.1f} M parameters, checkpoint {result['bytes'] / 2**20:.0f} MiB, "
            f"save {result['save_s']:.2f} s (CPU {result['save_cpu_s']:.2f} s), "
            f"load {result['load_s']:.2f} s (CPU {result['load_cpu_s']:.2f} s)"
        )
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

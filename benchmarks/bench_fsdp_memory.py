#!/usr/bin/env python3
"""Bytes per process of parameters, gradients and AdamW state after one step, DDP against FSDP2, on
two CPU processes (gloo): what sharding saves, measured rather than computed.

    python -m benchmarks.bench_fsdp_memory [--model ViT-S-32] [--json OUT]
    python -m benchmarks.bench_fsdp_memory --table     # docs/fsdp.md's table, from parameter counts

Runs itself twice under `accelerate launch`: launch/cpu_2proc.yaml (DDP) and launch/cpu_2proc_fsdp.yaml
(FSDP2), each one step of 2 random images and captions per process through acc_clip's own model,
optimizer, wrapping (runtime/parallel.prepare) and loss, fp32. Each process counts the bytes it holds:
its parameters (its shards under FSDP), their gradients after the backward, and the optimizer state
after the step; the largest process's figures are printed. ViT-S-32 has 63M parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"ddp": "cpu_2proc.yaml", "fsdp": "cpu_2proc_fsdp.yaml"}
PARTS = ("parameters", "gradients", "optimizer_state")
TABLE_MODELS = ["RN50", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-bigG-14"]
TABLE_PROCESSES = [2, 8, 64]


def tensor_bytes(tensors) -> int:
    from acc_clip.runtime.parallel import local_tensor

    return sum(local_tensor(t).numel() * t.element_size() for t in tensors if t is not None)


def optimizer_tensors(optimizer):
    import torch

    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def measure(model_name: str) -> dict:
    """One step in this process (launched by accelerate); the per-part bytes, the largest over processes."""
    import torch

    from acc_clip.loss import create_objective, model_overrides, model_rows, total_loss
    from acc_clip.model.build import create_model
    from acc_clip.model.optim import create_optimizer
    from acc_clip.runtime import parallel
    from acc_clip.runtime.device import make_accelerator, plan_device
    from acc_clip.train.config import parse_train_config

    # the data is random tensors; --train-data is required
    config, _ = parse_train_config(
        [
            "--model",
            model_name,
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--gather-with-grad",
            "--train-data",
            "unused.csv",
        ]
    )
    accelerator = make_accelerator(plan_device("cpu", "fp32"))
    bundle = create_model(
        config.model, precision=config.runtime.precision, seed=config.runtime.seed, **model_overrides(config)
    )
    optimizer = create_optimizer(bundle.model, config.optimizer, "cpu")
    model, optimizer = parallel.prepare(
        accelerator, bundle.model, optimizer, sync_batch_norm=False, compile_model=False
    )
    size = bundle.model.visual.image_size
    images = torch.randn(2, 3, *(size if isinstance(size, tuple) else (size, size)))
    texts = bundle.tokenizer(["a photo of a cat", "a photo of a dog"])
    objective = create_objective(config, accelerator.process_index, accelerator.num_processes, accelerator.device)
    accelerator.backward(total_loss(objective(model_rows(objective, model, images, texts))))
    parameters = list(parallel.unwrap(model).parameters())
    counts = [tensor_bytes(parameters), tensor_bytes(p.grad for p in parameters)]
    optimizer.step()
    counts.append(tensor_bytes(optimizer_tensors(optimizer)))
    largest = torch.tensor(counts, dtype=torch.long)
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    total = sum(p.numel() for p in bundle.model.parameters()) if not parallel.is_fsdp(accelerator) else None
    accelerator.end_training()
    return {
        "processes": accelerator.num_processes,
        "fsdp": parallel.is_fsdp(accelerator),
        "parameter_count": total,
        **dict(zip(PARTS, largest.tolist())),
    }


def parameter_count(model_name: str) -> int:
    """Parameters of an open_clip model, built on the meta device (no memory, any size)."""
    import open_clip
    import torch

    with torch.device("meta"):
        model = open_clip.create_model(model_name, device="meta")
    return sum(p.numel() for p in model.parameters())


def table(models: list[str], processes: list[int]) -> str:
    """Markdown: GiB per process of fp32 parameters (4 B each), gradients (4 B) and AdamW's two moments (8 B),
    under DDP (all of them on every process) and FSDP on N processes (a 1/N share; FSDP pads each tensor
    to a multiple of N, negligible here). Activations and the one unit FSDP gathers at a time come on top."""
    header = (
        "| model | parameters | DDP: params + grads + AdamW | " + " | ".join(f"FSDP on {n}" for n in processes) + " |"
    )
    lines = [header, "|" + " --- |" * (3 + len(processes))]
    for name in models:
        count = parameter_count(name)
        per = [count * 4, count * 4, count * 8]

        def cell(share, per=per):
            return f"{sum(per) / share / 2**30:.2f} GiB ({' + '.join(f'{b / share / 2**30:.2f}' for b in per)})"

        lines.append(f"| {name} | {count / 1e6:,.1f}M | {cell(1)} | " + " | ".join(cell(n) for n in processes) + " |")
    return "\n".join(lines)


def launch(kind: str, model_name: str) -> dict:
    import shutil
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    command = [
        accelerate,
        "launch",
        "--config_file",
        os.path.join(REPO, "launch", KINDS[kind]),
        "--main_process_port",
        str(port),
        "-m",
        "benchmarks.bench_fsdp_memory",
        "--worker",
        "--model",
        model_name,
    ]
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    if result.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument(
        "--table",
        action="store_true",
        help="print docs/fsdp.md's table computed from parameter "
        "counts (RN50 ... ViT-bigG-14 on 2, 8, 64 processes) instead of measuring",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table:
        print(table(TABLE_MODELS, TABLE_PROCESSES))
        return
    if args.worker:
        figures = measure(args.model)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(figures), flush=True)
        return
    results = {kind: launch(kind, args.model) for kind in KINDS}
    ddp, fsdp = results["ddp"], results["fsdp"]
    print(f"{args.model}: {ddp['parameter_count'] / 1e6:.1f}M parameters, 2 CPU processes, fp32, AdamW, one step")
    print(f"{'bytes per process':<20}{'DDP':>16}{'FSDP2':>16}{'FSDP/DDP':>10}")
    for part in PARTS:
        print(f"{part:<20}{ddp[part]:>16,}{fsdp[part]:>16,}{fsdp[part] / ddp[part]:>10.3f}")
    total = {kind: sum(results[kind][part] for part in PARTS) for kind in KINDS}
    ratio = total["fsdp"] / total["ddp"]
    print(f"{'total':<20}{total['ddp']:>16,}{total['fsdp']:>16,}{ratio:>10.3f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"model": args.model, **results, "ratio": ratio}, file, indent=1)


if __name__ == "__main__":
    main()

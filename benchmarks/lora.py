"""Memory and time of a LoRA step (--lora-rank) against full fine-tuning, on the CPU: each mode in a fresh
process (so its peak RSS is its own), the same model, batch and seed; a step is forward, CLIP loss, backward
and AdamW's update (acc_clip's optimizer, fused on the CPU), as the trainer makes it with --accum-freq 1.
Prints each mode's median step time and memory and their ratio to full fine-tuning measured in the same run.

    python -m benchmarks.lora [--model ViT-B-32] [--batch-size 8] [--steps 5] [--rank 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time

import torch

MODES = ("full", "lora")


def rss_bytes() -> int:
    """The process's resident set size now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * resource.getpagesize()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build(mode: str, model_name: str, rank: int):
    """The model (random weights, seed 0), its trainable parameters' optimizer, and the loss."""
    import open_clip

    from acc_clip.model.lora import LoraOptions, apply_lora
    from acc_clip.model.optim import OptimizerOptions, create_optimizer, resolve_defaults

    logging.disable(logging.WARNING)  # open_clip's "no pretrained weights loaded": none are wanted
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, output_dict=True)
    logging.disable(logging.NOTSET)
    if mode == "lora":
        apply_lora(model, LoraOptions(lora_rank=rank), fsdp=False)
    options = OptimizerOptions()
    resolve_defaults(options, model_name)
    return model.train(), create_optimizer(model, options, "cpu"), open_clip.ClipLoss()


def measure(mode: str, model_name: str, rank: int, batch: int, steps: int) -> dict:
    """One mode, in this process: the median step time after one warm-up step, and memory figures."""
    model, optimizer, loss_fn = build(mode, model_name, rank)
    generator = torch.Generator().manual_seed(1)
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.randn(batch, 3, *size, generator=generator)
    texts = torch.randint(1, 49407, (batch, int(model.context_length)), generator=generator)
    rss_built = rss_bytes()
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients kept: their memory counts, as between steps in a run
        if step > 0:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - start)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {
        "mode": mode,
        "step_seconds": statistics.median(times),
        "step_seconds_all": times,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "gradient_bytes": tensor_bytes(p.grad for p in trainable if p.grad is not None),
        "optimizer_state_bytes": tensor_bytes(state),
        "rss_after_build_bytes": rss_built,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    }


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "benchmarks.lora", "--child", mode, "--model", args.model]
    command += ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--rank", str(args.rank)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode}: exited {result.returncode}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def report(rows: dict[str, dict]) -> None:
    base = rows["full"]
    print(f"{'':<28}" + "".join(f"{mode:>16}" for mode in rows) + f"{'lora / full':>14}")
    lines = [
        ("trainable parameters", "trainable", lambda v: f"{v:,}"),
        ("median step (s)", "step_seconds", lambda v: f"{v:.2f}"),
        ("gradients", "gradient_bytes", mib),
        ("optimizer state", "optimizer_state_bytes", mib),
        ("RSS after building", "rss_after_build_bytes", mib),
        ("peak RSS", "peak_rss_bytes", mib),
    ]
    for label, key, shown in lines:
        ratio = rows["lora"][key] / base[key] if base[key] else float("nan")
        print(f"{label:<28}" + "".join(f"{shown(rows[m][key]):>16}" for m in rows) + f"{ratio:>14.3f}")
        if key == "step_seconds":  # the machine may be shared: the spread says how much to trust the median
            spread = (f"{min(rows[m]['step_seconds_all']):.2f}-{max(rows[m]['step_seconds_all']):.2f}" for m in rows)
            print(f"{'  min-max (s)':<28}" + "".join(f"{text:>16}" for text in spread))
    step_peak = {m: rows[m]["peak_rss_bytes"] - rows[m]["rss_after_build_bytes"] for m in rows}
    ratio = step_peak["lora"] / step_peak["full"]
    print(f"{'peak RSS - after building':<28}" + "".join(f"{mib(step_peak[m]):>16}" for m in rows) + f"{ratio:>14.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode, after one warm-up step")
    parser.add_argument("--rank", type=int, default=8, help="--lora-rank (both towers, attn and mlp)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.rank, args.batch_size, args.steps)))
        return 0
    rows = {mode: run_mode(mode, args) for mode in MODES}
    print(
        f"{args.model}, batch {args.batch_size}, {args.steps} steps after a warm-up, LoRA rank {args.rank} "
        f"(attn,mlp, both towers), {torch.get_num_threads()} threads, AdamW"
    )
    report(rows)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

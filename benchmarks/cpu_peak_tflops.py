"""This machine's matrix-multiply TFLOP/s with torch, fp32 by default: square products of a few sizes, each
timed several times (median and best), on torch's threads and on one thread. A CPU has no published dense peak
that torch reaches, so the best figure here stands in for it when MFU is reported on the CPU (`--peak-tflops`).
`--dtype bf16` measures the rate of bf16 products, what --precision amp computes in on a CPU with native bf16.

    python -m benchmarks.cpu_peak_tflops [--sizes 1024 2048 4096] [--repeats 5] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from acc_clip.runtime.throughput import cpu_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_seconds(size: int, repeats: int, dtype: torch.dtype) -> list[float]:
    """Wall seconds of each of `repeats` products of two size x size matrices, after one untimed
    (first-touch of the output, thread pool start-up)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return times


def measure(threads: int, sizes: list[int], repeats: int, dtype: torch.dtype) -> list[tuple[int, float, float]]:
    """(size, median TFLOP/s, best TFLOP/s) for each size on `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = []
        for size in sizes:
            flops = 2 * size**3  # a multiply and an add per term
            times = matmul_seconds(size, repeats, dtype)
            rows.append((size, flops / statistics.median(times) / 1e12, flops / min(times) / 1e12))
        return rows
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.sizes) < 1:
        parser.error("--sizes and --repeats take positive numbers")

    print(f"{cpu_name()}, torch {torch.__version__}, {args.dtype}, {args.repeats} repeats per size")
    print(f"{'threads':>7} {'size':>6} {'TFLOP/s median':>15} {'best':>8}")
    for threads in dict.fromkeys([torch.get_num_threads(), 1]):  # both, once each
        rows = measure(threads, args.sizes, args.repeats, DTYPES[args.dtype])
        for size, median, best in rows:
            print(f"{threads:>7} {size:>6} {median:>15.3f} {best:>8.3f}")
        print(f"{threads:>7} {'peak':>6} {max(r[1] for r in rows):>15.3f} {max(r[2] for r in rows):>8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak compute of accelerators and MFU: model FLOPs per second achieved over the device's dense peak for the
dtype its matrix units run in.

The peaks are vendors' published dense figures (no 2:4 sparsity; datasheets print the sparse ones with an
asterisk, twice these), in TFLOP/s per device as torch counts devices: NVIDIA's datasheets (V100, T4, A10,
A100, L4, L40S, H100 SXM/PCIe/NVL, H200 SXM/NVL, GH200, HGX B200) and its Ampere GA102 and Ada AD102 whitepapers
(RTX A6000, RTX 3090, RTX 4090; GeForce cards accumulate fp16 products in fp32 at half rate, the figure
training with autocast gets); AMD's Instinct specifications (MI250X, MI250, MI300X; torch sees each of an
MI250's two dies as its own device, so its peak is half the card's). Tecorigin SDAA publishes none that we
found: give `--peak-tflops` there, and on the CPU (benchmarks/cpu_peak_tflops.py measures one).
"""

from __future__ import annotations

import platform
import re

import torch

from acc_clip.runtime.device import MIXED_PRECISION, cpu_has_native_bf16

COMPUTE_DTYPES = ("bf16", "fp16", "tf32", "fp32")

# accelerator -> compute dtype -> dense peak TFLOP/s per device. A dtype left out has no fast path there
# (bf16 before Ampere): peak_tflops says None rather than guess an emulated rate.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "V100": {"fp16": 125.0, "fp32": 15.7},  # SXM2
    "V100 PCIe": {"fp16": 112.0, "fp32": 14.0},
    "T4": {"fp16": 65.0, "fp32": 8.1},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM and PCIe alike
    "A6000": {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7},  # RTX A6000
    "3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
    "4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0},  # SXM: names without PCIe or NVL
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0},  # SXM: H100 SXM's compute
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},  # HGX B200, per GPU
    "MI250X": {"bf16": 191.5, "fp16": 191.5, "fp32": 47.9},  # per die; ROCm may name it "MI250X/MI250"
    "MI250": {"bf16": 181.0, "fp16": 181.0, "fp32": 45.3},  # per die
    # TF32 left out: whether torch on ROCm runs fp32 products as TF32 depends on its version and environment.
    "MI300X": {"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4},
}

# --precision -> the dtype of the matrix products on an accelerator: the amp modes autocast (amp in fp16),
# fp16/bf16 cast the weights, pure_* the whole model; fp32 is fp32 (CUDA makes it TF32, below).
PRECISION_DTYPE = {
    "amp": "fp16",
    "amp_bf16": "bf16",
    "amp_bfloat16": "bf16",
    "fp16": "fp16",
    "bf16": "bf16",
    "pure_fp16": "fp16",
    "pure_bf16": "bf16",
    "fp32": "fp32",
}


def compute_dtype(kind: str, precision: str, *, cpu_bf16: bool | None = None) -> str:
    """The dtype the matrix products of `--precision precision` run in on a device of `kind` ("cuda",
    "sdaa", "cpu", ...): "bf16", "fp16", "tf32" or "fp32". On CUDA fp32 is TF32 (acc_clip sets allow_tf32,
    as open_clip_train does). On the CPU, `amp` runs bf16 autocast where the CPU has native bf16 and fp32
    elsewhere (runtime/device.py); `cpu_bf16` says which (None: this machine's CPU)."""
    if precision not in PRECISION_DTYPE:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISION_DTYPE)}")
    dtype = PRECISION_DTYPE[precision]
    if kind == "cuda" and dtype == "fp32":
        return "tf32"
    if kind == "cpu" and MIXED_PRECISION[precision] == "fp16":  # the amp modes that mean fp16 autocast
        return "bf16" if (cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16) else "fp32"
    return dtype


def device_name(kind: str) -> str:
    """The accelerator's name as its torch backend reports it (torch.cuda's, torch.sdaa's, any backend's
    get_device_name), else the CPU's model name."""
    backend = getattr(torch, kind, None) if kind != "cpu" else None
    get_name = getattr(backend, "get_device_name", None)
    if callable(get_name):
        return str(get_name())
    return cpu_name()


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's "model name" from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open(cpuinfo) as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def peak_tflops(name: str, dtype: str) -> float | None:
    """The dense peak TFLOP/s of the device named `name` for `dtype`, or None when the device or that dtype
    is not in the table. A key matches as whole words, case-insensitively ("A10" is not "A100" or "A10G"),
    the most specific key first ("H100 PCIe" before "H100"). TF32 on a device without it (V100, T4,
    MI250) is plain fp32: allow_tf32 changes nothing there."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    key = table_key(name)
    if key is None:
        return None
    peaks = PEAK_TFLOPS[key]
    if dtype == "tf32" and dtype not in peaks:
        dtype = "fp32"
    return peaks.get(dtype)


def table_key(name: str) -> str | None:
    """The PEAK_TFLOPS key that `name` holds, the one with most words then most letters first."""
    for key in sorted(PEAK_TFLOPS, key=lambda k: (len(k.split()), len(k)), reverse=True):
        words = r"[\s_-]+".join(re.escape(word) for word in key.split())
        if re.search(rf"(?<![a-z0-9]){words}(?![a-z0-9])", name, flags=re.IGNORECASE):
            return key
    return None


def mfu(achieved_tflops: float, peak: float | None) -> float | None:
    """Model FLOPs utilization, a fraction (0.42 is 42%): achieved TFLOP/s per device over its peak; None
    when the peak is unknown."""
    if achieved_tflops < 0:
        raise ValueError(f"achieved_tflops {achieved_tflops}: expected >= 0")
    if peak is None:
        return None
    if peak <= 0:
        raise ValueError(f"peak {peak}: expected a positive TFLOP/s")
    return achieved_tflops / peak

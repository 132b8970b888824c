"""Peak compute and MFU (acc_clip.runtime.throughput): which dtype a --precision computes in, which table row
a device name finds, and the arithmetic."""

from __future__ import annotations

import pytest
import torch

from acc_clip.runtime.throughput import PEAK_TFLOPS, compute_dtype, cpu_name, device_name, mfu, peak_tflops


@pytest.mark.parametrize(
    "kind, precision, expected",
    [
        ("cuda", "amp", "fp16"),  # fp16 autocast
        ("cuda", "amp_bf16", "bf16"),
        ("cuda", "amp_bfloat16", "bf16"),
        ("cuda", "fp16", "fp16"),
        ("cuda", "pure_bf16", "bf16"),
        ("cuda", "fp32", "tf32"),  # allow_tf32, as open_clip_train sets it
        ("sdaa", "fp32", "fp32"),
        ("sdaa", "amp", "fp16"),
    ],
)
def test_compute_dtype_on_accelerators(kind, precision, expected):
    assert compute_dtype(kind, precision) == expected


@pytest.mark.parametrize(
    "precision, native, expected",
    [
        ("amp", False, "fp32"),  # runtime/device.py: amp runs fp32 on a CPU without native bf16
        ("amp", True, "bf16"),  # ... and bf16 autocast with it
        ("amp_bf16", False, "bf16"),  # forced bf16, emulated
        ("bf16", False, "bf16"),
        ("pure_bf16", True, "bf16"),
        ("fp32", True, "fp32"),  # no TF32 on a CPU
    ],
)
def test_compute_dtype_on_the_cpu(precision, native, expected):
    assert compute_dtype("cpu", precision, cpu_bf16=native) == expected


def test_unknown_precision_is_one_line():
    with pytest.raises(ValueError, match="precision 'fp8': expected one of amp, "):
        compute_dtype("cuda", "fp8")


@pytest.mark.parametrize(
    "name, dtype, expected",
    [
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),  # SXM
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "fp16", 835.5),
        ("NVIDIA H200", "tf32", 494.5),
        ("Tesla V100-SXM2-32GB", "fp16", 125.0),
        ("Tesla V100-PCIE-16GB", "fp16", 112.0),
        ("Tesla V100-SXM2-32GB", "tf32", 15.7),  # no TF32 units: fp32 it is
        ("Tesla V100-SXM2-32GB", "bf16", None),  # no bf16 units: no figure rather than a guess
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA A10G", "bf16", None),  # another card: "A10" matches whole words only
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA L4", "fp32", 30.3),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("AMD Instinct MI250X/MI250", "bf16", 191.5),
        ("nvidia b200", "bf16", 2250.0),  # any case
        ("NVIDIA GB200", "bf16", None),
        ("AMD EPYC 7B13 64-Core Processor", "fp32", None),
        ("", "bf16", None),
    ],
)
def test_peak_lookup(name, dtype, expected):
    assert peak_tflops(name, dtype) == expected


def test_unknown_dtype_is_one_line():
    with pytest.raises(ValueError, match="dtype 'int8': expected one of bf16, fp16, tf32, fp32"):
        peak_tflops("NVIDIA A100", "int8")


def test_table_is_dense_figures_in_a_sane_order():
    """Every row holds known dtypes, and per device bf16/fp16 >= tf32 >= fp32 (a sparse figure typed in
    for a dense one, or a swapped pair, would break the order or the ratios between cards)."""
    for name, peaks in PEAK_TFLOPS.items():
        assert set(peaks) <= {"bf16", "fp16", "tf32", "fp32"}, name
        ordered = [peaks[d] for d in ("fp16", "tf32", "fp32") if d in peaks]
        assert ordered == sorted(ordered, reverse=True), name
        assert peaks.get("bf16", peaks["fp16"]) == peaks["fp16"], name
    assert PEAK_TFLOPS["H200"] == PEAK_TFLOPS["H100"]


def test_mfu_arithmetic():
    assert mfu(156.0, 312.0) == pytest.approx(0.5)
    assert mfu(0.0, 989.0) == 0.0
    assert mfu(100.0, None) is None
    with pytest.raises(ValueError, match="peak 0"):
        mfu(1.0, 0.0)
    with pytest.raises(ValueError, match="achieved_tflops -1"):
        mfu(-1.0, 312.0)


def test_device_name_of_the_cpu_and_of_a_backend(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
    assert cpu_name(str(cpuinfo)) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_name(str(tmp_path / "missing")) != ""  # platform.processor() or "unknown CPU"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    assert device_name("cuda") == "NVIDIA H100 80GB HBM3"
    assert device_name("cpu") == cpu_name()

"""benchmarks/mfu.py, the MFU step of benchmarks/gpu_seed_config.sh (which needs a GPU): on a bench_train
result as that script gets it, each contender's MFU is its samples/s times the counted FLOPs per sample over
the GPU's peak, and acc_clip's logged figures are read from its run folders (steps after --skip only)."""

from __future__ import annotations

import json

import open_clip
import pytest

from acc_clip.model.flops import count_train_flops
from benchmarks import mfu
from helpers import TINY_RN


def test_mfu_of_a_bench_result(tmp_path, capsys):
    logs = tmp_path / "runs"
    (logs / "r0_open_clip_csv").mkdir(parents=True)  # open_clip's folder: no metrics.jsonl
    (logs / "r0_acc_clip_csv").mkdir()
    rows = [{"step": 0, "mfu": 0.9, "tflops_per_device": 900.0}, {"step": 1, "mfu": 0.2, "tflops_per_device": 200.0}]
    rows += [{"step": 2, "mfu": 0.4, "tflops_per_device": 400.0}, {"step": 3, "mfu": 0.3, "tflops_per_device": 300.0}]
    (logs / "r0_acc_clip_csv" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = {
        "setup": {"model": TINY_RN, "precision": "fp32", "skip": 1, "logs": str(logs)},
        "device_name": "NVIDIA A100-SXM4-80GB",
        "summary": {"contenders": {"open_clip/csv": {"samples_per_second": {"median": 1000.0}}}},
    }
    (tmp_path / "bench.json").write_text(json.dumps(report))

    assert mfu.main(["--results", str(tmp_path / "bench.json"), "--json", str(tmp_path / "mfu.json")]) == 0
    figures = json.loads((tmp_path / "mfu.json").read_text())
    assert mfu.model_flops(TINY_RN)[1:] == ((64, 64), 32)  # the config's image size and context length
    per_sample = count_train_flops(open_clip.create_model(TINY_RN), image_size=64, context_length=32).total
    assert figures["flops_per_sample"]["total"] == per_sample
    assert figures["compute_dtype"] == "tf32" and figures["peak_tflops"] == 156.0  # CUDA makes fp32 TF32
    achieved = 1000.0 * per_sample / 1e12
    assert figures["contenders"]["open_clip/csv"]["mfu"] == pytest.approx(achieved / 156.0)
    assert figures["logged"] == {"r0_acc_clip_csv": {"mfu": 0.3, "tflops_per_device": 300.0}}  # median of 3
    assert "open_clip/csv" in capsys.readouterr().out

"""benchmarks/bench_train.py: the side-by-side benchmark end to end for a few steps (no timing
assertions: the figures depend on the machine), and its log parsing, pairing and summary; and the
CPU fast paths it measured (compute threads, fused AdamW) switching on where they should."""

from __future__ import annotations

import json
import sys
from argparse import Namespace

import pytest

from acc_clip.errors import AccClipError
from benchmarks import bench_train
from helpers import REPO, TINY_RN


def test_csv_and_shards_end_to_end(tmp_path, capsys):
    results = tmp_path / "bench.json"
    argv = [
        "--mode",
        "csv,shards",
        "--model",
        TINY_RN,
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--steps",
        "4",
        "--skip",
        "1",
        "--runs",
        "2",
        "--time-budget",
        "1",
        "--images",
        "40",
        "--size",
        "160x120",
        "--samples-per-shard",
        "16",
        "--data-dir",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "runs"),
        "--json",
        str(results),
    ]
    assert bench_train.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(results.read_text())

    # The open_clip baseline is shared by both modes: three contenders, one round (the budget of 1 s
    # stops the second round from starting), every run with all its steps logged.
    contenders = report["summary"]["contenders"]
    assert list(contenders) == ["open_clip/csv", "acc_clip/csv", "acc_clip/shards"]
    assert report["rounds_done"] == 1 and "stopped after 1 of 2 rounds" in report["stopped_early"]
    assert [r["contender"] for r in report["runs"]] == list(contenders)
    assert all(r["steps"] == 4 for r in report["runs"])
    for row in contenders.values():
        speed = row["samples_per_second"]
        assert 0 < speed["min"] <= speed["median"] <= speed["max"]
        assert row["data_ms"] >= 0 and row["compute_ms"] > 0
        assert row["host_peak_rss_mib"] > 0 and row["device_peak_mib"] is None  # CPU: no device memory
    assert set(report["summary"]["ratios"]) == {"acc_clip/csv / open_clip/csv", "acc_clip/shards / open_clip/csv"}
    assert report["load_average"]["min"] <= report["load_average"]["max"]

    # Both trainers read the same run CSV of exactly steps x batch rows; acc_clip's shards exist.
    run_csv = next((tmp_path / "data").glob("coco_40_160x120/train_32.csv"))
    assert len(run_csv.read_text().splitlines()) == 1 + 32
    from acc_clip.prep.shards.convert import DEFAULT_QUALITY

    assert list((tmp_path / "data").glob(f"coco_40_160x120/shards_r256_q{DEFAULT_QUALITY}_n16/*.tar"))
    for name in (
        "ratio acc_clip/csv / open_clip/csv:",
        "ratio acc_clip/shards / open_clip/csv:",
        "load average",
        "samples/s median [min-max]",
        "data ms",
        "compute ms",
        "peak RSS MiB",
    ):
        assert name in printed


def test_too_little_data_names_the_flag_to_raise(tmp_path):
    with pytest.raises(AccClipError, match="raise --images to at least 7"):
        bench_train.prepare_data(
            tmp_path, images=2, size=(32, 32), steps=4, batch_size=8, need_csv=True, resize=None, samples_per_shard=16
        )


def test_step_times_from_both_logs(tmp_path):
    out_log = tmp_path / "out.log"
    out_log.write_text(
        "2026-11-26,18:46:15 | INFO | Train Epoch: 0 [ 32/1280 (2%)] Data (t): 0.251 Batch (t): 0.998, "
        "32.0740/s, 32.0740/s/gpu LR: 0.000050 Logit Scale: 14.286 Loss: 4.0077 (4.0077)\n"
        "2026-11-26,18:46:15 | INFO | Start epoch 0\n"
        "2026-11-26,18:46:16 | INFO | Train Epoch: 0 [ 64/1280 (5%)] Data (t): 0.009 Batch (t): 0.319, "
        "100.229/s, 100.229/s/gpu LR: 0.000100 Logit Scale: 14.285 Loss: 3.8675 (3.9376)\n"
    )
    steps = bench_train.open_clip_steps(out_log, batch_size=32)
    assert [s.data_time for s in steps] == [0.251, 0.009]
    assert steps[1].batch_time == pytest.approx(32 / 100.229)  # from samples/s, finer than Batch (t)

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps({"step": i, "data_time": d, "batch_time": b}) + "\n"
            for i, (d, b) in enumerate([(0.5, 2.0), (0.1, 1.0), (0.3, 3.0)])
        )
    )
    steps = bench_train.acc_clip_steps(metrics)
    # Samples over time of the steady steps, not a mean of per-step rates: 2 x 8 / (1 + 3) = 4.
    assert bench_train.steady_samples_per_second(steps, batch_size=8, skip=1) == pytest.approx(4.0)
    with pytest.raises(AccClipError, match="none left after skipping 3"):
        bench_train.steady_samples_per_second(steps, batch_size=8, skip=3)


def test_contenders_share_the_baseline_and_variants_reach_only_acc_clip(tmp_path):
    contenders = bench_train.contenders_for(["csv", "shards", "model"], [("cl", ("--channels-last",))])
    assert [c.name for c in contenders] == [
        "open_clip/csv",
        "acc_clip/csv",
        "acc_clip/csv+cl",
        "acc_clip/shards",
        "acc_clip/shards+cl",
        "open_clip/synthetic",
        "acc_clip/synthetic",
        "acc_clip/synthetic+cl",
    ]
    args = Namespace(model=TINY_RN, batch_size=8, workers=1, precision="fp32", device=None, steps=5)
    data = bench_train.BenchData(tmp_path / "run.csv", tmp_path / "shards", 40)
    open_clip = bench_train.command_for(contenders[5], args, data, tmp_path, "a")
    acc_clip = bench_train.command_for(contenders[7], args, data, tmp_path, "b")
    assert open_clip[3] == "open_clip_train.main" and acc_clip[3] == "acc_clip.train"
    for command in (open_clip, acc_clip):
        assert command[command.index("--dataset-type") + 1] == "synthetic"
        assert command[command.index("--train-num-samples") + 1] == "40"
        assert "--train-data" not in command
    # open_clip runs exactly its one epoch of 5 batches; acc_clip is capped at the same 5 steps.
    assert "--max-steps" not in open_clip and "--channels-last" not in open_clip
    assert acc_clip[acc_clip.index("--max-steps") + 1] == "5" and "--channels-last" in acc_clip
    shards = bench_train.command_for(contenders[3], args, data, tmp_path, "c")
    assert shards[shards.index("--train-data") + 1] == str(tmp_path / "shards")
    assert shards[shards.index("--dataset-type") + 1] == "webdataset"


def _run(contender: str, round_: int, speed: float) -> bench_train.RunResult:
    return bench_train.RunResult(contender, round_, 10, speed, 1.0, 2.0, 3.0, 5.0, 4.0, (1.0, 1.5), None, 2**20)


def test_summary_pairs_ratios_by_round():
    contenders = bench_train.contenders_for(["csv"], [])
    results = [
        _run("open_clip/csv", 0, 100.0),
        _run("acc_clip/csv", 0, 150.0),
        _run("open_clip/csv", 1, 50.0),
        _run("acc_clip/csv", 1, 100.0),
        _run("open_clip/csv", 2, 80.0),
        _run("acc_clip/csv", 2, 60.0),
    ]
    summary = bench_train.summarise(results, contenders)
    assert summary["contenders"]["acc_clip/csv"]["samples_per_second"] == {"median": 100.0, "min": 60.0, "max": 150.0}
    ratio = summary["ratios"]["acc_clip/csv / open_clip/csv"]
    assert ratio["of_medians"] == pytest.approx(100.0 / 80.0)
    assert (ratio["per_round_min"], ratio["per_round_max"]) == pytest.approx((0.75, 2.0))


def test_variant_syntax():
    assert bench_train.parse_variant("both=--channels-last --torchcompile") == (
        "both",
        ("--channels-last", "--torchcompile"),
    )
    with pytest.raises(Exception, match="NAME=FLAGS"):
        bench_train.parse_variant("--channels-last")


def test_gpu_script_is_valid_bash():
    import subprocess

    result = subprocess.run(
        ["bash", "-n", str(REPO / "benchmarks" / "gpu_seed_config.sh")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


# --- fast paths --------------------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_compute_threads_leave_a_core_per_loader_worker(monkeypatch, restore_threads):
    import torch

    from acc_clip.runtime.device import plan_device
    from acc_clip.train.run import limit_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    cpu = plan_device("cpu", "fp32")
    limit_cpu_threads(cpu, workers=2, world_size=1)
    assert torch.get_num_threads() == 6
    limit_cpu_threads(cpu, workers=3, world_size=2)  # 4 cores per process, 3 of them for its workers
    assert torch.get_num_threads() == 1
    limit_cpu_threads(cpu, workers=16, world_size=1)  # never fewer than one
    assert torch.get_num_threads() == 1
    torch.set_num_threads(5)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's choice wins
    limit_cpu_threads(cpu, workers=2, world_size=1)
    assert torch.get_num_threads() == 5


def test_fused_adamw_on_cpu_and_cuda_only():
    import torch

    from acc_clip.model.optim import OptimizerOptions, create_optimizer, fused_adamw_available, resolve_defaults

    def options(**values) -> OptimizerOptions:  # as the train command resolves them, for its default model
        resolved = OptimizerOptions(**values)
        resolve_defaults(resolved, "RN50")
        return resolved

    assert fused_adamw_available("cuda") and not fused_adamw_available("sdaa")
    assert fused_adamw_available("cpu") == (tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 4))
    model = torch.nn.Linear(3, 2)
    assert create_optimizer(model, options(), "cpu").defaults["fused"] == (fused_adamw_available("cpu") or None)
    assert create_optimizer(model, options(), "sdaa").defaults["fused"] is None
    # --no-fused-adamw: open_clip_train's unfused update (the parity tool's --open-clip-arithmetic uses it)
    assert not create_optimizer(model, options(fused_adamw=False), "cpu").defaults["fused"]
    assert create_optimizer(model, options(fused_adamw=True), "cpu").defaults["fused"]


# --- benchmarks/gpu_seed_config.sh --------------------------------------------------------------


def test_gpu_script_dry_run_end_to_end(tmp_path):
    """`--dry-run`, as the GPU machine's first check would run it: the tiny model, 6 steps a run, one
    round of the five contenders (measured 32-39 s on the 2-core CPU). Data and run logs go under TMPDIR,
    the results JSON and the logs' tails under OUT."""
    import os
    import subprocess

    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_seed_config.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "OUT": str(out)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "bench_train_seed.json").read_text())
    assert list(report["summary"]["contenders"]) == [
        "open_clip/csv",
        "acc_clip/csv",
        "acc_clip/csv+decode_on_device",
        "acc_clip/shards",
        "acc_clip/shards+decode_on_device",
    ]
    assert report["rounds_done"] == 1 and all(run["steps"] == 6 for run in report["runs"])
    assert (out / "bench_train_seed_tails.txt").read_text().count("== ") == 5
    assert "results JSON:" in result.stdout and "total " in result.stdout


STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for python: records the benchmark's arguments instead of running it; skips the
# version report read from stdin; runs anything else.
if [[ "$1" == "-m" && "$2" == "benchmarks.bench_train" ]]; then
  shift 2
  exec "$REAL_PYTHON" -c 'import json, os, sys; json.dump(sys.argv[1:], open(os.environ["STUB_ARGV"], "w"))' "$@"
fi
if [[ "$1" == "-" ]]; then cat > /dev/null; exit 0; fi
exec "$REAL_PYTHON" "$@"
"""


def _gpu_script_arguments(tmp_path, *flags: str) -> tuple[int, list[str] | None, str]:
    import os
    import subprocess

    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    recorded = tmp_path / "argv.json"
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_seed_config.sh"), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "PYTHON": str(stub),
            "REAL_PYTHON": sys.executable,
            "STUB_ARGV": str(recorded),
            "TMPDIR": str(tmp_path),
        },
    )
    argv = json.loads(recorded.read_text()) if recorded.exists() else None
    return result.returncode, argv, result.stderr


@pytest.mark.parametrize("mode", ["", "--fast-paths", "--input-paths"])
def test_gpu_script_composes_what_the_benchmark_and_acc_clip_accept(tmp_path, mode):
    """The GPU runs themselves (RN50, amp, 100 steps) are not run here; what they are made of is: the
    arguments the script gives bench_train parse, name known modes, fit the 8-minute budget, and every
    variant's flags are acc_clip flags (a renamed flag would otherwise fail on the GPU machine)."""
    from acc_clip.train.config import parse_train_config

    returncode, argv, stderr = _gpu_script_arguments(tmp_path, *([mode] if mode else []))
    assert returncode == 0 and argv is not None, stderr
    args = bench_train.build_parser().parse_args(argv)
    assert (args.model, args.precision, args.batch_size, args.workers, args.steps) == ("RN50", "amp", 64, 4, 100)
    assert 0 < args.time_budget <= 450
    modes = args.mode.split(",")
    assert set(modes) <= set(bench_train.MODE_SOURCES)
    contenders = bench_train.contenders_for(modes, args.variant)
    expected = {
        "": {"decode_on_device"},
        "--fast-paths": {"no_channels_last", "compile", "grad_checkpointing", "no_cudnn_benchmark"},
        "--input-paths": {"no_pin_memory", "decode_on_device"},
    }[mode]
    assert {name for name, _ in args.variant} == expected
    assert sum(c.trainer == "acc_clip" and bool(c.extra) for c in contenders) == len(expected) * len(modes)
    for _, flags in args.variant:
        parse_train_config(["--train-data", "x.csv", *flags])  # raises on an unknown flag


def test_gpu_script_refuses_an_unknown_argument(tmp_path):
    returncode, argv, stderr = _gpu_script_arguments(tmp_path, "--dryrun")
    assert returncode == 2 and argv is None and "unknown argument --dryrun" in stderr

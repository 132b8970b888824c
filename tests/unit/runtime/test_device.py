"""The device hook (acc_clip.runtime.device): what it decides for SDAA, CUDA-less machines and the CPU.

No SDAA card or SDAA software can exist where these tests run, so the SDAA tests use a stand-in
`torch_sdaa` (tests/sdaa_stub, a mock) that installs a `torch.sdaa` namespace; the subprocess test
also makes "sdaa" a torch device type and "tccl" a process-group backend (gloo underneath), so a
real Accelerator can be built and its own SDAA decisions compared with the plan. Accelerate caches
`is_sdaa_available` with lru_cache: the fixture clears it on the way in and out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import is_sdaa_available

from acc_clip.errors import AccClipError, ResourceError
from acc_clip.runtime.device import (
    backend_matches,
    check_bn_sync,
    check_compile,
    hide_gpus_from_cpu_processes,
    make_accelerator,
    plan_device,
)
from acc_clip.runtime.memory import MemoryMeter
from acc_clip.runtime.parallel import FsdpFlags, TorchCompile
from helpers import REPO

STUB = REPO / "tests" / "sdaa_stub"


@pytest.fixture
def sdaa(monkeypatch):
    """The stand-in torch_sdaa imported, with 2 cards."""
    monkeypatch.setenv("SDAA_STUB_DEVICES", "2")
    monkeypatch.syspath_prepend(str(STUB))
    is_sdaa_available.cache_clear()
    import torch_sdaa

    yield torch_sdaa
    del torch.sdaa
    sys.modules.pop("torch_sdaa", None)
    is_sdaa_available.cache_clear()


def test_sdaa_plan_follows_accelerate(sdaa, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    plan = plan_device(None, "amp")
    assert (plan.kind, plan.device, plan.backend, plan.distributed_type) == ("sdaa", "sdaa:1", "tccl", "MULTI_SDAA")
    assert (plan.mixed_precision, plan.autocast_dtype, plan.autocast_device_type) == ("fp16", torch.float16, "sdaa")
    assert plan.uses_grad_scaler and plan.pin_memory and plan.visible_devices_variable == "SDAA_VISIBLE_DEVICES"
    # (runtime.device.grad_scaler is gone: Accelerate's own scaler is checked in test_accelerate_places_sdaa_as_planned)
    assert plan_device("sdaa", "amp_bf16", local_rank=3).device == "sdaa:3"
    assert plan_device("sdaa", "amp_bf16").uses_grad_scaler is False
    assert MemoryMeter(plan.kind).step_figures() == {"memory_peak_gib": 123 / 1024}  # what the stub's allocator has
    check_bn_sync(plan, True)  # SyncBatchNorm runs on SDAA: no refusal


def test_sdaa_installed_without_a_card(sdaa, monkeypatch):
    monkeypatch.setenv("SDAA_STUB_DEVICES", "0")
    is_sdaa_available.cache_clear()
    assert plan_device(None, "amp").kind == "cpu"
    with pytest.raises(AccClipError, match=r"torch_sdaa is installed but torch.sdaa sees no card"):
        plan_device("sdaa", "amp")


def test_without_torch_sdaa_device_sdaa_fails_with_one_line(in_process, capsys):
    """`acc-clip train --device sdaa` where torch_sdaa is not installed, in this process (acc_clip.cli.main)."""
    import importlib.util

    from acc_clip.cli import main

    assert importlib.util.find_spec("torch_sdaa") is None  # the stand-in is only importable under the fixture
    # A missing device is the machine's (ResourceError, 5), no longer the one usage status 2 of before error kinds.
    assert main(["train", "--device", "sdaa", "--train-data", "x.csv"]) == ResourceError.exit_status == 5
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: --device sdaa needs the torch_sdaa package")
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_accelerate_places_sdaa_as_planned():
    """A real Accelerator under the stand-in, as rank 0 of a one-process tccl group on local card 1."""
    script = textwrap.dedent("""
        import json, torch, torch_sdaa
        torch_sdaa.install_device_backend()
        from acc_clip.runtime.device import make_accelerator, plan_device
        plan = plan_device(None, "amp")
        accelerator = make_accelerator(plan)
        with accelerator.autocast():
            autocast = [torch.is_autocast_enabled("sdaa"), str(torch.get_autocast_dtype("sdaa"))]
        print(json.dumps({"plan": [plan.device, plan.backend, plan.distributed_type],
                          "accelerate": [str(accelerator.device), accelerator.state.backend,
                                         accelerator.distributed_type.value],
                          "scaler": type(accelerator.scaler).__module__ + "." + type(accelerator.scaler).__name__,
                          "autocast": autocast, "set_device": [str(d) for d in torch_sdaa.set_devices]}))
    """)
    env = {
        **os.environ,
        "PYTHONPATH": str(STUB),
        "SDAA_STUB_DEVICES": "2",
        "LOCAL_RANK": "1",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["plan"] == ["sdaa:1", "tccl", "MULTI_SDAA"]
    assert seen["accelerate"] == ["sdaa:1", "tccl", "MULTI_SDAA"]
    assert seen["scaler"] == "torch_sdaa.GradScaler"
    assert seen["autocast"] == [True, "torch.float16"]
    assert seen["set_device"][-1] == "sdaa:1"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "precision, mixed, input_dtype",
    [
        ("amp_bf16", "bf16", None),
        ("amp_bfloat16", "bf16", None),
        ("fp32", "no", None),
        # open_clip's meaning: fp16/bf16 cast the weights, pure_* the whole model; no autocast, no scaler
        ("fp16", "no", torch.float16),
        ("bf16", "no", torch.bfloat16),
        ("pure_fp16", "no", torch.float16),
        ("pure_bf16", "no", torch.bfloat16),
    ],
)
def test_cpu_plan(precision, mixed, input_dtype):
    plan = plan_device("cpu", precision)
    assert (plan.device, plan.backend, plan.mixed_precision, plan.uses_grad_scaler) == ("cpu", "gloo", mixed, False)
    assert plan.input_dtype == input_dtype
    assert set(MemoryMeter(plan.kind).step_figures()) == {"host_resident_gib"}


def write_cpuinfo(path, flags: str):
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 {flags}\n")
    return str(path)


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    """The CPUs themselves cannot be had here: their /proc/cpuinfo flags are written instead."""
    from acc_clip.runtime.device import cpu_has_native_bf16

    assert cpu_has_native_bf16(write_cpuinfo(tmp_path / "sapphire", "avx2 avx512f avx512_bf16 amx_bf16"))
    assert cpu_has_native_bf16(write_cpuinfo(tmp_path / "zen4", "avx2 avx512f avx512_bf16"))
    assert not cpu_has_native_bf16(write_cpuinfo(tmp_path / "avx2", "avx2 fma"))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "precision, native, mixed, says",
    [
        ("amp", True, "bf16", "runs as bf16 autocast"),
        ("amp", False, "no", "runs fp32: this CPU has no native bf16"),  # open_clip would autocast: 20x slower there
        ("amp_bf16", False, "bf16", "emulated and slow"),  # asked for by name: kept, with a warning
        ("amp_bf16", True, "bf16", None),
        ("fp32", False, "no", None),
    ],
)
def test_cpu_amp_runs_fp32_where_bf16_is_emulated(precision, native, mixed, says):
    from acc_clip.runtime.device import MIXED_PRECISION, cpu_mixed_precision

    got, note = cpu_mixed_precision(precision, MIXED_PRECISION[precision], native)
    assert got == mixed
    assert (says in note) if says else note == ""


def test_other_accelerate_devices_are_refused_where_torch_has_none():
    for device in ("npu", "xpu", "mps"):
        with pytest.raises(AccClipError, match=f"--device {device}: torch sees no {device} device"):
            plan_device(device, "fp32")
    with pytest.raises(AccClipError, match="expected sdaa, cuda, npu, xpu, mps or cpu"):
        plan_device("tpu", "fp32")


def test_dist_backend_reaches_the_plan():
    assert plan_device("cpu", "fp32", backend="gloo").backend == "gloo"
    assert plan_device("cpu", "fp32").backend == "gloo"


def test_cpu_accelerator_uses_the_planned_precision():
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = make_accelerator(plan_device("cpu", "amp_bf16"))
        assert accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16"
        assert accelerator.num_processes == 1
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_bad_device_requests():
    with pytest.raises(AccClipError, match="expected sdaa, cuda, npu, xpu, mps or cpu"):
        plan_device("tpu", "amp")
    with pytest.raises(AccClipError, match="--use-bn-sync needs CUDA or SDAA"):
        check_bn_sync(plan_device("cpu", "fp32"), True)
    check_bn_sync(plan_device("cpu", "fp32"), False)
    if not torch.cuda.is_available():
        with pytest.raises(AccClipError, match="no CUDA device"):
            plan_device("cuda", "amp")


def test_cpu_processes_do_not_touch_the_gpus(monkeypatch):
    """Several CPU processes on a GPU machine: Accelerate's barrier would run gloo on cuda:LOCAL_RANK and
    fail with fewer GPUs than processes (seen on a one-GPU H100 machine). So --device cpu must not
    query CUDA, and the hook hides the GPUs from such processes before the Accelerator exists."""

    def no_cuda_queries():
        raise AssertionError("--device cpu asked CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda_queries)
    plan = plan_device("cpu", "fp32")
    env = {"WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0"}
    assert hide_gpus_from_cpu_processes(plan, env) and env["CUDA_VISIBLE_DEVICES"] == ""
    alone = {"WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": "0"}
    assert not hide_gpus_from_cpu_processes(plan, alone) and alone["CUDA_VISIBLE_DEVICES"] == "0"
    on_gpu = {"WORLD_SIZE": "2"}
    assert not hide_gpus_from_cpu_processes(replace(plan, kind="cuda"), on_gpu) and "CUDA_VISIBLE_DEVICES" not in on_gpu


def test_compiled_step_with_a_grad_scaler_is_one_line():
    """--torchcompile-strategy step compiles a plain backward and optimizer step: refused where --precision
    amp scales fp16 losses (CUDA, SDAA), accepted where it does not (amp on the CPU is bf16 or fp32)."""
    scaled = replace(plan_device("cpu", "fp32"), kind="cuda", uses_grad_scaler=True)  # what amp plans on CUDA
    with pytest.raises(AccClipError) as error:
        check_compile(scaled, TorchCompile("step"))
    assert str(error.value) == (
        "--torchcompile-strategy step needs a precision without grad scaler, and --precision amp on cuda "
        "scales fp16 losses; use --precision amp_bf16 or fp32, or another strategy"
    )
    check_compile(scaled, TorchCompile("task"))
    check_compile(scaled, None)
    check_compile(plan_device("cpu", "amp"), TorchCompile("step"))


def test_the_planned_backend_is_found_in_accelerates_pair_for_offload():
    """With FSDP's CPU offload on nccl, Accelerate starts "cuda:nccl,cpu:gloo"; the plan said nccl."""
    assert backend_matches("nccl", "cuda:nccl,cpu:gloo") and backend_matches("gloo", "gloo")
    assert not backend_matches("nccl", "gloo") and not backend_matches("gloo", None)


def test_fsdp_cpu_offload_on_the_cpu_is_one_line(monkeypatch):
    """torch's CPU offload pins host memory, which needs a GPU, and moves nothing on the CPU."""
    for key in [*FsdpFlags().variables(), "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.setenv(key, "")  # put back as it was after the test (make_accelerator sets them)
        monkeypatch.delenv(key)
    with pytest.raises(AccClipError, match=r"^FSDP's CPU offload \(--fsdp-offload-cpu, or fsdp_offload_params"):
        make_accelerator(plan_device("cpu", "fp32"), fsdp=FsdpFlags(offload_cpu=True))

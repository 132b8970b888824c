"""FSDP2 on two CPU processes (gloo), launched as a user would with `accelerate launch --config_file
launch/cpu_2proc_fsdp.yaml`: sharded training gives the losses and weights of DDP (launch/cpu_2proc.yaml)
and of one process with twice the batch, over 20 steps of plain SGD (lr 1, so a gradient off by any
factor shows), with --accum-freq 2 (one gradient reduce-scatter per update) and --gather-with-grad
--local-loss; tiny-rn too (against DDP only: batch norm normalises each process's rows).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from background_trainer import ACCELERATE, free_port
from conftest import REPO
from dist_worker import max_difference
from fsdp_worker import SCENARIOS, SHORT_SCENARIOS, SHORT_STEPS, STEPS

# Measured on this CPU (fsdp_worker, 20 steps): FSDP and DDP agree bit for bit (0.0); against one process
# losses within 2.4e-7 and weights within 1.2e-6 (fp32 summation order). A gradient off by a factor of 2,
# or one micro-batch's gradient missing, moves weights by ~1e-2.
TOLERANCE = 1e-5
ALL = {**SCENARIOS, **SHORT_SCENARIOS}
WITH_ONE_PROCESS_REFERENCE = [name for name, (model, _, _) in ALL.items() if "tiny-rn" not in model]


def launch(config: str) -> list[str]:
    return [ACCELERATE, "launch", "--config_file", str(REPO / "launch" / config), "--main_process_port",
            str(free_port())]


def run_worker(launcher: list[str], out, train_csv) -> None:
    result = subprocess.run(launcher + [str(REPO / "tests" / "fsdp_worker.py"), str(out), str(train_csv)],
                            timeout=600, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def results(train_csv, tmp_path_factory) -> dict:
    """{"fsdp" | "ddp" | "one": folder of <scenario>.pt}."""
    folders = {kind: tmp_path_factory.mktemp(kind) for kind in ("fsdp", "ddp", "one")}
    run_worker(launch("cpu_2proc_fsdp.yaml"), folders["fsdp"], train_csv)
    run_worker(launch("cpu_2proc.yaml"), folders["ddp"], train_csv)
    run_worker([sys.executable], folders["one"], train_csv)
    return folders


def load(results, kind: str, scenario: str) -> dict:
    return torch.load(results[kind] / f"{scenario}.pt")


def steps_of(scenario: str) -> int:
    return STEPS if scenario in SCENARIOS else SHORT_STEPS


@pytest.mark.parametrize("scenario", ALL)
def test_fsdp_matches_ddp(results, scenario):
    fsdp, ddp = load(results, "fsdp", scenario), load(results, "ddp", scenario)
    assert len(fsdp["losses"]) == steps_of(scenario)
    assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=TOLERANCE)
    assert max_difference(fsdp["weights"], ddp["weights"]) <= TOLERANCE


@pytest.mark.parametrize("scenario", WITH_ONE_PROCESS_REFERENCE)
def test_fsdp_matches_one_process_with_twice_the_batch(results, scenario):
    fsdp, one = load(results, "fsdp", scenario), load(results, "one", scenario)
    assert fsdp["losses"] == pytest.approx(one["losses"], abs=TOLERANCE)
    assert max_difference(fsdp["weights"], one["weights"]) <= TOLERANCE


def test_full_state_dict_is_open_clips(results):
    """The gathered weights have open_clip's names and shapes: logit_scale 0-d again (held as a
    1-element vector while sharded), no wrapper prefixes."""
    import open_clip

    weights = load(results, "fsdp", "vit")["weights"]
    model = open_clip.create_model(f"local-dir:{REPO / 'configs' / 'models' / 'tiny-vit'}")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("plain, accumulated", [("vit", "vit_accum2"), ("rn", "rn_local_accum2")])
def test_accumulation_reduce_scatters_once_per_update(results, plain, accumulated):
    """FSDP2 reduce-scatters once per unit per reduction: two micro-batches per step must cost what one
    does (the first micro-batch's backward runs with set_requires_gradient_sync(False))."""
    once = load(results, "fsdp", plain)["reduce_scatters"]
    assert len(once) == STEPS and all(calls > 0 for calls in once)
    assert load(results, "fsdp", accumulated)["reduce_scatters"] == once

"""Layer decay under FSDP2: the groups are formed by name on the unwrapped model, before fully_shard swaps the
parameters (runtime/parallel.py moves the optimizer onto the new ones, each group's lr scale kept). Two processes
under FSDP2 then train as one process with twice the batch, under plain SGD (lr 1 times each group's scale), to the
tolerance of tests/integration/test_fsdp.py. Only the fsdp_worker scenario `vit_layer_decay` runs here
(test_fsdp.py runs it with the others, against DDP too)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from background_trainer import launch_with
from helpers import REPO, max_difference

TOLERANCE = 1e-5  # tests/integration/test_fsdp.py's, measured there
SCENARIO = "vit_layer_decay"


def run_worker(launcher: list[str], out, train_csv) -> dict:
    result = subprocess.run(
        [*launcher, str(REPO / "tests" / "fsdp_worker.py"), str(out), str(train_csv), SCENARIO],
        timeout=600,
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / f"{SCENARIO}.pt")


def test_layer_decay_under_fsdp_trains_as_one_process(train_csv, tmp_path):
    sharded = run_worker(launch_with("cpu_2proc_fsdp.yaml"), tmp_path, train_csv)
    single = run_worker([sys.executable], tmp_path, train_csv)
    assert (sharded["fsdp"], sharded["processes"], single["processes"]) == (True, 2, 1)
    difference = max_difference(sharded["weights"], single["weights"])
    print(f"\nlayer decay, FSDP against one process: losses {sharded['losses']}, weights {difference:.3g}")
    assert sharded["losses"] == pytest.approx(single["losses"], abs=TOLERANCE) and difference <= TOLERANCE

"""Every run records its optimizer's groups: <run>/param_groups.json names each trainable parameter with its group,
lr scale and weight decay (open_clip_train 3.3's rule for a run that asks for nothing new), and the start-up log
summarises them. A resume whose groups would differ from the checkpoint's (another layer decay, weight decay or
--wd-exclude: the optimizer state maps to its groups by their order) is refused in one line."""

from __future__ import annotations

import json

import pytest

from helpers import run_trainer, tiny_train_args

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_param_groups_are_recorded_and_a_resume_with_other_groups_is_refused(small_csv, tmp_path):
    args = tiny_train_args(small_csv, tmp_path, "run", "--save-every-n-steps", "2")
    result = run_trainer([*args, "--max-steps", "2"])
    record = json.loads((tmp_path / "run" / "param_groups.json").read_text())
    assert record["weight_decay_rule"] == "open_clip_train 3.3's weight-decay rule"
    names = [p["name"] for p in record["parameters"]]
    assert len(names) == len(set(names)) and "visual.conv1.weight" in names and "logit_scale" in names
    assert sum(g["tensors"] for g in record["groups"]) == len(names) and len(record["groups"]) == 2
    by_name = {p["name"]: p for p in record["parameters"]}
    assert by_name["logit_scale"]["weight_decay"] == 0.0 and by_name["positional_embedding"]["weight_decay"] == 0.2
    assert "parameter groups (open_clip_train 3.3's weight-decay rule)" in result.stderr + result.stdout

    refused = run_trainer([*args, "--resume", "latest", "--image-layer-decay", "0.5"], check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "the optimizer's groups changed" in lines[0]
    assert "image_layer_decay None -> 0.5" in lines[0] and "rule open_clip_train 3.3 -> open_clip main" in lines[0]

    # the same layout (two groups) with another weight decay: without the check the saved 0.2 would load silently
    refused = run_trainer([*args, "--resume", "latest", "--wd", "0.1"], check=False)
    assert refused.returncode == 2 and "the optimizer's groups changed (wd 0.2 -> 0.1)" in refused.stderr

    resumed = run_trainer([*args, "--resume", "latest", "--max-steps", "3"])  # the same flags resume
    assert "training done: 3 steps" in resumed.stderr + resumed.stdout

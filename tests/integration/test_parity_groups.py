"""Layer-wise lr decay against open_clip_train 3.3 given the same per-parameter learning rates: a tiny ViT with
`--image-layer-decay 0.75 --text-layer-decay 0.8`, in test_parity.py's flat-colour setting (same batches, same
learning rates, one thread, open_clip's arithmetic). open_clip_train 3.3 has no layer decay: it trains through
tests/open_clip_train_groups.py, which builds its AdamW over the groups acc_clip's param_groups.py forms for its
model and scales each group's lr as open_clip main's assign_learning_rate does. What ties the two: the groups that
wrapper used equal, parameter by parameter, acc_clip's param_groups.json (whose equality with main's rule is
tests/unit/model/test_param_groups.py's), and the curves agree within the parity tests' EMA error (2e-5)."""

from __future__ import annotations

import json

from helpers import TINY_VIT
from parity_checks import FLAT_EMA_TOLERANCE, STEPS, assert_same_batches_and_learning_rates, parity

LAYER_DECAY = "--image-layer-decay 0.75 --text-layer-decay 0.8"


def test_layer_decay_follows_open_clip_train_given_the_same_groups(flat_csv, tmp_path):
    report = parity(flat_csv, tmp_path, "--open-clip-arithmetic", "--model", TINY_VIT, "--group-args", LAYER_DECAY)
    result = report["result"]
    assert result.num_points == STEPS and result.aligned_by == "step"
    assert_same_batches_and_learning_rates(report)
    assert result.vendor_passed and result.ema_mean_abs_relative_error <= FLAT_EMA_TOLERANCE

    theirs = json.loads((tmp_path / "open_clip_groups.json").read_text())
    ours = json.loads((tmp_path / "acc_clip" / "param_groups.json").read_text())
    assert {p["name"]: [p["lr_scale"], p["weight_decay"]] for p in ours["parameters"]} == theirs
    scales = sorted({p["lr_scale"] for p in ours["parameters"]})
    assert len(scales) == 7 and min(scales) == 0.75**3  # two towers of 2 blocks: n = 4 groups each
    log = (tmp_path / "acc_clip" / "out.log").read_text()
    assert "parameter groups (open_clip main's groups and weight-decay rule)" in log

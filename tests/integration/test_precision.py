"""--precision with open_clip_train's meaning, on the CPU: fp16 and bf16 cast the weights as open_clip's
create_model does (convert_weights_to_lp: matrices low precision, norms fp32), pure_fp16 and pure_bf16 the
whole model; inputs follow the weights; no autocast and no grad scaler. The trained checkpoint keeps each
weight in the dtype open_clip gives it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_VIT, read_metrics, run_trainer, tiny_train_args


@pytest.mark.parametrize("precision", ["fp16", "pure_bf16"])
def test_cast_precisions_train_with_open_clip_s_weight_dtypes(precision, train_csv, val_csv, tmp_path):
    import json

    import open_clip

    result = run_trainer(
        tiny_train_args(
            train_csv,
            tmp_path,
            precision,
            "--model",
            TINY_VIT,
            "--precision",
            precision,
            "--batch-size",
            "8",
            "--max-steps",
            "2",
            "--save-every-n-steps",
            "2",
            "--val-data",
            str(val_csv),
        )
    )
    # evaluation feeds images in the cast tower's dtype (its norms and embeddings stay fp32 under fp16)
    evaluated = json.loads((tmp_path / precision / "results.jsonl").read_text().splitlines()[0])
    assert torch.isfinite(torch.tensor(evaluated["val_loss"]))
    assert "mixed precision no" in result.stdout  # no autocast: the weights themselves are low precision
    records = read_metrics(tmp_path / precision)
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    saved = load_file(tmp_path / precision / "checkpoints" / "step_00000002" / "model.safetensors")
    reference = open_clip.create_model(TINY_VIT, precision=precision).state_dict()
    dtypes = {key: value.dtype for key, value in reference.items()}
    assert {key: value.dtype for key, value in saved.items()} == dtypes
    low = torch.float16 if precision == "fp16" else torch.bfloat16
    assert low in dtypes.values()
    if precision == "fp16":  # open_clip keeps norms and the temperature in fp32 there
        assert torch.float32 in dtypes.values()
    else:
        assert set(dtypes.values()) == {torch.bfloat16}

"""The three fine-tuning features of one run together: LoRA's adapters (--lora-rank) grouped by layer decay on
both towers, with an EMA of the weights. Each feature has its own tests (test_lora.py, test_ema.py,
test_train_param_groups.py); this one checks what only their combination does: param_groups.json lists only the
adapters, scaled by their block's depth; `acc-clip export --ema` merges the adapters of the *averaged* weights into
plain open_clip weights, which open_clip loads and which give the merged EMA's features, not the raw weights'."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from acc_clip.checkpoint.export import main as export_main
from acc_clip.model.lora import merge_lora
from helpers import TINY_VIT, run_trainer, tiny_train_args

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

FLAGS = [
    *("--model", TINY_VIT, "--lora-rank", "4", "--lora-alpha", "8", "--ema-decay", "0.9"),
    *("--image-layer-decay", "0.75", "--text-layer-decay", "0.8", "--lr", "1e-2", "--max-steps", "4"),
    *("--save-every-n-steps", "4"),
]


def features(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    texts = open_clip.get_tokenizer(TINY_VIT)(["a dog", "a red car", "two cats on a mat", "snow"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def plain_model(state: dict) -> torch.nn.Module:
    model = open_clip.create_model(TINY_VIT)
    model.load_state_dict(state)  # strict: open_clip's own names, nothing of peft's left
    return model.eval()


def test_lora_adapters_are_grouped_by_depth_and_the_exported_ema_is_merged(small_csv, tmp_path):
    run_trainer(tiny_train_args(small_csv, tmp_path, "run", *FLAGS))
    run_dir = tmp_path / "run"
    entries = json.loads((run_dir / "param_groups.json").read_text())["parameters"]
    # Only the adapters train (and are grouped); two blocks per tower, so a block's adapters are one layer group
    # below the next block's, their lr_scale one decay factor apart.
    assert entries and all(".lora_" in e["name"] for e in entries)
    for tower, decay in (("visual", 0.75), ("text", 0.8)):
        scale = {
            block: {e["lr_scale"] for e in entries if f"resblocks.{block}." in e["name"] and e["tower"] == tower}
            for block in (0, 1)
        }
        assert len(scale[0]) == len(scale[1]) == 1, scale
        assert scale[0].pop() == pytest.approx(scale[1].pop() * decay)

    step = run_dir / "checkpoints" / "step_00000004"
    record = json.loads((step / "complete.json").read_text())["lora"]
    averaged, raw = load_file(step / "ema.safetensors"), load_file(step / "model.safetensors")
    assert max((averaged[k] - raw[k]).abs().max().item() for k in raw if ".lora_B." in k) > 1e-4  # an average
    assert export_main([str(step), "--out", str(tmp_path / "ema"), "--format", "local-dir", "--ema"]) == 0
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ema'}")
    assert not any(".base_layer." in key for key in averaged)  # LoRA's frozen base is not copied into the EMA
    expected = features(plain_model(merge_lora({**raw, **averaged}, record)))
    for ours, theirs in zip(expected, features(exported.eval())):
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    raw_features = features(plain_model(merge_lora(raw, record)))
    assert (raw_features[0] - expected[0]).abs().max() > 1e-5  # the export is the EMA's, not the weights'

    assert export_main([str(step), "--out", str(tmp_path / "ema.pt"), "--ema"]) == 0
    epoch_file = torch.load(tmp_path / "ema.pt", weights_only=True)
    for ours, theirs in zip(expected, features(plain_model(epoch_file["state_dict"]))):
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

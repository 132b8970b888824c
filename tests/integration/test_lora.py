"""LoRA through the trainer (--lora-rank): the merged export (epoch file and local-dir:) loads in plain open_clip
and gives the adapted model's features; a kill -9 in the middle of a save and `--resume latest` give bit-equal
weights to a run never stopped; 2 processes x batch 8 x --accum-freq 2 equal 1 process x batch 32 under plain SGD.

TINY_VIT (two blocks per tower), 160 rows (10 steps of 16), one CPU thread per run: reproducible bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from acc_clip.checkpoint.export import main as export_main
from acc_clip.io.sealed import MANIFEST
from acc_clip.model.build import create_model
from acc_clip.model.lora import apply_lora
from acc_clip.model.weights import load_safetensors_weights, load_weights
from acc_clip.runtime.faults import kill_at
from acc_clip.train.config import parse_train_config
from background_trainer import two_processes
from helpers import PLAIN_SGD, TINY_VIT, max_difference, read_metrics, run_trainer, tiny_train_args

LORA = ["--model", TINY_VIT, "--lora-rank", "4", "--lora-alpha", "8"]
STEPS = 10  # 160 rows of 16

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def lora_run(csv: Path, logs: Path, name: str, *extra: str) -> list[str]:
    return tiny_train_args(csv, logs, name, *LORA, "--epochs", "1", "--lr", "1e-2", *extra)


def adapted_model(args: list[str], step_folder: Path) -> torch.nn.Module:
    """The trainer's adapted model for `args`, with a step checkpoint's weights (base and adapters) loaded."""
    config = parse_train_config(args)[0]
    model = create_model(config.model, precision="fp32", seed=0).model
    apply_lora(model, config.lora, fsdp=False)
    load_safetensors_weights(model, str(step_folder / "model.safetensors"), "test")
    return model.eval()


def features(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    texts = open_clip.get_tokenizer(TINY_VIT)(["a dog", "a red car", "two cats on a mat", "snow"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def test_merged_exports_load_in_open_clip_with_the_adapted_features(small_csv, tmp_path):
    args = lora_run(small_csv, tmp_path, "run", "--save-frequency", "1")
    run_trainer(args)
    run_dir = tmp_path / "run"
    log = (run_dir / "out.log").read_text()
    assert "LoRA: rank 4, alpha 8 (scale 2), towers image,text, layers attn,mlp; 14,336 trainable parameters" in log
    step = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    manifest = json.loads((step / MANIFEST).read_text())
    assert manifest["lora"] == {"rank": 4, "alpha": 8.0, "towers": "image,text", "targets": "attn,mlp"}
    saved = load_file(step / "model.safetensors")
    assert any(".lora_B." in key and saved[key].abs().max() > 0 for key in saved)  # the adapters trained
    adapted = features(adapted_model(args, step))

    assert export_main([str(step), "--out", str(tmp_path / "folder"), "--format", "local-dir"]) == 0
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'folder'}")
    epoch_file = torch.load(run_dir / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert "optimizer" not in epoch_file  # the adapters' state: it fits no open_clip model
    from_epoch = open_clip.create_model(TINY_VIT)
    from_epoch.load_state_dict(epoch_file["state_dict"])  # strict: open_clip's own names
    from_step = open_clip.create_model(TINY_VIT)  # --pretrained STEP, `acc-clip eval`: the one loader merges too
    load_weights(from_step, str(step), "--pretrained")
    for plain in (exported, from_epoch, from_step):
        for ours, theirs in zip(adapted, features(plain.eval())):
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # the base alone (the adapters dropped) gives other features: the check above sees the merge
    base = {k.replace(".base_layer.", "."): v for k, v in saved.items() if ".lora_" not in k}
    unmerged = open_clip.create_model(TINY_VIT)
    unmerged.load_state_dict(base)
    assert (features(unmerged.eval())[0] - adapted[0]).abs().max() > 1e-3


def test_kill_during_a_save_then_resume_gives_bit_equal_weights(small_csv, tmp_path):
    common = ["--save-every-n-steps", "3", "--accum-freq", "2", "--batch-size", "8"]
    run_trainer(lora_run(small_csv, tmp_path, "straight", *common))
    stopped = lora_run(small_csv, tmp_path, "stopped", *common)
    killed = run_trainer(stopped, check=False, env=kill_at("before_commit", 6))
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_trainer([*stopped, "--resume", "latest"])
    log = (tmp_path / "stopped" / "out.log").read_text()
    assert "global step 3" in log.split("resumed from")[-1].splitlines()[0]
    weights = [
        load_file(tmp_path / run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
        for run in ("straight", "stopped")
    ]
    assert sorted(weights[0]) == sorted(weights[1])
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    losses = [[row["loss"] for row in read_metrics(tmp_path / run)] for run in ("straight", "stopped")]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS
    # Another --lora-alpha fits the same weights' shapes but scales the saved adapters differently: refused.
    changed = [*stopped, "--lora-alpha", "16", "--resume", "latest"]  # the later --lora-alpha wins
    refused = run_trainer(changed, check=False)
    assert refused.returncode != 0
    assert "LoRA's settings changed (alpha 8.0 -> 16.0)" in refused.stderr


def test_two_processes_accumulating_equal_one_process(small_csv, tmp_path):
    """2 processes x batch 8 x --accum-freq 2 against 1 process x batch 32, 3 steps of plain SGD: losses and
    weights (the adapters trained, the base untouched) within test_distributed's tolerance."""
    common = [*LORA, "--max-steps", "3", "--save-every-n-steps", "3", "--gather-with-grad", *PLAIN_SGD]
    run_trainer(tiny_train_args(small_csv, tmp_path, "one", *common, "--batch-size", "32"))
    run_trainer(
        tiny_train_args(small_csv, tmp_path, "two", *common, "--batch-size", "8", "--accum-freq", "2"),
        launcher=two_processes(),
    )
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    weights = [
        load_file(tmp_path / run / "checkpoints" / "step_00000003" / "model.safetensors") for run in ("one", "two")
    ]
    assert max_difference(*weights) <= 1e-5
    loss_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two))
    print(f"2 processes vs 1: largest loss difference {loss_gap:.3g}, weight difference {max_difference(*weights):.3g}")
    # plain SGD at lr 1 moved the adapters' B far from its zero start; the frozen weights did not move at all
    assert max(weights[0][k].abs().max().item() for k in weights[0] if ".lora_B." in k) > 1e-3
    initial = parse_train_config(tiny_train_args(small_csv, tmp_path, "x", *LORA))[0]
    start = create_model(initial.model, precision="fp32", seed=0).model
    apply_lora(start, initial.lora, fsdp=False)
    assert all(torch.equal(value, weights[1][key]) for key, value in start.state_dict().items() if ".lora_" not in key)

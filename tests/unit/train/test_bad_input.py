"""Inputs that used to train silently wrong (or end in a traceback), each now refused in one line before
anything is built, announced, or said correctly. Before these checks: --grad-clip-norm 0 trained nothing and -1
ascended the gradient, --max-steps -1 trained 0 steps, --lr -1 / --beta2 1.5 / --eps -1 ended in torch's
traceback, --name escaped --logs, a CSV ignored --dataset-resampled, a SigLIP teacher was told to "pass --siglip",
and weights loaded over a local-dir: model went unmentioned after open_clip's "initialized randomly"."""

from __future__ import annotations

import logging

import pytest
import torch

from acc_clip.checkpoint.export import how_to_load
from helpers import TINY_RN, TINY_VIT


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--grad-clip-norm", "0"], "--grad-clip-norm 0.0: must be a finite number above 0"),
        (["--grad-clip-norm", "-1"], "--grad-clip-norm -1.0: must be a finite number above 0"),
        (["--max-steps", "-1"], "--max-steps -1: must be at least 1 (leave it out for no limit)"),
        (["--lr", "-1"], "--lr -1.0: must be a finite number above 0"),
        (["--beta2", "1.5"], "--beta2 1.5: must be within [0, 1)"),
        (["--eps", "-1"], "--eps -1.0: must be a finite number above 0"),
        (["--name", "../escaped"], "--name '../escaped': must be a plain folder name"),
        (["--name", "/abs/run"], "--name '/abs/run': must be a plain folder name"),
        (["--name", ""], "--name '': must be a plain folder name"),
        (["--seed", "-1"], "--seed -1: must be within 0 .. 2**32-1"),
        (["--dataset-resampled"], "--dataset-resampled applies to webdataset data; --train-data train.csv is csv data"),
    ],
)
def test_values_that_trained_wrong_are_one_line_and_status_2(train_in_process, flags, said):
    status, errors = train_in_process(["--train-data", "train.csv", *flags])
    assert status == 2 and len(errors) == 1 and said in errors[0], errors


def test_logs_that_is_a_file_or_a_run_folder_that_is_a_file_is_one_line(train_in_process, small_csv, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    status, errors = train_in_process(["--train-data", str(small_csv), "--logs", str(a_file / "logs")])
    assert status == 2 and len(errors) == 1 and "--logs" in errors[0] and "must be a folder" in errors[0], errors
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run").write_text("a file where the run folder goes")
    args = ["--train-data", str(small_csv), "--model", TINY_RN, "--device", "cpu", "--precision", "fp32"]
    status, errors = train_in_process([*args, "--logs", str(tmp_path / "logs"), "--name", "run", "--workers", "0"])
    assert status == 2 and len(errors) == 1 and "cannot make the run folder" in errors[0], errors


def test_a_csv_announces_train_num_samples_it_ignores():
    from acc_clip.train.config import parse_train_config

    _, notices = parse_train_config(["--train-data", "train.csv", "--train-num-samples", "100"])
    assert any(notice.startswith("--train-num-samples 100 has no effect on CSV data") for notice in notices)


@pytest.mark.parametrize(
    "flags, notice",
    [
        (["--lock-image-unlocked-groups", "2"], "--lock-image-unlocked-groups has no effect without --lock-image"),
        (["--skip-scheduler", "--warmup", "5"], "--warmup has no effect without a schedule"),
        (["--epochs-cooldown", "2"], "--epochs-cooldown has no effect without --lr-scheduler const-cooldown"),
        (["--momentum", "0.9"], "--momentum has no effect without a timm optimizer"),
        (["--val-num-samples", "10"], "--val-num-samples has no effect without --val-data"),
        (["--remote-sync-frequency", "10"], "--remote-sync-frequency has no effect without --remote-sync"),
        (["--wandb-notes", "x"], "--wandb-notes has no effect without wandb among --report-to"),
        (["--resume-changed-data"], "--resume-changed-data has no effect without --resume"),
        (["--torchcompile-strategy", "step"], "--torchcompile-strategy has no effect without --torchcompile"),
        (["--torchcompile-backend", "eager"], "--torchcompile-backend has no effect without --torchcompile"),
        (
            ["--torchcompile", "--torchcompile-backend", "aot_eager", "--torchcompile-mode", "max-autotune"],
            "--torchcompile-mode has no effect without --torchcompile with the inductor backend",
        ),
        (["--fsdp-offload-cpu"], "--fsdp-offload-cpu has no effect without --fsdp"),
        (["--fsdp-no-reshard-after-forward"], "--fsdp-no-reshard-after-forward has no effect without --fsdp"),
    ],
)
def test_a_flag_without_effect_is_announced(flags, notice):
    from acc_clip.train.config import parse_train_config

    _, notices = parse_train_config(["--train-data", "train.csv", *flags])
    assert any(line.startswith(notice) for line in notices), notices


def test_a_flag_at_its_default_or_with_its_need_is_not_announced():
    from acc_clip.train.config import parse_train_config

    _, notices = parse_train_config(
        ["--train-data", "train.csv", "--lock-image", "--lock-image-unlocked-groups", "2", "--warmup", "10000"]
    )
    assert notices == []
    compiled = ["--torchcompile", "--torchcompile-strategy", "model", "--torchcompile-mode", "max-autotune"]
    _, notices = parse_train_config(["--train-data", "train.csv", *compiled, "--fsdp", "--fsdp-offload-cpu"])
    assert notices == []


def test_weights_loaded_over_a_local_dir_model_are_announced_after_open_clip(tmp_path, caplog):
    from acc_clip.model.build import create_model
    from acc_clip.model.options import ModelOptions

    weights = tmp_path / "w.pt"
    torch.save(create_model(ModelOptions(model=TINY_RN), precision="fp32", seed=1).model.state_dict(), weights)
    with caplog.at_level(logging.INFO):
        create_model(ModelOptions(model=TINY_RN, pretrained=str(weights)), precision="fp32", seed=0)
    said = [r.getMessage() for r in caplog.records if "weight tensors" in r.getMessage()]
    assert said == [f"--pretrained {weights}: loaded {len(torch.load(weights))} weight tensors into CLIP"], said


def test_a_siglip_trained_teacher_is_refused_as_unsupported(tmp_path):
    from acc_clip.errors import CheckpointError
    from acc_clip.model.build import create_model, create_teacher
    from acc_clip.model.options import ModelOptions

    siglip = create_model(ModelOptions(model=TINY_VIT), precision="fp32", seed=1, init_logit_bias=-10.0).model
    weights = tmp_path / "siglip_teacher.pt"
    torch.save(siglip.state_dict(), weights)
    with pytest.raises(CheckpointError) as error:
        create_teacher(TINY_VIT, str(weights), precision="fp32", device="cpu")
    assert "distilling from a SigLIP model is not supported" in str(error.value)
    assert "pass --siglip" not in str(error.value)


def test_export_says_how_to_load_its_file():
    assert (
        how_to_load("ViT-B-32", "out.pt") == "load it with open_clip.create_model_and_transforms('ViT-B-32', "
        "pretrained='out.pt')"
    )
    said = how_to_load("local-dir:models/tiny", "out.pt")
    assert "open_clip ignores pretrained= for a local-dir: model" in said and "--format local-dir" in said

"""The trainer with each objective beyond CLIP, run as a user runs it: SigLIP and CoCa evaluate
(validation loss of their own objective, retrieval, zero-shot) and export checkpoints that open_clip
loads; CoCa trains on two processes; a distillation run keeps its teacher out of its checkpoints."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from background_trainer import two_processes
from helpers import (
    REPO,
    TINY_COCA,
    TINY_RN,
    TINY_VIT,
    acc_clip_eval,
    read_metrics,
    run_trainer,
    tiny_train_args,
    zeroshot_flags,
)

OBJECTIVE_RUNS = {  # name -> (model, extra flags, named losses logged beside the total)
    "siglip": (TINY_VIT, ["--siglip"], set()),
    "coca": (TINY_COCA, [], {"contrastive_loss", "caption_loss"}),
}


def tensorboard_tags(run_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events_file in run_dir.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(events_file.parent))
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    return tags


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_RUNS))
def test_objective_run_evaluates_and_exports_for_open_clip(objective, small_csv, val_csv, demo_dataset, tmp_path):
    import open_clip

    model_name, flags, parts = OBJECTIVE_RUNS[objective]
    run_trainer(
        tiny_train_args(
            small_csv,
            tmp_path,
            "run",
            "--model",
            model_name,
            "--epochs",
            "1",
            "--val-data",
            str(val_csv),
            "--save-frequency",
            "1",
            "--log-every-n-steps",
            "5",
            *flags,
            "--report-to",
            "tensorboard",
            *zeroshot_flags(demo_dataset),
        )
    )
    records = read_metrics(tmp_path / "run")
    assert len(records) == 10 and all(parts <= set(r) for r in records)
    # each step's temperature as it was after that step, not the latest one of the buffered steps
    scales = [r["logit_scale"] for r in records]
    assert all(a != b for a, b in itertools.pairwise(scales)), scales
    assert all(r["loss"] == pytest.approx(sum(r[p] for p in parts), rel=1e-5) for r in records if parts)
    assert {f"train/{p}" for p in parts} | {f"val/val_{p}" for p in parts} <= tensorboard_tags(tmp_path / "run")
    results = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in results] == [0, 10]
    for result in results:
        assert {f"val_{p}" for p in parts} <= set(result) and result["val_loss"] > 0
        assert 0 <= result["image_to_text_R@1"] <= 1 and 0 <= result["zeroshot_top1"] <= 1

    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000010"
    # `acc-clip eval` of the last checkpoint: the trainer's own last validation (the objective's loss included)
    again = acc_clip_eval(
        "--model",
        model_name,
        "--checkpoint",
        str(checkpoint),
        "--val-data",
        str(val_csv),
        "--csv-separator",
        ",",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        *(["--siglip"] if "--siglip" in flags else []),
    )
    for key in ("val_loss", *(f"val_{p}" for p in parts), "image_to_text_R@1"):
        assert again[key] == pytest.approx(results[-1][key], rel=1e-5), key
    exported = tmp_path / "exported.pt"
    subprocess.run(
        [sys.executable, "-m", "acc_clip.cli", "export", str(checkpoint), "--out", str(exported)],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    # open_clip's own loader, with the model as open_clip_train creates it for this objective
    model = open_clip.create_model(model_name, **({"init_logit_bias": -10} if "--siglip" in flags else {}))
    open_clip.load_checkpoint(model, str(exported), strict=True)
    trained = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    if "--siglip" in flags:
        assert trained["logit_bias"].item() != -10  # the bias trained
    # the hub layout: the folder alone says what to build (a SigLIP model's bias included)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "acc_clip.cli",
            "export",
            str(checkpoint),
            "--format",
            "local-dir",
            "--out",
            str(tmp_path / "hub"),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    hub = open_clip.create_model(f"local-dir:{tmp_path / 'hub'}")
    assert hub.state_dict().keys() == trained.keys()
    assert all(torch.equal(hub.state_dict()[k], v) for k, v in trained.items())


def test_coca_trains_on_two_processes_with_accumulation(train_csv, val_csv, tmp_path, monkeypatch):
    """CoCa under DDP (gloo), 2 processes x batch 4 x --accum-freq 2: every parameter takes part in
    every step (no unused-parameter failure), and both losses and their validation are logged."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_trainer(
        tiny_train_args(
            train_csv,
            tmp_path,
            "coca2",
            "--model",
            TINY_COCA,
            "--batch-size",
            "4",
            "--accum-freq",
            "2",
            "--max-steps",
            "3",
            "--gather-with-grad",
            "--val-data",
            str(val_csv),
        ),
        launcher=two_processes(),
    )
    records = read_metrics(tmp_path / "coca2")
    assert [r["samples_seen"] for r in records] == [16, 32, 48]
    assert all(r["caption_loss"] > 0 and r["contrastive_loss"] > 0 for r in records)
    before = json.loads((tmp_path / "coca2" / "results.jsonl").read_text().splitlines()[0])
    assert before["val_caption_loss"] > 0 and before["num_samples"] == 105


def test_distillation_trains_and_its_teacher_is_never_saved(train_csv, tiny_teacher, tmp_path):
    import open_clip

    run_trainer(
        tiny_train_args(
            train_csv,
            tmp_path,
            "distill",
            "--model",
            TINY_VIT,
            "--distill-model",
            tiny_teacher,
            "--accum-freq",
            "2",
            "--batch-size",
            "8",
            "--max-steps",
            "2",
            "--save-every-n-steps",
            "2",
        )
    )
    records = read_metrics(tmp_path / "distill")
    assert len(records) == 2 and all(r["distill_loss"] > 0 for r in records)
    saved = load_file(tmp_path / "distill" / "checkpoints" / "step_00000002" / "model.safetensors")
    student = open_clip.create_model(TINY_VIT).state_dict()
    assert set(saved) == set(student)  # the student's weights, nothing of the teacher
    assert open_clip.create_model(tiny_teacher).state_dict().keys() == student.keys()  # same architecture...
    teacher = load_file(tiny_teacher[len("local-dir:") :] + "/open_clip_model.safetensors")
    assert all(not torch.equal(saved[k], teacher[k]) for k in ("logit_scale", "text_projection"))  # ...not its weights
    config = (tmp_path / "distill" / "config.yaml").read_text()
    assert f"distill_model: {tiny_teacher}" in config


def test_a_teacher_that_reads_other_inputs_is_refused_in_one_line(train_csv, tiny_teacher, tmp_path, train_in_process):
    """TINY_RN's transform makes 64x64 images; the TINY_VIT teacher reads 32x32."""
    status, errors = train_in_process(
        tiny_train_args(
            train_csv, tmp_path, "mismatch", "--model", TINY_RN, "--distill-model", tiny_teacher, "--max-steps", "1"
        )
    )
    assert status != 0 and len(errors) == 1
    assert "reads 32x32 images" in errors[0] and "gives 64x64" in errors[0]


def test_resuming_with_another_objective_is_refused(train_csv, tmp_path, train_in_process):
    """The weights of a SigLIP run load into... a SigLIP model only; a distillation run's load into the
    student either way, so without the check a resume that dropped --distill-model would silently go on
    with the CLIP loss. The manifest records the objective."""
    first = tiny_train_args(
        train_csv,
        tmp_path,
        "obj",
        "--model",
        TINY_VIT,
        "--batch-size",
        "8",
        "--max-steps",
        "1",
        "--save-every-n-steps",
        "1",
        "--siglip",
    )
    assert train_in_process(first)[0] == 0
    resumed = [arg for arg in first if arg != "--siglip"] + ["--resume", "latest"]
    status, errors = train_in_process(
        [*resumed[: resumed.index("--max-steps")], "--max-steps", "2", *resumed[resumed.index("--max-steps") + 2 :]]
    )
    assert status != 0 and len(errors) == 1
    assert "saved by a run training {'name': 'siglip'" in errors[0] and "resume with the flags" in errors[0]


def test_model_options_travel_into_the_local_dir_export(train_csv, tmp_path):
    """--force-image-size, --force-quick-gelu and --image-mean change the model and its preprocessing beyond
    its config: the exported folder builds the model that was trained (open_clip would otherwise load the
    48 px weights into a 32 px model, resizing the positional embedding without a word)."""
    import open_clip

    options = ["--force-image-size", "48", "--force-quick-gelu", "--image-mean", "0.1", "0.2", "0.3"]
    run_trainer(
        tiny_train_args(
            train_csv,
            tmp_path,
            "opts",
            "--model",
            TINY_VIT,
            "--batch-size",
            "8",
            "--max-steps",
            "1",
            "--save-every-n-steps",
            "1",
            *options,
        )
    )
    checkpoint = tmp_path / "opts" / "checkpoints" / "step_00000001"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "acc_clip.cli",
            "export",
            str(checkpoint),
            "--format",
            "local-dir",
            "--out",
            str(tmp_path / "hub"),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    model, _, _preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    trained = load_file(checkpoint / "model.safetensors")
    assert model.visual.image_size == (48, 48)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    assert model.visual.preprocess_cfg["mean"] == [0.1, 0.2, 0.3]
    from acc_clip.loss import model_overrides
    from acc_clip.model.build import create_model
    from acc_clip.train.config import parse_train_config

    config, _ = parse_train_config(["--train-data", "x.csv", "--model", TINY_VIT, *options])
    ours = create_model(
        config.model, precision=config.runtime.precision, seed=config.runtime.seed, **model_overrides(config)
    ).model
    ours.load_state_dict(trained)
    images, texts = torch.rand(2, 3, 48, 48), open_clip.get_tokenizer(TINY_VIT)(["a", "b"])
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(images), ours.eval().encode_image(images), atol=1e-5)
        assert torch.allclose(model.encode_text(texts), ours.encode_text(texts), atol=1e-5)

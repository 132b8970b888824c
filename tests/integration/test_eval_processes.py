"""`acc-clip eval` on 2 processes (torchrun, `-m acc_clip.eval`): the metrics of one process reading the
whole set, and a main process whose share is unreadable. Moved from tests/unit/evaluation/test_evaluator.py
(unit/ holds in-process tests only); the fixtures below are that file's. --precision fp32: the one-process
numbers are fp32, and `acc-clip eval` defaults to training's --precision amp since it takes training's flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from acc_clip.data.csv import CsvDataset, build_eval_loader
from acc_clip.evaluation.evaluator import evaluate_retrieval
from acc_clip.evaluation.zeroshot import load_zeroshot_dataset, zeroshot_eval
from helpers import REPO

TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_model_dir(path: Path, embed_dim: int = 32) -> str:
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": {**TINY_MODEL_CFG, "embed_dim": embed_dim}, "preprocess_cfg": {}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    return f"local-dir:{path}"


def write_image(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((3, 3, 3)) * 255).astype(np.uint8).repeat(12, axis=0).repeat(12, axis=1)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    name = write_model_dir(tmp_path_factory.mktemp("model"))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, output_dict=True)
    return name, model.eval(), preprocess, open_clip.get_tokenizer(name)


@pytest.fixture(scope="module")
def odd_val_csv(tmp_path_factory):
    """11 rows (odd): 8 distinct images, two of them with two captions, and a row whose image is missing."""
    root = tmp_path_factory.mktemp("val")
    images = [write_image(root / f"img{i}.png", seed=i) for i in range(8)]
    rows = [(images[i], f"a photo of thing number {i}") for i in range(8)]
    rows += [(images[2], "another caption of two"), (images[5], "five again")]
    # row 3: with 2 processes, rank 1 reads rows 1, 3, 5, 7, 9 and has 4 good rows to rank 0's 6
    rows.insert(3, (str(root / "missing.png"), "this image does not exist"))
    path = root / "val.csv"
    path.write_text("filepath\ttitle\n" + "".join(f"{f}\t{c}\n" for f, c in rows))
    return str(path)


def loader_for(odd_val_csv, tiny, accelerator, batch_size):
    _, _, preprocess, tokenizer = tiny
    dataset = CsvDataset(odd_val_csv, transform=preprocess, tokenizer=tokenizer, augment_seeded=False)
    return build_eval_loader(
        dataset, batch_size=batch_size, workers=0, rank=accelerator.process_index, world_size=accelerator.num_processes
    )


def test_two_processes_give_the_one_process_numbers(odd_val_csv, tiny, accelerator, tmp_path):
    name, model, preprocess, tokenizer = tiny
    one_process = {"retrieval": evaluate_retrieval(model, loader_for(odd_val_csv, tiny, accelerator, 4), accelerator)}
    zeroshot_root = tmp_path / "zs"
    for label, cls in enumerate(["cat", "dog", "red_car"]):
        (zeroshot_root / cls).mkdir(parents=True)
        for i in range(2 + label):  # 9 images: an uneven split over 2 processes
            write_image(zeroshot_root / cls / f"{i}.png", seed=100 + 10 * label + i)
    dataset, classnames = load_zeroshot_dataset(str(zeroshot_root), transform=preprocess)
    one_process["zeroshot"] = zeroshot_eval(
        model, tokenizer, dataset, classnames, ["a photo of a {}."], accelerator, batch_size=3, workers=0
    )
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")

    checkpoint = tmp_path / "epoch_1.pt"  # as a DDP run saves it: keys under `module.`
    torch.save(
        {"epoch": 1, "name": "x", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, checkpoint
    )
    out = tmp_path / "metrics.json"
    # `accelerate launch --cpu --num_processes 2` starts ONE process (its CPU launcher expects mpirun);
    # torchrun starts two, and Accelerator(cpu=True) joins them over gloo.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "acc_clip.eval",
        "--model",
        name,
        "--checkpoint",
        str(checkpoint),
        "--val-data",
        odd_val_csv,
        "--zeroshot-data",
        str(zeroshot_root),
        "--zeroshot-templates",
        str(tmp_path / "templates.txt"),
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 process(es)" in run.stderr
    two_processes = json.loads(out.read_text())

    assert two_processes.keys() == one_process.keys()
    for group in one_process:
        assert two_processes[group].keys() == one_process[group].keys()
        for key, value in one_process[group].items():
            assert two_processes[group][key] == pytest.approx(value, abs=1e-6), (group, key)
    assert two_processes["retrieval"]["num_samples"] == 10 and two_processes["zeroshot"]["zeroshot_num_samples"] == 9


def test_two_processes_evaluate_when_the_main_process_share_is_unreadable(tiny, tmp_path):
    """Rank 0 reads rows 0, 2, ... : all missing here. The logit scale comes from a process that has rows,
    and the readable half is evaluated (before, the main process stopped with an error and rank 1 lost
    its peer)."""
    name, model, _, _ = tiny
    images = [write_image(tmp_path / f"img{i}.png", seed=i) for i in range(3)]
    rows = [
        (str(tmp_path / "gone0.png"), "a"),
        (images[0], "b"),
        (str(tmp_path / "gone1.png"), "c"),
        (images[1], "d"),
        (str(tmp_path / "gone2.png"), "e"),
        (images[2], "f"),
    ]
    csv = tmp_path / "val.csv"
    csv.write_text("filepath\ttitle\n" + "".join(f"{f}\t{c}\n" for f, c in rows))
    checkpoint = tmp_path / "plain.pt"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "metrics.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "acc_clip.eval",
        "--model",
        name,
        "--checkpoint",
        str(checkpoint),
        "--val-data",
        str(csv),
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--out",
        str(out),
    ]
    run = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    retrieval = json.loads(out.read_text())["retrieval"]
    assert (retrieval["num_samples"], retrieval["num_bad"]) == (3, 3)

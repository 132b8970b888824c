"""`acc-clip eval` on 2 processes (torchrun, `-m acc_clip.eval`): the metrics of one process reading the
whole set (each process ranking its share of the queries, in blocks), and a main process whose share is
unreadable. Moved from tests/unit/evaluation/test_evaluator.py (unit/ holds in-process tests only); the
fixtures below are that file's. --precision fp32: the one-process numbers are fp32, and `acc-clip eval`
defaults to training's --precision amp since it takes training's flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from acc_clip.evaluation.evaluator import evaluate_retrieval
from acc_clip.evaluation.zeroshot import load_zeroshot_dataset, zeroshot_eval
from helpers import REPO, eval_loader, write_image


def test_two_processes_give_the_one_process_numbers(odd_val_csv, tiny, accelerator, tmp_path):
    name, model, preprocess, tokenizer = tiny
    one_process = {"retrieval": evaluate_retrieval(model, eval_loader(odd_val_csv, tiny, accelerator, 4), accelerator)}
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
        "--val-retrieval-chunk-size",
        "3",  # each process ranks its 5 queries in blocks of 3 and 2
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

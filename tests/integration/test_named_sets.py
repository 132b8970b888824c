"""Several named validation and zero-shot sets and a few-shot probe in one run (issue 22): each reported under
its name in results.jsonl, and `acc-clip eval` of the saved checkpoint gives the same numbers per set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, TINY_RN, run_trainer, tiny_train_args

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # one thread in trainer and eval: the same sums


def test_two_named_validation_and_zero_shot_sets_train_and_evaluate_alike(small_csv, val_csv, demo_dataset, tmp_path):
    zeroshot = demo_dataset / "zeroshot"
    few = tmp_path / "two_classes"  # a second zero-shot set: two of the classes, named by their folders
    for folder in sorted(p for p in zeroshot.iterdir() if p.is_dir())[:2]:
        shutil.copytree(folder, few / folder.name)
    images = sorted({line.split(",")[0] for line in small_csv.read_text().splitlines()[1:]})
    few = tmp_path / "fewshot.csv"  # 32 images, two classes by position: a probe set (10 shots + 6 tests each)
    few.write_text("filepath,label\n" + "".join(f"{p},{'ab'[i % 2]}\n" for i, p in enumerate(images)))
    sets = [
        "--fewshot-data",
        str(few),
        "--val-data",
        f"coco={val_csv}",
        f"train_rows={small_csv}",
        "--zeroshot-data",
        f"demo={zeroshot}",
        f"pair={few}",
        "--zeroshot-classnames",
        f"demo={zeroshot / 'classnames.txt'}",
        "--zeroshot-templates",
        str(zeroshot / "templates.txt"),
        "--zeroshot-frequency",
        "1",
    ]
    run_trainer(tiny_train_args(small_csv, tmp_path, "run", "--epochs", "1", "--save-frequency", "1", *sets))
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 10]
    trained = records[-1]
    for name in ("coco", "train_rows"):
        assert {f"{name}/val_loss", f"{name}/image_to_text_R@1", f"{name}/num_samples"} <= trained.keys()
    assert trained["coco/num_samples"] == 105 and trained["train_rows/num_samples"] == 160
    assert trained["coco/val_loss"] != trained["train_rows/val_loss"]
    assert "coco/coco_image_to_text_R@1" in trained  # 5 captions per image: the COCO protocol too
    assert trained["demo/zeroshot_num_samples"] > trained["pair/zeroshot_num_samples"] > 0
    assert "val_loss" not in trained and "zeroshot_top1" not in trained  # nothing left unnamed
    assert trained["fewshot_num_samples"] == 12 and 0 <= trained["fewshot_10shot_top1"] <= 1

    out = tmp_path / "eval.json"
    command = [
        sys.executable,
        "-m",
        "acc_clip.cli",
        "eval",
        "--checkpoint",
        str(tmp_path / "run/checkpoints/epoch_1.pt"),
    ]
    command += ["--model", TINY_RN, "--csv-separator", ",", "--device", "cpu", "--workers", "0"]
    command += ["--precision", "fp32", "--batch-size", "16", *sets[:-2], "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ})
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads(out.read_text())
    assert list(evaluated) == ["coco", "train_rows", "fewshot", "demo", "pair"]
    for group, metrics in evaluated.items():
        for key, value in metrics.items():
            assert trained[key if group == "fewshot" else f"{group}/{key}"] == value, (group, key)

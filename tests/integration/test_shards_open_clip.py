"""open_clip's own trainer (`python -m open_clip_train.main`, a subprocess) runs an epoch on shards that
`acc_clip.prep.shards` wrote. Moved from tests/unit/shards/test_shards.py (unit/ holds in-process tests only)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from acc_clip.prep.shards import convert as converter


@pytest.fixture
def dataset_csv(tmp_path):
    """40 random 48x36 JPEGs, one caption each (test_shards.py's fixture)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        path = str(folder / f"im{i:03d}.jpg")
        Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(path, quality=90)
        rows.append((path, f"caption number {i}"))
    csv_path = tmp_path / "train.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("filepath", "title"))
        writer.writerows(rows)
    return str(csv_path)


def convert(csv_path, out_dir, **kwargs):
    kwargs.setdefault("samples_per_shard", 10)
    kwargs.setdefault("workers", 1)
    return converter.convert_csv_to_shards(csv_path, str(out_dir), progress=False, **kwargs)


def test_open_clip_trainer_runs_an_epoch_on_the_shards(tmp_path, dataset_csv):
    convert(dataset_csv, tmp_path / "out")
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": {
                    "embed_dim": 32,
                    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
                    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
                },
                "preprocess_cfg": {},
            }
        )
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "open_clip_train.main",
            "--train-data",
            str(tmp_path / "out" / "{00000..00003}.tar"),
            "--dataset-type",
            "webdataset",
            "--train-num-samples",
            "32",
            "--model",
            f"local-dir:{model_dir}",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--workers",
            "1",
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "--logs",
            str(tmp_path / "logs"),
            "--name",
            "x",
            "--pretrained",
            "",
            "--save-frequency",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = (tmp_path / "logs" / "x" / "out.log").read_text()
    assert "Train Epoch: 0 [32/32 (100%)]" in log
    assert "Handling webdataset error" not in log

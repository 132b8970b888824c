"""COCO captions JSON -> CSV: rows, cleaning, skipping with counts, clear errors, atomic writes, readers."""

from __future__ import annotations

import json
import os
import re
import runpy
import sys
from pathlib import Path

import open_clip
import pandas as pd
import pytest
import torch
from open_clip_train.data import CsvDataset
from PIL import Image
from torchvision import transforms

from acc_clip import cli
from acc_clip.errors import AccClipError
from acc_clip.prep.coco_csv import create_coco_csv
from acc_clip.prep.demo_data import make_demo_data
from helpers import REPO


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return make_demo_data(
        str(tmp_path_factory.mktemp("demo") / "out"), num_train=8, num_val=2, size=(64, 48), zeroshot_per_class=0
    )


@pytest.fixture
def handmade(tmp_path) -> dict:
    """Two images on disk (one with messy captions, one without any), one listed but missing."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "c.jpg"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(images / name)
    document = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "  a dog\non grass \n"},
            {"id": 11, "image_id": 2, "caption": "never written: b.jpg is missing"},
            {"id": 12, "image_id": 1, "caption": " \n "},
            {"id": 13, "image_id": 1, "caption": 'a cat, "quoted"\r\nand\n\nmore'},
            {"id": 14, "image_id": 99, "caption": "an image nobody listed"},
        ],
    }
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps(document))
    return {"annotations": str(annotations), "images": str(images), "out": str(tmp_path / "out.csv"), "doc": document}


def write_json(path, document) -> str:
    path.write_text(json.dumps(document))
    return str(path)


def test_demo_data_gives_five_rows_per_image_with_absolute_existing_paths(demo, tmp_path):
    out = str(tmp_path / "train.csv")
    counts = create_coco_csv(demo["train_annotations"], demo["train_images"], out)
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["filepath", "title"]
    assert len(frame) == counts["rows"] == 5 * 8 and counts["images"] == 8
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in frame["filepath"])
    with open(demo["train_annotations"], encoding="utf-8") as f:
        document = json.load(f)
    expected = [
        (os.path.join(demo["train_images"], image["file_name"]), a["caption"])
        for image in document["images"]
        for a in document["annotations"]
        if a["image_id"] == image["id"]
    ]
    assert list(zip(frame["filepath"], frame["title"])) == expected


def test_cleaning_skipping_and_counts(handmade):
    counts = create_coco_csv(handmade["annotations"], handmade["images"], handmade["out"])
    assert counts == {
        "rows": 2,
        "images": 1,
        "images_missing": 1,
        "images_without_captions": 1,
        "empty_captions": 1,
        "captions_of_unknown_images": 1,
    }
    frame = pd.read_csv(handmade["out"])
    assert frame["title"].tolist() == ["a dog on grass", 'a cat, "quoted" and more']
    assert frame["filepath"].tolist() == [os.path.join(handmade["images"], "a.jpg")] * 2


def test_round_trips_through_open_clip_csv_dataset(handmade):
    create_coco_csv(handmade["annotations"], handmade["images"], handmade["out"])
    dataset = CsvDataset(
        handmade["out"],
        transforms.ToTensor(),
        img_key="filepath",
        caption_key="title",
        sep=",",
        tokenizer=open_clip.tokenize,
    )
    assert len(dataset) == 2
    image, text = dataset[1]
    assert image.shape == (3, 8, 8)
    assert torch.equal(text, open_clip.tokenize(['a cat, "quoted" and more'])[0])


def test_tab_separator(handmade):
    create_coco_csv(handmade["annotations"], handmade["images"], handmade["out"], sep="\\t")
    with open(handmade["out"], encoding="utf-8") as f:
        assert f.readline() == "filepath\ttitle\n"
    assert pd.read_csv(handmade["out"], sep="\t")["title"].tolist() == ["a dog on grass", 'a cat, "quoted" and more']
    with pytest.raises(AccClipError, match="--sep"):
        create_coco_csv(handmade["annotations"], handmade["images"], handmade["out"], sep="::")


def test_malformed_json_names_file_and_position(handmade, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(AccClipError, match=rf"{re.escape(str(bad))}.*line 2 column"):
        create_coco_csv(str(bad), handmade["images"], handmade["out"])


@pytest.mark.parametrize(
    "key, where",
    [
        ("images", None),
        ("annotations", None),
        ("file_name", "images"),
        ("id", "images"),
        ("image_id", "annotations"),
        ("caption", "annotations"),
    ],
)
def test_missing_key_names_key_and_file(handmade, tmp_path, key, where):
    document = json.loads(json.dumps(handmade["doc"]))
    if where is None:
        del document[key]
    else:
        del document[where][1][key]
    path = write_json(tmp_path / "missing.json", document)
    with pytest.raises(AccClipError, match=rf"{re.escape(path)}.*'{key}'"):
        create_coco_csv(path, handmade["images"], handmade["out"])


def test_bad_input_never_clobbers_existing_csv(handmade, tmp_path):
    out = tmp_path / "out.csv"
    out.write_text("filepath,title\nprecious,row\n")
    bad_inputs = [
        (write_json(tmp_path / "nokey.json", {"images": []}), handmade["images"]),
        (str(tmp_path / "absent.json"), handmade["images"]),
        (handmade["annotations"], str(tmp_path / "no_such_images")),
        (write_json(tmp_path / "empty.json", {"images": [], "annotations": []}), handmade["images"]),
    ]
    for annotations_file, images in bad_inputs:
        with pytest.raises(AccClipError):
            create_coco_csv(annotations_file, images, str(out))
        assert out.read_text() == "filepath,title\nprecious,row\n"
    assert sorted(os.listdir(tmp_path)) == sorted(["out.csv", "images", "captions.json", "nokey.json", "empty.json"])


def test_write_failure_leaves_no_temporary_file(handmade, tmp_path, monkeypatch):
    out = tmp_path / "out.csv"
    out.write_text("old\n")

    def fail(*args, **kwargs):
        Path(args[1]).write_text("half a")  # the temporary file, partly written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, *a, **k: fail(self, *a, **k))
    # One line naming the file and its disk (io/atomic.save_failure; was "...: No space left on device").
    with pytest.raises(
        AccClipError,
        match=rf"^{re.escape(str(out))} could not be saved: no space left on the disk "
        rf"of {re.escape(str(tmp_path))} ",
    ):
        create_coco_csv(handmade["annotations"], handmade["images"], str(out))
    assert out.read_text() == "old\n"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_cli_and_tool_wrapper(handmade, tmp_path, capsys, monkeypatch):
    args = ["--annotations", handmade["annotations"], "--images-dir", handmade["images"]]
    assert cli.main(["coco-csv", *args, "--out", handmade["out"]]) == 0
    assert "2 rows for 1 images" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "coco-csv",
                "--annotations",
                str(tmp_path / "absent.json"),
                "--images-dir",
                handmade["images"],
                "--out",
                handmade["out"],
            ]
        )
        == 2
    )
    assert "absent.json" in capsys.readouterr().err

    # The tool script as `python tools/create_coco_csv.py ARGS` runs it, in this process.
    out = str(tmp_path / "via_tool.csv")
    monkeypatch.setattr(sys, "argv", [str(REPO / "tools" / "create_coco_csv.py"), *args, "--out", out])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "tools" / "create_coco_csv.py"), run_name="__main__")
    assert exited.value.code == 0, capsys.readouterr().err
    with open(out, "rb") as a, open(handmade["out"], "rb") as b:
        assert a.read() == b.read()

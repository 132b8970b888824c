"""The demo dataset: COCO layout and schema, determinism, captions that match the pixels, reuse rules."""

from __future__ import annotations

import json
import os
import runpy
import sys
from collections import deque

import numpy as np
import pytest
from PIL import Image

from acc_clip import cli
from acc_clip.errors import AccClipError
from acc_clip.prep.demo_data import BACKGROUNDS, SHAPE_COLOURS, SHAPES, make_demo_data
from helpers import REPO

SIZE = (96, 72)
SMALL = dict(num_train=12, num_val=6, size=SIZE, zeroshot_per_class=2)
PLURALS = [pair for pairs in SHAPES.values() for pair in pairs]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return make_demo_data(str(tmp_path_factory.mktemp("demo") / "out"), seed=3, **SMALL)


def all_files(root: str) -> dict[str, bytes]:
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def mentioned(caption: str, vocabulary: dict[str, list[str]]) -> set[str]:
    """Canonical names whose wording occurs in the caption as whole words."""
    padded = f" {caption.replace(',', ' ')} "
    return {name for name, words in vocabulary.items() if any(f" {word} " in padded for word in words)}


def nearest(rgb: np.ndarray, palette: dict[str, tuple[tuple[int, int, int], list[str]]]) -> str:
    return min(palette, key=lambda name: float(np.sum((np.asarray(palette[name][0]) - rgb) ** 2)))


def shape_mask(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(background colour read from the border, mask of pixels clearly unlike it)."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    return background, np.linalg.norm(pixels - background, axis=2) > 60


def count_blobs(mask: np.ndarray, min_pixels: int = 15) -> int:
    seen = np.zeros_like(mask)
    blobs = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        blobs += size >= min_pixels
    return blobs


def load_split(paths: dict, split: str) -> dict:
    with open(paths[f"{split}_annotations"], encoding="utf-8") as f:
        return json.load(f)


def test_layout_and_coco_schema(demo):
    ids = set()
    for split, count in (("train", 12), ("val", 6)):
        document = load_split(demo, split)
        assert {"info", "licenses", "images", "annotations"} <= set(document)
        images = document["images"]
        assert len(images) == count
        for image in images:
            assert {"id", "file_name", "width", "height"} <= set(image)
            assert image["file_name"] == f"{image['id']:012d}.jpg"
            assert (image["width"], image["height"]) == SIZE
            with Image.open(os.path.join(demo[f"{split}_images"], image["file_name"])) as decoded:
                assert decoded.format == "JPEG" and decoded.size == SIZE
                decoded.load()
        assert sorted(os.listdir(demo[f"{split}_images"])) == sorted(i["file_name"] for i in images)
        for annotation in document["annotations"]:
            assert {"id", "image_id", "caption"} <= set(annotation)
        by_image = {}
        for annotation in document["annotations"]:
            by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
        assert set(by_image) == {i["id"] for i in images}
        assert all(len(set(captions)) == 5 for captions in by_image.values()), "five differently worded captions"
        assert not ids & set(by_image), "image ids are unique across splits, as in COCO"
        ids |= set(by_image)
    all_annotation_ids = [a["id"] for s in ("train", "val") for a in load_split(demo, s)["annotations"]]
    assert len(set(all_annotation_ids)) == len(all_annotation_ids)


def test_captions_describe_the_drawn_attributes(demo):
    for split in ("train", "val"):
        document = load_split(demo, split)
        captions = {}
        for annotation in document["annotations"]:
            captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
        for image in document["images"]:
            said = [
                (
                    mentioned(c, {k: v[1] for k, v in SHAPE_COLOURS.items()}),
                    mentioned(c, {k: v[1] for k, v in BACKGROUNDS.items()}),
                    mentioned(c, {k: [w for pair in v for w in pair] for k, v in SHAPES.items()}),
                    bool(mentioned(c, {"plural": [plural for _, plural in PLURALS]})),
                )
                for c in captions[image["id"]]
            ]
            colour, background, shape, plural = said[0]
            assert len(colour) == len(background) == len(shape) == 1, captions[image["id"]]
            assert all(s == said[0] for s in said), f"five captions disagree: {captions[image['id']]}"
            pixels = np.asarray(Image.open(os.path.join(demo[f"{split}_images"], image["file_name"])), dtype=float)
            background_rgb, mask = shape_mask(pixels)
            assert {nearest(background_rgb, BACKGROUNDS)} == background
            assert {nearest(np.median(pixels[mask], axis=0), SHAPE_COLOURS)} == colour
            assert count_blobs(mask) == (2 if plural else 1), captions[image["id"]]


def test_zeroshot_folders_match_classnames(demo):
    root = demo["zeroshot"]
    with open(os.path.join(root, "classnames.txt"), encoding="utf-8") as f:
        classnames = f.read().splitlines()
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    assert len(classnames) == len(SHAPE_COLOURS) * len(SHAPES)
    assert [c.replace(" ", "_") for c in classnames] == folders
    with open(os.path.join(root, "templates.txt"), encoding="utf-8") as f:
        templates = f.read().splitlines()
    assert templates and all(t.count("{}") == 1 for t in templates)
    for folder in folders:
        files = sorted(os.listdir(os.path.join(root, folder)))
        assert len(files) == 2
        colour = folder.split("_")[0]
        for name in files:
            pixels = np.asarray(Image.open(os.path.join(root, folder, name)), dtype=float)
            assert pixels.shape == (SIZE[1], SIZE[0], 3)
            _, mask = shape_mask(pixels)
            assert nearest(np.median(pixels[mask], axis=0), SHAPE_COLOURS) == colour


def test_same_seed_gives_identical_bytes_and_other_seed_differs(demo, tmp_path):
    again = make_demo_data(str(tmp_path / "again"), seed=3, **SMALL)
    other = make_demo_data(str(tmp_path / "other"), seed=4, **SMALL)
    first, second, third = all_files(demo["root"]), all_files(again["root"]), all_files(other["root"])
    assert first == second
    assert first.keys() == third.keys()
    differing = [name for name in first if first[name] != third[name]]
    assert len(differing) > len(first) // 2


def test_complete_dataset_is_reused_and_other_content_refused(tmp_path):
    out = tmp_path / "demo"
    paths = make_demo_data(str(out), seed=1, **SMALL)
    stamps = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in all_files(str(out))}
    assert make_demo_data(str(out), seed=1, **SMALL) == paths
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in all_files(str(out))} == stamps

    with pytest.raises(AccClipError, match="other parameters"):
        make_demo_data(str(out), seed=2, **SMALL)

    os.remove(paths["manifest"])  # as if a run had been interrupted before finishing
    with pytest.raises(AccClipError, match=str(out)):
        make_demo_data(str(out), seed=1, **SMALL)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(AccClipError, match=str(foreign)):
        make_demo_data(str(foreign), seed=1, **SMALL)
    assert os.listdir(foreign) == ["notes.txt"]


def test_cli_and_tool_wrapper(tmp_path, capsys, monkeypatch):
    argv = ["--num-train", "3", "--num-val", "2", "--size", "48x32", "--zeroshot-per-class", "1"]
    assert cli.main(["demo-data", str(tmp_path / "a"), *argv]) == 0
    assert "3 train" in capsys.readouterr().out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("")
    assert cli.main(["demo-data", str(foreign), *argv]) == 2
    assert str(foreign) in capsys.readouterr().err

    # The tool script as `python tools/make_demo_data.py ARGS` runs it, in this process.
    tool = str(REPO / "tools" / "make_demo_data.py")
    monkeypatch.setattr(sys, "argv", [tool, str(tmp_path / "b"), *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(tool, run_name="__main__")
    assert exited.value.code == 0, capsys.readouterr().err
    assert all_files(str(tmp_path / "a")) == all_files(str(tmp_path / "b"))

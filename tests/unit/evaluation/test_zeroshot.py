"""Zero-shot data loading, its errors, and accuracy against a brute-force computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from acc_clip.errors import AccClipError
from acc_clip.evaluation.zeroshot import load_imagenet_val, load_templates, load_zeroshot_dataset, zeroshot_eval
from helpers import write_image, write_model_dir

CLASS_FOLDERS = ["aardvark", "black_cat", "car", "dog", "red_fox", "zebra"]  # sorted, as labels are


def make_folder(root: Path, classes: list[str], per_class: int = 2) -> Path:
    for label, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i}.png", seed=10 * label + i)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, preprocess, tokenizer): TINY_MODEL_CFG with weights drawn from seed 1, plain (not dict) outputs."""
    name = write_model_dir(tmp_path_factory.mktemp("model"))
    torch.manual_seed(1)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def test_accuracy_equals_brute_force(tiny, accelerator, tmp_path):
    model, preprocess, tokenizer = tiny
    root = make_folder(tmp_path / "data", CLASS_FOLDERS)
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    (root / "dog" / "notes.txt").write_text("not an image, not counted")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n{} in the wild\n\n")

    dataset, classnames = load_zeroshot_dataset(str(root), transform=preprocess)
    assert classnames == ["aardvark", "black cat", "car", "dog", "red fox", "zebra"]
    templates = load_templates(str(tmp_path / "templates.txt"))
    metrics = zeroshot_eval(model, tokenizer, dataset, classnames, templates, accelerator, batch_size=5, workers=0)

    with torch.no_grad():
        class_embeddings = []
        for name in classnames:
            per_template = model.encode_text(tokenizer([t.format(name) for t in templates]), normalize=True)
            mean = per_template.mean(dim=0)
            class_embeddings.append(mean / mean.norm())
        top1 = top5 = 0
        for label, folder in enumerate(CLASS_FOLDERS):
            for i in range(2):
                with Image.open(root / folder / f"{i}.png") as image:
                    features = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)[0]
                scores = torch.stack([features @ c for c in class_embeddings])
                order = sorted(range(len(classnames)), key=lambda c: -scores[c].item())
                top1 += order[0] == label
                top5 += label in order[:5]
    assert metrics["zeroshot_num_samples"] == 12 and metrics["zeroshot_num_bad"] == 1
    assert metrics["zeroshot_top1"] == top1 / 12
    assert metrics["zeroshot_top5"] == top5 / 12
    assert 0 <= metrics["zeroshot_top1"] <= metrics["zeroshot_top5"] <= 1


# Images the classes' prompts are made to separate, some deliberately confusable, so per-class
# accuracy differs and any relabelling of the classes changes top-1 (checked in the test itself).
# (folder, image number) -> the classes the image resembles, most first; the rest only faintly.
LOOKS_LIKE = {
    ("aardvark", 0): ["aardvark"],
    ("aardvark", 1): ["aardvark"],
    ("aardvark", 2): ["aardvark"],
    ("black_cat", 0): ["black_cat"],
    ("black_cat", 1): ["dog", "black_cat"],
    ("black_cat", 2): ["red_fox", "black_cat"],
    ("car", 0): ["car"],
    ("car", 1): ["zebra", "aardvark", "black_cat", "dog", "red_fox"],
    ("car", 2): ["car"],
    ("dog", 0): ["red_fox", "dog"],
    ("dog", 1): ["dog"],
    ("dog", 2): ["dog"],
    ("red_fox", 0): ["red_fox"],
    ("red_fox", 1): ["red_fox"],
    ("red_fox", 2): ["zebra", "dog", "red_fox"],
    ("zebra", 0): ["zebra"],
    ("zebra", 1): ["aardvark", "zebra"],
    ("zebra", 2): ["aardvark", "zebra"],
}
# One distinct solid colour per image, far apart (100 levels) so the image it came from is never in doubt.
COLOURS = dict(zip(LOOKS_LIKE, [(r, g, b) for r in (30, 130, 230) for g in (40, 140, 240) for b in (50, 200)]))
TEMPLATES = ["a photo of a {}.", "{} in the wild"]


def resemblance(key) -> dict[str, float]:
    """Class folder -> how much image `key` looks like that class: 1, 0.85, 0.7, ... down its list,
    and a faint distinct 0.001-0.006 for the classes it does not resemble (no ties)."""
    faint = {
        name: 0.001 * (1 + (i + 7 * CLASS_FOLDERS.index(key[0]) + key[1]) % 6) for i, name in enumerate(CLASS_FOLDERS)
    }
    return {**faint, **{name: 1 - 0.15 * rank for rank, name in enumerate(LOOKS_LIKE[key])}}


class ControlledFeatures(torch.nn.Module):
    """The tiny open_clip model (its parameters, dtype, train/eval) with features the test chooses:
    a prompt of class c encodes to the unit vector e_c, whatever the template; an image, recognised
    by its colour, to sum_c resemblance(image)[c] e_c. So the score of image i for class c is
    resemblance(i)[c] (up to a per-image factor), known without running acc_clip."""

    def __init__(self, clip, tokenizer, normalize, names: dict[str, str]):
        super().__init__()
        self.clip, self.mean, self.std = clip, torch.tensor(normalize.mean), torch.tensor(normalize.std)
        basis = torch.eye(len(CLASS_FOLDERS))
        self.prompts = {
            tuple(tokenizer([template.format(name)])[0].tolist()): basis[CLASS_FOLDERS.index(folder)]
            for name, folder in names.items()
            for template in TEMPLATES
        }
        self.colours = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
        self.images = torch.stack([torch.tensor([resemblance(key)[c] for c in CLASS_FOLDERS]) for key in COLOURS])

    def encode_image(self, images, normalize=False):
        rgb = (images.float() * self.std[:, None, None] + self.mean[:, None, None]).mean(dim=(2, 3)) * 255
        distance, which = torch.cdist(rgb, self.colours).min(dim=1)
        assert distance.max() < 5, distance  # every image is one of ours
        features = self.images[which]
        return features / features.norm(dim=1, keepdim=True) if normalize else features

    def encode_text(self, texts, normalize=False):
        return torch.stack([self.prompts[tuple(row.tolist())] for row in texts.cpu()])  # KeyError: not our prompt


def write_solid(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path)


def expected_accuracy(class_order: list[str], shift: int = 0) -> tuple[float, float]:
    """Top-1 / top-5 from LOOKS_LIKE alone: image (folder, i) has label class_order.index(folder);
    `shift` relabels every image as the next class(es), for the check that relabelling shows."""
    top1 = top5 = 0
    for key in LOOKS_LIKE:
        scores = resemblance(key)
        ranked = sorted(class_order, key=lambda folder: -scores[folder])
        label = class_order[(class_order.index(key[0]) + shift) % len(class_order)]
        top1 += ranked[0] == label
        top5 += label in ranked[:5]
    return top1 / len(LOOKS_LIKE), top5 / len(LOOKS_LIKE)


def write_separable_data(root: Path, layout: str) -> tuple[Path, Path | None, list[str]]:
    """The images as `layout` (folder, csv-names, csv-indices) -> (data path, class-names file or None,
    the class folders in label order as the format defines it)."""
    for (folder, i), colour in COLOURS.items():
        write_solid(root / "images" / folder / f"{i}.png", colour)
    if layout == "folder":
        return root / "images", None, sorted(CLASS_FOLDERS)
    if layout == "csv-names":  # labels are names; classes in sorted name order
        rows = [f"{root / 'images' / folder / f'{i}.png'},{folder}" for folder, i in reversed(list(LOOKS_LIKE))]
        (root / "data.csv").write_text("filepath,label\n" + "\n".join(rows) + "\n")
        return root / "data.csv", None, sorted(CLASS_FOLDERS)
    order = ["red_fox", "car", "zebra", "aardvark", "dog", "black_cat"]  # integer labels index this file
    rows = [f"{root / 'images' / folder / f'{i}.png'},{order.index(folder)}" for folder, i in LOOKS_LIKE]
    (root / "data.csv").write_text("filepath,label\n" + "\n".join(rows) + "\n")
    (root / "names.txt").write_text("".join(f"{folder.replace('_', ' ')}\n" for folder in order))
    return root / "data.csv", root / "names.txt", order


@pytest.mark.parametrize("layout", ["folder", "csv-names", "csv-indices"])
def test_accuracy_with_separable_classes_counts_each_image_against_its_own_class(tiny, accelerator, tmp_path, layout):
    """The old brute-force test's untrained model ranks the classes the same way for every image, so
    a relabelling of the classes (an off-by-one) leaves its accuracy unchanged. Here each image's
    ranking is chosen per image, per-class accuracy differs, and the expected accuracy comes from the
    files written here, not from acc_clip's dataset."""
    clip, preprocess, tokenizer = tiny
    path, names_file, class_order = write_separable_data(tmp_path, layout)
    expected = expected_accuracy(class_order)
    for shift in range(1, len(class_order)):  # the test has power: any relabelling changes top-1
        assert expected_accuracy(class_order, shift)[0] != expected[0]
    assert 0 < expected[0] < expected[1] < 1

    dataset, classnames = load_zeroshot_dataset(
        str(path), transform=preprocess, classnames_file=str(names_file) if names_file else None
    )
    model = ControlledFeatures(
        clip, tokenizer, preprocess.transforms[-1], {folder.replace("_", " "): folder for folder in CLASS_FOLDERS}
    )
    metrics = zeroshot_eval(model, tokenizer, dataset, classnames, TEMPLATES, accelerator, batch_size=4, workers=0)
    assert metrics["zeroshot_num_samples"] == len(LOOKS_LIKE) and metrics["zeroshot_num_bad"] == 0
    assert (metrics["zeroshot_top1"], metrics["zeroshot_top5"]) == pytest.approx(expected)


def test_default_templates_are_open_clips_openai_imagenet_templates():
    assert load_templates(None) is open_clip.OPENAI_IMAGENET_TEMPLATES


def test_classnames_file_replaces_folder_names(tmp_path):
    root = make_folder(tmp_path / "data", ["n01", "n02", "n03"], per_class=1)
    (tmp_path / "names.txt").write_text("tench\ngoldfish\nshark\n")
    dataset, classnames = load_zeroshot_dataset(str(root), transform=None, classnames_file=str(tmp_path / "names.txt"))
    assert classnames == ["tench", "goldfish", "shark"] and dataset.labels == [0, 1, 2]


def test_classnames_count_mismatch_names_both_counts_and_the_first_mismatch(tmp_path):
    root = make_folder(tmp_path / "data", ["cat", "dog", "red_fox"], per_class=1)
    (tmp_path / "names.txt").write_text("cat\nred fox\n")
    with pytest.raises(AccClipError) as error:
        load_zeroshot_dataset(str(root), transform=None, classnames_file=str(tmp_path / "names.txt"))
    message = str(error.value)
    assert "\n" not in message
    assert "2 class names" in message and "3 classes" in message
    assert "class 2: 'red fox' named, 'dog' in the data" in message


def test_single_class_folder_is_an_error(tmp_path):
    root = make_folder(tmp_path / "data", ["cat"])
    with pytest.raises(AccClipError, match="1 class only"):
        load_zeroshot_dataset(str(root), transform=None)


def test_empty_folder_and_empty_class_folder_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AccClipError, match="no class sub-folders"):
        load_zeroshot_dataset(str(tmp_path / "empty"), transform=None)
    root = make_folder(tmp_path / "data", ["cat", "dog"])
    (root / "emu").mkdir()
    (root / "emu" / "readme.txt").write_text("no images here")
    with pytest.raises(AccClipError, match=r"emu: class folder holds no images"):
        load_zeroshot_dataset(str(root), transform=None)


def test_template_without_placeholder_is_an_error(tmp_path):
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na photo of a thing\n")
    with pytest.raises(AccClipError, match="line 2"):
        load_templates(str(tmp_path / "templates.txt"))


def test_csv_with_class_name_labels_and_a_missing_image(tmp_path):
    write_image(tmp_path / "a.png", 0)
    write_image(tmp_path / "b.png", 1)
    (tmp_path / "data.csv").write_text(
        f"filepath,label\n{tmp_path / 'a.png'},zebra\n{tmp_path / 'gone.png'},ant\n{tmp_path / 'b.png'},ant\n"
    )
    dataset, classnames = load_zeroshot_dataset(str(tmp_path / "data.csv"), transform=lambda image: torch.zeros(1))
    assert classnames == ["ant", "zebra"] and dataset.labels == [1, 0, 0]
    assert dataset[1] is None  # missing: skipped, and the collate counts it
    assert dataset[2].text.item() == 0 and dataset[2].index == 2


def test_csv_row_without_label_is_an_error(tmp_path):
    (tmp_path / "data.csv").write_text("filepath,label\na.png,cat\nb.png,\n")
    with pytest.raises(AccClipError, match="data row 2: empty label"):
        load_zeroshot_dataset(str(tmp_path / "data.csv"), transform=None)


def test_csv_with_integer_labels_needs_class_names_that_cover_them(tmp_path):
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "data.csv").write_text(f"filepath,label\n{tmp_path / 'a.png'},2\n{tmp_path / 'a.png'},0\n")
    with pytest.raises(AccClipError, match="--zeroshot-classnames"):
        load_zeroshot_dataset(str(tmp_path / "data.csv"), transform=None)
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    with pytest.raises(AccClipError, match="data row 1: label 2 is out of range for 2 class names"):
        load_zeroshot_dataset(str(tmp_path / "data.csv"), transform=None, classnames_file=str(tmp_path / "two.txt"))
    (tmp_path / "three.txt").write_text("cat\ndog\nemu\n")
    dataset, classnames = load_zeroshot_dataset(
        str(tmp_path / "data.csv"), transform=None, classnames_file=str(tmp_path / "three.txt")
    )
    assert classnames == ["cat", "dog", "emu"] and dataset.labels == [2, 0]


def test_imagenet_val_needs_its_1000_class_folders(tmp_path):
    root = make_folder(tmp_path / "val", ["n01440764", "n01443537"], per_class=1)
    with pytest.raises(AccClipError, match=r"1000 class names but .* has 2 classes"):
        load_imagenet_val(str(root), transform=None)


# --- --imagenet-v2 --------------------------------------------------------------------------------

# A short stand-in for the 1000 ImageNet class names: 12 classes are enough for folder '10' to sort
# before '2', and keep the fake layout and the classifier small. The loader takes the list as a
# parameter (default: open_clip's IMAGENET_CLASSNAMES); the Evaluator test patches the module's list.
FEW_CLASSNAMES = [f"thing{chr(ord('a') + i)}" for i in range(12)]
CLASS_COLOURS = [(20 * i, 255 - 20 * i, (97 * i) % 256) for i in range(12)]  # one solid colour per class


def make_v2_layout(root: Path, classes: int = 12, per_class: int = 2) -> Path:
    """ImageNetV2's layout: sub-folders named by class index, .jpeg images of their class's colour."""
    for index in range(classes):
        for i in range(per_class):
            path = root / str(index) / f"{i}.jpeg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 24), CLASS_COLOURS[index]).save(path, quality=95)
    return root


def test_imagenet_v2_labels_are_the_integer_folder_names_not_their_sorted_order(tmp_path):
    from acc_clip.evaluation.zeroshot import load_imagenet_v2

    root = make_v2_layout(tmp_path / "v2")
    dataset, classnames = load_imagenet_v2(str(root), transform=None, classnames=FEW_CLASSNAMES)
    assert classnames == FEW_CLASSNAMES and len(dataset) == 24
    assert [int(Path(f).parent.name) for f in dataset.filepaths] == dataset.labels
    assert sorted(set(dataset.labels)) == list(range(12))
    assert dataset.labels[dataset.filepaths.index(str(root / "10" / "0.jpeg"))] == 10  # not 2, its sorted rank
    # open_clip_train's --imagenet-v2 PATH is where imagenetv2_pytorch keeps PATH/ImageNetV2-matched-frequency
    (tmp_path / "location").mkdir()
    root.rename(tmp_path / "location" / "ImageNetV2-matched-frequency")
    again, _ = load_imagenet_v2(str(tmp_path / "location"), transform=None, classnames=FEW_CLASSNAMES)
    assert again.labels == dataset.labels


def test_imagenet_v2_without_its_layout_is_a_one_line_error(tmp_path):
    from acc_clip.evaluation.zeroshot import load_imagenet_v2

    def error_of(path) -> str:
        with pytest.raises(AccClipError) as error:
            load_imagenet_v2(str(path), transform=None, classnames=FEW_CLASSNAMES)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert error_of(tmp_path / "nowhere") == f"--imagenet-v2 {tmp_path / 'nowhere'}: folder not found"
    synsets = make_folder(tmp_path / "val", ["n01440764", "n01443537"], per_class=1)  # ImageNet val's layout
    assert error_of(synsets) == (
        f"--imagenet-v2 {synsets}: not ImageNetV2's layout (sub-folders 0..11, one per "
        f"class index): 12 missing, e.g. '0'; 2 unexpected, e.g. 'n01440764'"
    )
    partial = make_v2_layout(tmp_path / "partial")
    for image in (partial / "7").iterdir():
        image.unlink()
    (partial / "7").rmdir()
    assert "1 missing, e.g. '7'" in error_of(partial)
    # With the real list, a 12-class folder lacks 988 of ImageNet's 1000 classes.
    with pytest.raises(AccClipError, match=r"sub-folders 0\.\.999, one per class index\): 988 missing, e.g. '12'"):
        load_imagenet_v2(str(make_v2_layout(tmp_path / "v2")), transform=None)


class OneHotClip(torch.nn.Module):
    """A model that knows the answers: an image of CLASS_COLOURS[c] and a prompt of class c both encode
    to the unit vector e_c, so top-1 is 1 exactly when every image carries its own class's label."""

    def __init__(self, tokenizer, templates):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # for the input dtype
        self.colours = torch.tensor(CLASS_COLOURS, dtype=torch.float32)
        self.prompts = {
            tuple(tokenizer([template.format(name)])[0].tolist()): c
            for c, name in enumerate(FEW_CLASSNAMES)
            for template in templates
        }

    def encode_image(self, images, normalize=False):
        rgb = images.float().mean(dim=(2, 3))  # the test's transform keeps 0..255 colours
        return torch.eye(len(FEW_CLASSNAMES))[torch.cdist(rgb, self.colours).argmin(dim=1)]

    def encode_text(self, texts, normalize=False):
        return torch.eye(len(FEW_CLASSNAMES))[[self.prompts[tuple(row.tolist())] for row in texts.cpu()]]


def test_imagenet_v2_zeroshot_runs_beside_imagenet_val_on_its_schedule_with_one_classifier(
    tiny, accelerator, tmp_path, monkeypatch
):
    from acc_clip.config.parsing import Config
    from acc_clip.data import DataOptions
    from acc_clip.evaluation import zeroshot
    from acc_clip.evaluation.evaluator import EvaluationOptions, Evaluator

    templates = ["a photo of a {}.", "{} in the wild"]
    # 12 class names and 2 templates in place of ImageNet's 1000 and 80 (see FEW_CLASSNAMES).
    monkeypatch.setattr(zeroshot, "IMAGENET_CLASSNAMES", FEW_CLASSNAMES)
    monkeypatch.setattr(zeroshot, "OPENAI_IMAGENET_TEMPLATES", templates)
    builds = []
    real_build = zeroshot.build_zero_shot_classifier
    monkeypatch.setattr(zeroshot, "build_zero_shot_classifier", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    v2 = make_v2_layout(tmp_path / "v2")
    val = tmp_path / "val"  # ImageNet val's layout: synset-like folders, labels in sorted order
    for index in range(12):
        (val / f"n{index:02d}").mkdir(parents=True)
        Image.new("RGB", (24, 24), CLASS_COLOURS[index]).save(val / f"n{index:02d}" / "0.png")

    tokenizer = tiny[2]

    def to_tensor(image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)

    settings = Config(
        [
            EvaluationOptions(imagenet_val=str(val), imagenet_v2=str(v2), zeroshot_frequency=2),
            DataOptions(batch_size=5, workers=0),
        ]
    )
    evaluator = Evaluator(settings, to_tensor, tokenizer, accelerator)
    model = OneHotClip(tokenizer, templates)
    assert evaluator.run(model, completed_epochs=1) == {}  # not due: --zeroshot-frequency 2
    metrics = evaluator.run(model, completed_epochs=2)
    assert metrics == {
        "imagenet-zeroshot_top1": 1.0,
        "imagenet-zeroshot_top5": 1.0,
        "imagenet-zeroshot_num_samples": 12,
        "imagenet-zeroshot_num_bad": 0,
        "imagenetv2-zeroshot_top1": 1.0,
        "imagenetv2-zeroshot_top5": 1.0,
        "imagenetv2-zeroshot_num_samples": 24,
        "imagenetv2-zeroshot_num_bad": 0,
    }
    assert len(builds) == 1  # both sets are ImageNet's classes and templates: one classifier


def test_a_class_names_file_that_is_not_utf8_is_one_line(tmp_path):
    root = tmp_path / "zs"
    (root / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "cat" / "0.png")
    names = tmp_path / "names.txt"
    names.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(AccClipError, match=r"names\.txt: the class names file is not UTF-8 text \(byte 3\)"):
        load_zeroshot_dataset(str(root), transform=lambda image: image, classnames_file=str(names))

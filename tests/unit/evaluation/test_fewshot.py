"""The few-shot linear probe (--fewshot-data): its fixed split, its ridge regression against the closed
form written out, and its accuracy on features a constructed model makes separable, which falls when the
labels are permuted (the probe uses them, as the zero-shot tests show for class names)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

from acc_clip.errors import DataError
from acc_clip.evaluation import fewshot
from acc_clip.evaluation.zeroshot import load_zeroshot_dataset

CLASSES = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (128, 128, 128)}
PER_CLASS = 12  # 10 shots and 2 test images


class ColourModel(torch.nn.Module):
    """Image features a fixed linear map of the image's mean colour: the classes' colours far apart, each
    image a little off its class's, so the classes are linearly separable, and nothing else is known."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Linear(3, 6, bias=False)
        with torch.no_grad():
            self.visual.weight.copy_(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)))

    def encode_image(self, images, normalize=False):
        features = self.visual(images.mean(dim=(2, 3)))
        return features / features.norm(dim=1, keepdim=True) if normalize else features


def write_set(root, labels_of=None):
    """PER_CLASS solid images per class, and a filepath,label CSV (labels_of(path, true_label) relabels)."""
    rows = []
    for name, (r, g, b) in CLASSES.items():
        for i in range(PER_CLASS):
            path = root / name / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (r + 2 * i, g - 2 * i, b + i)).save(path)
            rows.append((str(path), name))
    labelled = [(path, labels_of(path, name) if labels_of else name) for path, name in rows]
    (root / "set.csv").write_text("filepath,label\n" + "".join(f"{p},{n}\n" for p, n in labelled))
    return str(root / "set.csv")


def probe(csv, accelerator):
    dataset, _ = load_zeroshot_dataset(csv, transform=transforms.ToTensor())
    return fewshot.fewshot_eval(ColourModel(), dataset, accelerator, batch_size=5, workers=0)


def test_separable_features_are_probed_perfectly_and_permuted_labels_are_not(tmp_path, accelerator):
    metrics = probe(write_set(tmp_path / "true"), accelerator)
    assert metrics == {
        "fewshot_1shot_top1": 1.0,
        "fewshot_5shot_top1": 1.0,
        "fewshot_10shot_top1": 1.0,
        "fewshot_num_samples": 2 * len(CLASSES),
        "fewshot_num_bad": 0,
    }
    names = list(CLASSES)
    order = torch.randperm(len(CLASSES) * PER_CLASS, generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = {}  # each image gets the class of another image: the label no longer goes with the colour

    def permuted(path, name):
        position = names.index(name) * PER_CLASS + int(path[-6:-4])
        shuffled[path] = names[order[position] // PER_CLASS]
        return shuffled[path]

    permuted_metrics = probe(write_set(tmp_path / "permuted", permuted), accelerator)
    assert sum(shuffled[p] != p.split("/")[-2] for p in shuffled) > 30  # most labels moved
    for k in fewshot.SHOTS:
        assert permuted_metrics[f"fewshot_{k}shot_top1"] <= 0.5, k


def test_the_split_is_each_class_s_first_ten_paths_then_the_rest(tmp_path):
    dataset, _ = load_zeroshot_dataset(write_set(tmp_path), transform=None)
    shots, test = fewshot.split(dataset)
    assert [len(s) for s in shots] == [10] * len(CLASSES)
    for label, indices in enumerate(shots):
        paths = [dataset.filepaths[i] for i in indices]
        assert paths == sorted(paths) and all(dataset.labels[i] == label for i in indices)
    assert sorted(dataset.filepaths[i][-6:] for i in test) == sorted(["10.png", "11.png"] * len(CLASSES))


def test_a_class_without_an_image_to_test_is_one_line(tmp_path):
    csv = write_set(tmp_path)
    lines = Path(csv).read_text().splitlines()
    kept = [line for line in lines if not line.endswith(("/10.png,grey", "/11.png,grey"))]
    (tmp_path / "short.csv").write_text("\n".join(kept) + "\n")
    dataset, _ = load_zeroshot_dataset(str(tmp_path / "short.csv"), transform=None)
    with pytest.raises(DataError, match=r"few-shot data: class \d has 10 images; the probe needs at least 11"):
        fewshot.split(dataset)


@pytest.mark.parametrize("rows, width", [(6, 10), (30, 4)])  # the dual (rows <= width) and primal solves
def test_ridge_predictions_are_the_closed_form(rows, width):
    generator = torch.Generator().manual_seed(rows)
    train, test = torch.randn(rows, width, generator=generator), torch.randn(20, width, generator=generator)
    labels = torch.arange(rows) % 3
    x = train.double() - train.double().mean(0)
    y = 2 * torch.nn.functional.one_hot(labels, 3).double() - 1
    y_mean = y.mean(0)
    weights = torch.linalg.inv(x.t() @ x + 0.5 * torch.eye(width, dtype=torch.float64)) @ x.t() @ (y - y_mean)
    scores = (test.double() - train.double().mean(0)) @ weights + y_mean
    assert torch.equal(fewshot.ridge_predictions(train, labels, test, 3, ridge=0.5), scores.argmax(1))
    assert len(set(scores.argmax(1).tolist())) > 1  # a test with power: not one class for every row


def test_a_missing_fewshot_set_is_named_as_the_few_shot_set(tmp_path, accelerator):
    from acc_clip.config.parsing import Config
    from acc_clip.data import DataOptions
    from acc_clip.evaluation.evaluator import EvaluationOptions, Evaluator

    settings = Config([EvaluationOptions(fewshot_data=str(tmp_path / "gone")), DataOptions(batch_size=4, workers=0)])
    with pytest.raises(DataError, match=r"gone: --fewshot-data set not found \(a folder of class sub-folders"):
        Evaluator(settings, transforms.ToTensor(), lambda texts: texts, accelerator)

"""A few-shot linear probe on frozen image features (`--fewshot-data`), as big_vision's `fewshot_lsr`
evaluator does it: for k = 1, 5 and 10 images per class, a closed-form ridge regression from the image
features to the labels' one-hot codes (+1 for the class, -1 for the others), then the top-1 accuracy of its
argmax on the held-out images. Cheap (one pass over the images, a solve of at most classes x 10 rows), and a
better signal than zero-shot for a tower trained on small data.

The split is fixed: each class's images in file-path order, its first 10 the shots (k-shot uses the first
k), the rest the test images, so every evaluation of a run, and every run, probes the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from accelerate import Accelerator

from acc_clip.errors import DataError
from acc_clip.evaluation.gather import gather_rows_by_index
from acc_clip.evaluation.zeroshot import ZeroShotDataset, encoded_images

SHOTS = (1, 5, 10)
RIDGE = 1.0  # the ridge on the centred, unit-length features (big_vision's l2_reg scale)


def split(dataset: ZeroShotDataset, shots: int = max(SHOTS)) -> tuple[list[list[int]], list[int]]:
    """(per class, its shot indices in order; the test indices): each class's images by file path, the
    first `shots` for training, the rest for testing. A class without an image left to test is an error."""
    by_class: dict[int, list[int]] = {}
    for index in sorted(range(len(dataset)), key=lambda i: dataset.filepaths[i]):
        by_class.setdefault(dataset.labels[index], []).append(index)
    short = [label for label, indices in sorted(by_class.items()) if len(indices) <= shots]
    if short:
        raise DataError(
            f"few-shot data: class {short[0]} has {len(by_class[short[0]])} images; the probe needs at least "
            f"{shots + 1} per class ({shots} shots and one to test; {len(short)} class(es) short)"
        )
    classes = [by_class[label] for label in sorted(by_class)]
    return [indices[:shots] for indices in classes], sorted(i for indices in classes for i in indices[shots:])


def ridge_predictions(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, classes: int, ridge: float = RIDGE
) -> torch.Tensor:
    """The class each test row's ridge-regression scores put first: W minimises |Xc W - Yc|^2 + ridge |W|^2
    on the centred training rows and targets (so the bias is the means'), solved in float64 on the smaller
    side (n x n when fewer rows than features)."""
    x = train.double()
    targets = 2 * torch.nn.functional.one_hot(train_labels, classes).double() - 1
    x_mean, y_mean = x.mean(dim=0), targets.mean(dim=0)
    xc, yc = x - x_mean, targets - y_mean
    rows, width = xc.shape
    if rows <= width:
        weights = xc.t() @ torch.linalg.solve(xc @ xc.t() + ridge * torch.eye(rows, dtype=xc.dtype), yc)
    else:
        weights = torch.linalg.solve(xc.t() @ xc + ridge * torch.eye(width, dtype=xc.dtype), xc.t() @ yc)
    return ((test.double() - x_mean) @ weights + y_mean).argmax(dim=1)


def image_features(
    model: torch.nn.Module,
    dataset: ZeroShotDataset,
    accelerator: Accelerator,
    *,
    batch_size: int,
    workers: int,
    precision_autocast: Callable[[], AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(row indices read, their unit-length image features, images skipped), every process's rows gathered
    in index order on every process."""
    indices, features, bad = [torch.empty(0, dtype=torch.long)], [], 0
    for batch, encoded in encoded_images(
        model, dataset, accelerator, batch_size=batch_size, workers=workers, precision_autocast=precision_autocast
    ):
        bad += batch.num_bad
        if encoded is not None:
            features.append(encoded.float().cpu())
            indices.append(torch.as_tensor(batch.indices))
    width = features[0].shape[1] if features else 0
    local = torch.cat(features) if features else torch.empty((0, width))
    counts = accelerator.gather(torch.tensor([bad, width], device=accelerator.device)).view(-1, 2).cpu()
    if width == 0 and counts[:, 1].max() > 0:  # this process read nothing: the others' width
        local = torch.empty((0, int(counts[:, 1].max())))
    read, gathered = gather_rows_by_index(accelerator, torch.cat(indices), local)
    return read, gathered, int(counts[:, 0].sum())


def fewshot_eval(
    model: torch.nn.Module, dataset: ZeroShotDataset, accelerator: Accelerator, **loading
) -> dict[str, float]:
    """`fewshot_{k}shot_top1` for k in SHOTS (fractions of the test images), `fewshot_num_samples` (test
    images classified) and `fewshot_num_bad` (images skipped as missing or corrupt), the same on every
    process. An unreadable shot is left out of its class's shots (counted as bad)."""
    shots, test = split(dataset)
    read, features, bad = image_features(model, dataset, accelerator, **loading)
    row_of = {int(index): row for row, index in enumerate(read.tolist())}
    test_rows = [row_of[i] for i in test if i in row_of]
    if not test_rows:
        raise DataError(f"few-shot data: no readable test images ({bad} skipped as missing or corrupt)")
    labels = torch.tensor(dataset.labels)[read]
    metrics: dict[str, float] = {}
    for k in SHOTS:
        train_rows = [row_of[i] for indices in shots for i in indices[:k] if i in row_of]
        predicted = ridge_predictions(features[train_rows], labels[train_rows], features[test_rows], len(shots))
        metrics[f"fewshot_{k}shot_top1"] = (predicted == labels[test_rows]).double().mean().item()
    return {**metrics, "fewshot_num_samples": len(test_rows), "fewshot_num_bad": bad}

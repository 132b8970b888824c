"""Zero-shot classification accuracy on labelled images the user gives, on ImageNet val, or on
ImageNetV2 (matched-frequency; its class folders are named 0..999 by class index).

Data: a folder with one sub-folder of images per class (classes in sorted folder order, like
torchvision's ImageFolder), or a CSV with columns `filepath,label` where a label is either a class
name (classes in sorted name order, like folders) or, when every label is an integer, an index into
the class-names file. Class names default to the folder/label names with `_` read as a space.
Templates default to open_clip's OPENAI_IMAGENET_TEMPLATES (the 80 prompts of the CLIP paper).

The classifier is open_clip's `build_zero_shot_classifier` (`zeroshot_classifier`; sets with the
same class names and templates may share one); each process classifies its share of the images
(each image on exactly one process) and the counts are summed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
from accelerate import Accelerator
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from acc_clip.data.common import Batch, Sample
from acc_clip.data.csv import IMAGE_ERRORS, build_eval_loader
from acc_clip.data.csv_file import read_csv_columns
from acc_clip.data.pixels import load_pixels
from acc_clip.errors import DataError, describe_error
from acc_clip.io.files import read_image_file
from acc_clip.model.build import image_input_dtype
from acc_clip.runtime import parallel

log = logging.getLogger(__name__)

Template = str | Callable[[str], str]
TOP_K = 5


class ZeroShotDataset(Dataset):
    """Labelled images. `dataset[i]` is a `Sample` whose `text` slot holds the class index, so the
    shared eval loader and bad-sample collate serve it unchanged; None when the image is missing or
    corrupt (the collate counts it)."""

    def __init__(self, filepaths: list[str], labels: list[int], *, transform: Callable):
        self.filepaths, self.labels, self.transform = filepaths, labels, transform

    def __len__(self) -> int:
        return len(self.filepaths)

    def __getitem__(self, index: int) -> Sample | None:
        try:
            pixels = load_pixels(read_image_file(self.filepaths[index]), self.transform)
        except IMAGE_ERRORS as error:
            log.warning("%s: cannot read image (%s), skipped", self.filepaths[index], describe_error(error))
            return None
        return Sample(pixels, torch.tensor(self.labels[index]), index)


# --- reading the data ----------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _sub_folders(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _image_folder(root: str) -> tuple[list[str], list[str], list[int]]:
    """(class folder names, image paths, labels) of a folder with one sub-folder per class."""
    folders = _sub_folders(root)
    if not folders:
        raise DataError(f"{root}: no class sub-folders (zero-shot data is one sub-folder of images per class)")
    filepaths, labels = _images_of_classes(root, folders)
    return folders, filepaths, labels


def _images_of_classes(root: str, folders: list[str]) -> tuple[list[str], list[int]]:
    """(image paths, labels) of the class folders `folders` under `root`, folder i holding class i."""
    filepaths, labels = [], []
    for label, folder in enumerate(folders):
        found = sorted(
            os.path.join(directory, name)
            for directory, _, names in os.walk(os.path.join(root, folder))
            for name in names
            if _is_image(name)
        )
        if not found:
            raise DataError(f"{os.path.join(root, folder)}: class folder holds no images ({' '.join(IMG_EXTENSIONS)})")
        filepaths += found
        labels += [label] * len(found)
    return filepaths, labels


def _labelled_csv(path: str, num_named_classes: int | None) -> tuple[list[str] | None, list[str], list[int]]:
    """(class names in the CSV or None for integer labels, image paths, labels) of a filepath,label CSV."""
    filepaths, raw_labels = read_csv_columns(path, img_key="filepath", caption_key="label", sep=",")
    raw_labels = [label.strip() for label in raw_labels]
    if "" in raw_labels:
        raise DataError(f"{path} data row {raw_labels.index('') + 1}: empty label")
    if not all(label.isdigit() for label in raw_labels):
        names = sorted(set(raw_labels))
        index_of = {name: i for i, name in enumerate(names)}
        return names, filepaths, [index_of[label] for label in raw_labels]
    if num_named_classes is None:
        raise DataError(f"{path}: integer labels are class indices; give the class names with --zeroshot-classnames")
    labels = [int(label) for label in raw_labels]
    for row, label in enumerate(labels):
        if label >= num_named_classes:
            raise DataError(
                f"{path} data row {row + 1}: label {label} is out of range for {num_named_classes} class names"
            )
    return None, filepaths, labels


def _read_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} file not found")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: the {what} file is not UTF-8 text (byte {error.start})") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DataError(f"{path}: {what} file is empty")
    if "" in lines:
        raise DataError(f"{path} line {lines.index('') + 1}: blank line in the {what} file")
    return lines


def _check_classnames(class_ids: list[str], classnames: list[str], names_source: str, data: str) -> None:
    """The class names must pair one-to-one with the classes found in the data."""
    if len(classnames) == len(class_ids):
        return
    defaults = [class_id.replace("_", " ") for class_id in class_ids]
    first = next(
        i
        for i in range(max(len(classnames), len(defaults)))
        if i >= len(classnames) or i >= len(defaults) or classnames[i] != defaults[i]
    )
    named = repr(classnames[first]) if first < len(classnames) else "nothing"
    found = repr(class_ids[first]) if first < len(class_ids) else "no class"
    raise DataError(
        f"{names_source} has {len(classnames)} class names but {data} has {len(class_ids)} classes; "
        f"first mismatch at class {first + 1}: {named} named, {found} in the data"
    )


def _check_class_count(count: int, data: str) -> None:
    if count < 2:
        raise DataError(f"{data}: {count} class only; zero-shot classification needs at least 2 classes")


def load_zeroshot_dataset(
    path: str, *, transform: Callable, classnames_file: str | None = None, what: str = "zero-shot data"
) -> tuple[ZeroShotDataset, list[str]]:
    """A class-per-sub-folder folder or a filepath,label CSV -> (dataset, class names by label)."""
    file_names = _read_lines(classnames_file, "class names") if classnames_file else None
    class_ids: list[str] | None
    if os.path.isdir(path):
        class_ids, filepaths, labels = _image_folder(path)
    elif os.path.isfile(path):
        class_ids, filepaths, labels = _labelled_csv(path, len(file_names) if file_names else None)
    else:
        raise DataError(f"{path}: {what} not found (a folder of class sub-folders or a filepath,label CSV)")
    if class_ids is None:  # integer labels: the file alone says what the classes are (_labelled_csv needs it)
        classnames = cast(list[str], file_names)
    elif file_names is None:
        classnames = [class_id.replace("_", " ") for class_id in class_ids]
    else:
        _check_classnames(class_ids, file_names, str(classnames_file), path)
        classnames = file_names
    _check_class_count(len(classnames), path)
    return ZeroShotDataset(filepaths, labels, transform=transform), classnames


def load_imagenet_val(path: str, *, transform: Callable) -> tuple[ZeroShotDataset, list[str]]:
    """ImageNet val as 1000 sorted class folders (synset ids), named by open_clip's IMAGENET_CLASSNAMES."""
    if not os.path.isdir(path):
        raise DataError(f"{path}: ImageNet val folder not found")
    class_ids, filepaths, labels = _image_folder(path)
    _check_classnames(class_ids, list(IMAGENET_CLASSNAMES), "open_clip's IMAGENET_CLASSNAMES", path)
    return ZeroShotDataset(filepaths, labels, transform=transform), list(IMAGENET_CLASSNAMES)


# Where imagenetv2_pytorch (open_clip_train's reader of --imagenet-v2 PATH) keeps the set under PATH,
# and the folder its download unpacks to.
IMAGENET_V2_SUBFOLDERS = ("ImageNetV2-matched-frequency", "imagenetv2-matched-frequency-format-val")


def imagenet_v2_root(path: str) -> str:
    """The folder of ImageNetV2's class folders: PATH/ImageNetV2-matched-frequency (what open_clip_train
    reads for --imagenet-v2 PATH), the unpacked download's folder under PATH, or PATH itself."""
    if not os.path.isdir(path):
        raise DataError(f"--imagenet-v2 {path}: folder not found")
    for name in IMAGENET_V2_SUBFOLDERS:
        if os.path.isdir(os.path.join(path, name)):
            return os.path.join(path, name)
    return path


def load_imagenet_v2(
    path: str, *, transform: Callable, classnames: Sequence[str] | None = None
) -> tuple[ZeroShotDataset, list[str]]:
    """ImageNetV2 matched-frequency: class folders named 0..999, each name the class index into
    `classnames` (default open_clip's IMAGENET_CLASSNAMES, looked up at call time). The label is
    int(name), not the folder's place in sorted order, where '10' comes before '2'."""
    classnames = list(IMAGENET_CLASSNAMES if classnames is None else classnames)
    root = imagenet_v2_root(path)
    by_index = [str(index) for index in range(len(classnames))]
    found = _sub_folders(root)
    missing, unexpected = sorted(set(by_index) - set(found), key=int), sorted(set(found) - set(by_index))
    if missing or unexpected:
        problems = [f"{len(missing)} missing, e.g. {missing[0]!r}"] if missing else []
        problems += [f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}"] if unexpected else []
        raise DataError(
            f"--imagenet-v2 {root}: not ImageNetV2's layout (sub-folders 0..{len(classnames) - 1}, "
            f"one per class index): {'; '.join(problems)}"
        )
    filepaths, labels = _images_of_classes(root, by_index)  # folder i of by_index is class i
    return ZeroShotDataset(filepaths, labels, transform=transform), classnames


def load_templates(path: str | None = None) -> Sequence[Template]:
    """Prompt templates, one per line with `{}` for the class name; None -> OPENAI_IMAGENET_TEMPLATES."""
    if path is None:
        return OPENAI_IMAGENET_TEMPLATES
    templates = _read_lines(path, "templates")
    for line, template in enumerate(templates, start=1):
        try:
            formats = "{}" in template and bool(template.format("x"))
        except (IndexError, KeyError, ValueError):  # other braces in the line
            formats = False
        if not formats:
            raise DataError(
                f"{path} line {line}: template {template!r} must hold '{{}}' (the class name) and no other braces"
            )
    return templates


# --- evaluation ----------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(clip: torch.nn.Module):
    """Eval mode and no gradient for the block; the model's previous mode afterwards."""
    was_training = clip.training
    clip.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        clip.train(was_training)


def zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    accelerator: Accelerator,
    precision_autocast: Callable[[], AbstractContextManager] | None = None,
) -> torch.Tensor:
    """[embed_dim, classes] float32: each class's prompts encoded, averaged and normalised (open_clip's
    build_zero_shot_classifier), the same on every process."""
    clip: Any = parallel.unwrap(model)  # open_clip's model: encode_image, encode_text
    with eval_mode(clip), (precision_autocast or contextlib.nullcontext)():
        return build_zero_shot_classifier(
            clip,
            tokenizer=tokenizer,
            classnames=classnames,
            templates=templates,
            num_classes_per_batch=10,
            device=accelerator.device,
        ).float()


def encoded_images(
    model: torch.nn.Module,
    dataset: ZeroShotDataset,
    accelerator: Accelerator,
    *,
    batch_size: int,
    workers: int,
    precision_autocast: Callable[[], AbstractContextManager] | None = None,
) -> Iterator[tuple[Batch, torch.Tensor | None]]:
    """This process's share of a labelled set, batch by batch, with the batch's unit-length image features
    (None for a batch of unreadable images only); the model in eval mode, without gradient, until the last
    batch has been taken (zero-shot classification and the few-shot probe read their images this way)."""
    clip: Any = parallel.unwrap(model)  # open_clip's model: encode_image, encode_text
    autocast = precision_autocast or contextlib.nullcontext
    input_dtype = image_input_dtype(clip)
    loader = build_eval_loader(
        dataset,
        batch_size=batch_size,
        workers=workers,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    with eval_mode(clip):
        for batch in loader:
            if len(batch.indices) == 0:
                yield batch, None
                continue
            with autocast():
                features = clip.encode_image(batch.images.to(accelerator.device, dtype=input_dtype), normalize=True)
            yield batch, features


def zeroshot_eval(
    model: torch.nn.Module,
    tokenizer: Callable,
    dataset: ZeroShotDataset,
    classnames: Sequence[str],
    templates: Sequence[Template],
    accelerator: Accelerator,
    *,
    batch_size: int,
    workers: int,
    precision_autocast: Callable[[], AbstractContextManager] | None = None,
    classifier: torch.Tensor | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions; top-5 is top-min(5, classes)), identical on every process.
    Keys: zeroshot_top1, zeroshot_top5, zeroshot_num_samples (images classified), zeroshot_num_bad
    (images skipped as missing or corrupt). `classifier`: `zeroshot_classifier` of these class names
    and templates, when the caller has it already."""
    device = accelerator.device
    top_k = min(TOP_K, len(classnames))
    if classifier is None:
        classifier = zeroshot_classifier(model, tokenizer, classnames, templates, accelerator, precision_autocast)
    # [top-1 hits, top-k hits, images classified, images skipped] of this process
    counts = torch.zeros(4, dtype=torch.long)
    for batch, features in encoded_images(
        model, dataset, accelerator, batch_size=batch_size, workers=workers, precision_autocast=precision_autocast
    ):
        counts[3] += batch.num_bad
        if features is None:
            continue
        labels = batch.texts.to(device)  # the class index travels in the text slot
        predictions = (features.float() @ classifier).topk(top_k, dim=1).indices
        hits = predictions == labels.unsqueeze(1)
        counts[0] += hits[:, 0].sum().item()
        counts[1] += hits.any(dim=1).sum().item()
        counts[2] += len(labels)
    top1, top5, num_samples, num_bad = accelerator.gather(counts.to(device)).view(-1, 4).sum(dim=0).tolist()
    if num_samples == 0:
        raise DataError(f"zero-shot data: no readable images ({num_bad} skipped as missing or corrupt)")
    return {
        "zeroshot_top1": top1 / num_samples,
        "zeroshot_top5": top5 / num_samples,
        "zeroshot_num_samples": num_samples,
        "zeroshot_num_bad": num_bad,
    }

"""Validation of a CLIP model: retrieval metrics, validation loss, and the `acc-clip eval` command.

Retrieval metrics are open_clip's (`open_clip_train.train.get_clip_metrics`): each row of the
validation set is one (image, caption) pair, and its rank is the position of the paired item among
all rows. Data with several captions per image (COCO) also gets the standard COCO protocol, under
keys prefixed `coco_`, over unique images.

Distributed evaluation: every process encodes its share of the rows, the features are gathered
with their row indices and re-ordered by index (duplicates dropped), so any number of processes
gives the metrics of one process reading the whole set in order. Metrics are computed on the main
process and broadcast, so every process returns the same dict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from acc_clip.errors import AccClipError

RECALL_AT = (1, 5, 10)

# --- metrics on features -------------------------------------------------------------------------


def _rank_summary(prefix: str, ranks: torch.Tensor) -> dict[str, float]:
    """Mean and median rank (1-based) and recall@k of 0-based ranks, as get_clip_metrics reports them.

    Sums are taken over Python ints, so mean and recall are the exactly rounded quotient, the same
    float numpy's mean of an int or bool array gives.
    """
    values = sorted(ranks.tolist())
    count = len(values)
    middle = count // 2
    # np.floor(np.median(ranks)): the lower middle for an odd count, else floor of the two middles' mean.
    median = values[middle] if count % 2 else (values[middle - 1] + values[middle]) // 2
    metrics = {f"{prefix}_mean_rank": sum(values) / count + 1, f"{prefix}_median_rank": float(median + 1)}
    for k in RECALL_AT:
        metrics[f"{prefix}_R@{k}"] = sum(rank < k for rank in values) / count
    return metrics


def _diagonal_ranks(logits: torch.Tensor) -> torch.Tensor:
    """0-based rank of logits[i, i] within row i: how many entries of the row beat it.

    Equals the position argsort(descending) gives when the row has no ties. On a tie it is the
    best position: an equal logit comes from an identical feature (the same image or caption on
    another row), which retrieves the pair as well as its own. open_clip's position on ties
    depends on how argsort happens to order equal values."""
    diagonal = logits.diagonal().unsqueeze(1)
    return (logits > diagonal).sum(dim=1)


def retrieval_metrics(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> dict[str, float]:
    """Row i's image and caption are a pair. Keys: `{image_to_text,text_to_image}_{mean_rank,
    median_rank,R@1,R@5,R@10}`; ranks are 1-based, recalls fractions in [0, 1]. Equal to
    get_clip_metrics when no logits tie; ties count in the pair's favour (`_diagonal_ranks`)."""
    # Same logits, computed the same way, as get_clip_metrics, so near-equal values order alike.
    logits_per_image = (logit_scale * image_features @ text_features.t()).detach().cpu()
    metrics = _rank_summary("image_to_text", _diagonal_ranks(logits_per_image))
    metrics.update(_rank_summary("text_to_image", _diagonal_ranks(logits_per_image.t())))
    return metrics


def coco_retrieval_metrics(
    image_features_per_row: torch.Tensor, text_features: torch.Tensor, image_keys: Sequence[str]
) -> dict[str, float]:
    """The COCO protocol, for rows that share images (several captions per image).

    Rows with the same `image_keys` entry (e.g. the file path) are one image; its feature is taken
    from its first row. Image-to-text: an image hits at k when ANY of its captions is among the k
    captions (of all rows) it scores highest. Text-to-image: a caption hits at k when its own image
    is among the k unique images that score it highest.

    Keys: `coco_image_to_text_R@{1,5,10}`, `coco_text_to_image_R@{1,5,10}` (fractions in [0, 1])
    and `coco_num_images` (unique images).
    """
    image_of_key: dict[str, int] = {}
    first_rows: list[int] = []
    for row, key in enumerate(image_keys):
        if key not in image_of_key:
            image_of_key[key] = len(first_rows)
            first_rows.append(row)
    image_of_row = torch.tensor([image_of_key[key] for key in image_keys])
    num_images, num_rows = len(first_rows), len(image_keys)

    # Scale does not change an order, so plain cosine similarities.
    scores = (image_features_per_row[first_rows] @ text_features.t()).detach().cpu()  # [images, captions]
    own_caption = image_of_row.unsqueeze(0) == torch.arange(num_images).unsqueeze(1)
    best_own_score = scores.masked_fill(~own_caption, float("-inf")).max(dim=1).values
    image_to_text_ranks = (scores > best_own_score.unsqueeze(1)).sum(dim=1)

    own_image_score = scores[image_of_row, torch.arange(num_rows)]
    text_to_image_ranks = (scores.t() > own_image_score.unsqueeze(1)).sum(dim=1)

    metrics: dict[str, float] = {}
    for name, ranks in (("image_to_text", image_to_text_ranks), ("text_to_image", text_to_image_ranks)):
        for k in RECALL_AT:
            metrics[f"coco_{name}_R@{k}"] = (ranks < k).sum().item() / len(ranks)
    metrics["coco_num_images"] = num_images
    return metrics


def whole_set_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> float:
    """The symmetric contrastive loss with the whole set as one batch: the mean of the image->text
    and text->image cross-entropies over all N x N pairs.

    open_clip's `clip_val_loss` averages per-batch losses instead; that number depends on the batch
    size and on how rows are split across processes, this one does not (it is larger: every
    caption competes with all N-1 others, not with B-1). It is the softmax CLIP loss, also for a
    SigLIP model (whose training loss it is not)."""
    logits_per_image = logit_scale * image_features @ text_features.t()
    labels = torch.arange(len(image_features))
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2
    return loss.item()


# --- distributed collection ----------------------------------------------------------------------


def gather_rows_by_index(
    accelerator: Accelerator, indices: torch.Tensor, *row_tensors: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Gather every process's rows (which may differ in number, or be none), sorted by row index,
    each index kept once. Returns (indices, *row_tensors), on the CPU, identical on every process."""
    device = accelerator.device
    # Pad to a common length with index -1 so unequal shares can go through one all_gather.
    padded = [accelerator.pad_across_processes(indices.to(device), dim=0, pad_index=-1)]
    padded += [accelerator.pad_across_processes(t.to(device), dim=0) for t in row_tensors]
    gathered = [accelerator.gather(t).cpu() for t in padded]
    all_indices, all_rows = gathered[0], gathered[1:]
    real = all_indices >= 0
    sorted_indices, order = all_indices[real].sort(stable=True)
    first_of_index = torch.ones_like(sorted_indices, dtype=torch.bool)
    first_of_index[1:] = sorted_indices[1:] != sorted_indices[:-1]
    keep = order[first_of_index]
    return (sorted_indices[first_of_index], *(rows[real][keep] for rows in all_rows))


def same_key_same_features(features: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
    """Give every row the features of the first row with its key (an image file, a caption).

    Rows that share an image encode to features that differ only by float noise from batching
    (so by how rows were split over processes); made identical, their comparisons are exact ties,
    which the ranks resolve in the row's favour (`_diagonal_ranks`) instead of by that noise."""
    first_row_of_key: dict[str, int] = {}
    first_rows = [first_row_of_key.setdefault(key, row) for row, key in enumerate(keys)]
    return features[first_rows]


def _sum_over_processes(accelerator: Accelerator, value: int) -> int:
    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).sum().item())


def _feature_dim_over_processes(accelerator: Accelerator, local_parts: list[torch.Tensor]) -> int:
    """The feature width, known even to a process that encoded no rows (it may have had none)."""
    local_dim = local_parts[0].shape[1] if local_parts else 0
    return int(accelerator.gather(torch.tensor([local_dim], device=accelerator.device)).max().item())


def evaluate_retrieval(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    accelerator: Accelerator,
    *,
    precision_autocast: Optional[Callable[[], ContextManager]] = None,
) -> dict[str, float]:
    """Encode the validation set (`Batch`es from `acc_clip.data.csv.build_eval_loader`, each row on one
    process) and return, on every process:

    - `val_loss`: `whole_set_clip_loss` (the whole set as one batch; NOT open_clip's per-batch mean);
    - `retrieval_metrics` keys (row-level pairs; rows sharing an image file or a caption get the
      same features, see `same_key_same_features`);
    - `coco_retrieval_metrics` keys when the loader's dataset has `filepaths` and some image has
      more than one caption;
    - `num_samples` (rows evaluated) and `num_bad` (rows skipped: unreadable image, empty caption).

    The model is put in eval mode for the pass and returned to its previous mode after it.
    """
    clip = accelerator.unwrap_model(model)
    autocast = precision_autocast or contextlib.nullcontext
    input_dtype = next(clip.parameters()).dtype
    image_parts: list[torch.Tensor] = []
    text_parts: list[torch.Tensor] = []
    index_parts: list[torch.Tensor] = []
    local_bad = 0
    was_training = clip.training
    clip.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                local_bad += batch.num_bad
                if len(batch.indices) == 0:
                    continue
                images = batch.images.to(accelerator.device, dtype=input_dtype)
                texts = batch.texts.to(accelerator.device)
                with autocast():
                    image_parts.append(clip.encode_image(images, normalize=True).float())
                    text_parts.append(clip.encode_text(texts, normalize=True).float())
                index_parts.append(batch.indices)
            logit_scale = clip.logit_scale.exp().float().cpu()
    finally:
        clip.train(was_training)

    dim = _feature_dim_over_processes(accelerator, image_parts)
    empty = torch.empty(0, dim)
    indices, image_features, text_features = gather_rows_by_index(
        accelerator,
        torch.cat(index_parts) if index_parts else torch.empty(0, dtype=torch.long),
        torch.cat(image_parts) if image_parts else empty,
        torch.cat(text_parts) if text_parts else empty,
    )
    num_bad = _sum_over_processes(accelerator, local_bad)
    if len(indices) == 0:
        raise AccClipError(f"validation set: no readable samples ({num_bad} skipped as unreadable)")

    result: list[Optional[dict[str, float]]] = [None]
    if accelerator.is_main_process:
        rows = indices.tolist()
        filepaths = getattr(loader.dataset, "filepaths", None)
        captions = getattr(loader.dataset, "captions", None)
        image_keys = [filepaths[i] for i in rows] if filepaths is not None else None
        if image_keys is not None:
            image_features = same_key_same_features(image_features, image_keys)
        if captions is not None:
            text_features = same_key_same_features(text_features, [captions[i] for i in rows])
        metrics = {"val_loss": whole_set_clip_loss(image_features, text_features, logit_scale)}
        metrics.update(retrieval_metrics(image_features, text_features, logit_scale))
        if image_keys is not None and len(set(image_keys)) < len(image_keys):
            metrics.update(coco_retrieval_metrics(image_features, text_features, image_keys))
        metrics.update(num_samples=len(indices), num_bad=num_bad)
        result[0] = metrics
    broadcast_object_list(result)
    return result[0]


# --- checkpoints ---------------------------------------------------------------------------------


class Evaluator:
    """What the train loop evaluates, built once: the validation loader (CSV or shards) and the
    zero-shot sets, with open_clip_train's schedule (`--val-frequency`, `--zeroshot-frequency`,
    and always after the last epoch)."""

    def __init__(self, config, preprocess_val: Callable, tokenizer: Callable, accelerator: Accelerator):
        from acc_clip import zeroshot
        from acc_clip.data import dataset_type_of
        from acc_clip.data.csv import CsvDataset, build_eval_loader

        self.config, self.tokenizer, self.accelerator = config, tokenizer, accelerator
        self.val_loader = None
        rank, world = accelerator.process_index, accelerator.num_processes
        if config.val_data:
            if dataset_type_of(config.val_data, config.dataset_type) == "webdataset":
                from acc_clip.data.wds import build_wds_loader

                self.val_loader, _ = build_wds_loader(
                    config.val_data, preprocess=preprocess_val, tokenizer=tokenizer, batch_size=config.batch_size,
                    workers=config.workers, seed=config.seed, epoch=0, rank=rank, world_size=world, is_train=False)
            else:
                dataset = CsvDataset(config.val_data, transform=preprocess_val, tokenizer=tokenizer,
                                     img_key=config.csv_img_key, caption_key=config.csv_caption_key,
                                     sep=config.csv_separator, augment_seeded=False)
                self.val_loader = build_eval_loader(dataset, batch_size=config.batch_size, workers=config.workers,
                                                    rank=rank, world_size=world)
        self.zeroshot_sets = []
        if config.zeroshot_data:
            dataset, classnames = zeroshot.load_zeroshot_dataset(
                config.zeroshot_data, transform=preprocess_val, classnames_file=config.zeroshot_classnames)
            self.zeroshot_sets.append(("zeroshot", dataset, classnames, zeroshot.load_templates(config.zeroshot_templates)))
        if config.imagenet_val:
            import open_clip

            dataset, classnames = zeroshot.load_imagenet_val(config.imagenet_val, transform=preprocess_val)
            self.zeroshot_sets.append(("imagenet-zeroshot", dataset, classnames, open_clip.OPENAI_IMAGENET_TEMPLATES))

    @property
    def enabled(self) -> bool:
        return self.val_loader is not None or bool(self.zeroshot_sets)

    @staticmethod
    def _due(frequency: int, completed_epochs: int, last: bool) -> bool:
        return frequency > 0 and (last or completed_epochs % frequency == 0)

    def run(self, model, completed_epochs: int, *, last: bool = False, force: bool = False) -> dict:
        """The metrics due after `completed_epochs` (all of them with `force`), one flat dict."""
        from acc_clip import zeroshot

        metrics: dict = {}
        if self.val_loader is not None and (force or self._due(self.config.val_frequency, completed_epochs, last)):
            metrics.update(evaluate_retrieval(model, self.val_loader, self.accelerator,
                                              precision_autocast=self.accelerator.autocast))
        if force or self._due(self.config.zeroshot_frequency, completed_epochs, last):
            for name, dataset, classnames, templates in self.zeroshot_sets:
                result = zeroshot.zeroshot_eval(model, self.tokenizer, dataset, classnames, templates,
                                                self.accelerator, batch_size=self.config.batch_size,
                                                workers=self.config.workers,
                                                precision_autocast=self.accelerator.autocast)
                metrics.update({k.replace("zeroshot", name, 1): v for k, v in result.items()})
        return metrics


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items())


def _state_dict_of(checkpoint: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        state_dict = checkpoint["state_dict"]  # open_clip's epoch_N.pt
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = checkpoint  # a plain state dict
    else:
        raise AccClipError(f"{path}: not an open_clip checkpoint (no 'state_dict' and not a state dict of tensors)")
    # DDP-wrapped models save their parameters under `module.`.
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in state_dict.items()}


def _first_mismatch(model_state: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> Optional[str]:
    for key, value in model_state.items():
        if key not in loaded:
            return f"{key!r} is missing from the checkpoint"
        if loaded[key].shape != value.shape:
            return f"{key!r} has shape {list(loaded[key].shape)} in the checkpoint, {list(value.shape)} in the model"
    for key in loaded:
        if key not in model_state:
            return f"{key!r} is in the checkpoint but not in the model"
    return None


def load_weights_for_eval(model: torch.nn.Module, path: str) -> None:
    """Load an open_clip `epoch_N.pt` (keys epoch, name, state_dict, ...) or a plain state dict
    into `model`; a `module.` prefix is stripped.

    An acc_clip step checkpoint folder (`checkpoints/step_NNNNNNNN`) is read through its
    model.safetensors. Any other format is an AccClipError "not an open_clip checkpoint"; weights
    of another architecture are an AccClipError naming the first mismatching key."""
    if os.path.isdir(path):
        from safetensors.torch import load_file

        from acc_clip.checkpoint import read_manifest

        read_manifest(path, source="--checkpoint")  # refuses a partial or foreign folder in one line
        weights = os.path.join(path, "model.safetensors")
        if not os.path.isfile(weights):
            raise AccClipError(f"{path}: an acc_clip checkpoint without model.safetensors")
        state_dict = load_file(weights)
    elif not os.path.isfile(path):
        raise AccClipError(f"{path}: checkpoint file not found")
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types for a file it cannot read
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise AccClipError(f"{path}: not an open_clip checkpoint ({type(error).__name__}: {first_line})") from None
        state_dict = _state_dict_of(checkpoint, path)
    mismatch = _first_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise AccClipError(f"{path}: checkpoint does not fit the model architecture: {mismatch}")
    model.load_state_dict(state_dict)


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acc-clip eval", description="Evaluate a checkpoint: retrieval and zero-shot.")
    parser.add_argument("--model", required=True, help="open_clip model name, or local-dir:PATH")
    parser.add_argument("--checkpoint", required=True, help="open_clip epoch_N.pt or a plain state dict")
    parser.add_argument("--val-data", help="validation CSV (one image,caption pair per row)")
    parser.add_argument("--csv-img-key", default="filepath")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--csv-separator", default="\t")
    parser.add_argument("--zeroshot-data", help="folder with one sub-folder per class, or a filepath,label CSV")
    parser.add_argument("--zeroshot-classnames", help="class names, one per line (default: folder names)")
    parser.add_argument("--zeroshot-templates", help="prompt templates, one per line, {} = class name")
    parser.add_argument("--imagenet-val", help="ImageNet validation folder (1000 class sub-folders)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu forces the CPU")
    parser.add_argument("--out", help="also write all metrics to this JSON file")
    args = parser.parse_args(argv)
    if not (args.val_data or args.zeroshot_data or args.imagenet_val):
        parser.error("nothing to evaluate: give --val-data, --zeroshot-data and/or --imagenet-val")
    return args


def main(argv: list[str]) -> int:
    """`acc-clip eval ...` (also `accelerate launch -m acc_clip.eval ...`): one JSON line per
    evaluation on stdout (main process), all metrics together in `--out`."""
    args = parse_args(argv)
    import open_clip

    from acc_clip import zeroshot
    from acc_clip.data.csv import CsvDataset, build_eval_loader

    accelerator = Accelerator(cpu=args.device == "cpu")
    model, _, preprocess_val = open_clip.create_model_and_transforms(args.model, pretrained=None)
    load_weights_for_eval(model, args.checkpoint)
    model.to(accelerator.device)
    if accelerator.is_main_process:
        print(f"acc-clip eval: {args.checkpoint} on {accelerator.num_processes} process(es), "
              f"device {accelerator.device}", file=sys.stderr)
    tokenizer = open_clip.get_tokenizer(args.model)

    results: dict[str, dict] = {}
    if args.val_data:
        dataset = CsvDataset(
            args.val_data, transform=preprocess_val, tokenizer=tokenizer, img_key=args.csv_img_key,
            caption_key=args.csv_caption_key, sep=args.csv_separator, augment_seeded=False,
        )
        loader = build_eval_loader(
            dataset, batch_size=args.batch_size, workers=args.workers,
            rank=accelerator.process_index, world_size=accelerator.num_processes,
        )
        results["retrieval"] = evaluate_retrieval(model, loader, accelerator, precision_autocast=accelerator.autocast)
    zeroshot_sets = []
    if args.zeroshot_data:
        dataset, classnames = zeroshot.load_zeroshot_dataset(
            args.zeroshot_data, transform=preprocess_val, classnames_file=args.zeroshot_classnames)
        zeroshot_sets.append(("zeroshot", dataset, classnames, zeroshot.load_templates(args.zeroshot_templates)))
    if args.imagenet_val:
        dataset, classnames = zeroshot.load_imagenet_val(args.imagenet_val, transform=preprocess_val)
        zeroshot_sets.append(("imagenet-zeroshot", dataset, classnames, open_clip.OPENAI_IMAGENET_TEMPLATES))
    for name, dataset, classnames, templates in zeroshot_sets:
        results[name] = zeroshot.zeroshot_eval(
            model, tokenizer, dataset, classnames, templates, accelerator,
            batch_size=args.batch_size, workers=args.workers, precision_autocast=accelerator.autocast,
        )

    if accelerator.is_main_process:
        for name, metrics in results.items():
            print(json.dumps({"eval": name, **metrics}), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    from acc_clip.cli import main as cli_main

    sys.exit(cli_main(["eval", *sys.argv[1:]]))

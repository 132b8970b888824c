"""Retrieval metrics on features: pure functions of tensors, no model, no processes.

Retrieval metrics are open_clip's (`open_clip_train.train.get_clip_metrics`): each row of the
validation set is one (image, caption) pair, and its rank is the position of the paired item among
all rows. Data with several captions per image (COCO) also gets the standard COCO protocol, under
keys prefixed `coco_`, over unique images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RECALL_AT = (1, 5, 10)


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


# --- distributed collection ----------------------------------------------------------------------


def same_key_same_features(features: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
    """Give every row the features of the first row with its key (an image file, a caption).

    Rows that share an image encode to features that differ only by float noise from batching
    (so by how rows were split over processes); made identical, their comparisons are exact ties,
    which the ranks resolve in the row's favour (`_diagonal_ranks`) instead of by that noise."""
    first_row_of_key: dict[str, int] = {}
    first_rows = [first_row_of_key.setdefault(key, row) for row, key in enumerate(keys)]
    return features[first_rows]

"""Retrieval metrics on features: pure functions of tensors, no model, no processes.

Retrieval metrics are open_clip's (`open_clip_train.train.get_clip_metrics`): each row of the
validation set is one (image, caption) pair, and its rank is the position of the paired item among
all rows. Data with several captions per image (COCO) also gets the standard COCO protocol, under
keys prefixed `coco_`, over unique images.

Bounded memory: a rank is the count of keys scoring strictly above the pair's own score, so queries
are ranked a block of `chunk_size` at a time against every key (memory chunk x rows, not rows x rows;
the default bounds a block to BLOCK_BYTES whatever the set's size). Several processes split the queries
(`share`) and merge their ranks (`gather`).

Exactness: scores are accumulated in float64 (`score_dtype`). A float32 dot product's value depends on
how the matrix product is cut (BLAS sums in another order for another shape: measured on this CPU, 90% of
the scores of 1-row blocks differ in their last bit from the whole matrix's, enough to move R@5 by 0.02 on
50 rows); in float64 the order moves a score by ~1e-16 of itself, far below the spacing of float32
features' scores, so every block size and process count gives the whole matrix's ranks. Ties between
identical features stay exact ties, compared within one block.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch

RECALL_AT = (1, 5, 10)
BLOCK_BYTES = 512 * 2**20  # the default block: as many queries as keep their scores within this
COMPARE_SCORES = 2**19  # compared at a time: the comparison's temporaries (bool, int64 count) stay a few MB

Gather = Callable[[torch.Tensor], torch.Tensor]  # this process's ranks -> every process's, in query order


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


def _recalls(prefix: str, ranks: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}_R@{k}": (ranks < k).sum().item() / len(ranks) for k in RECALL_AT}


def share_of(count: int, share: tuple[int, int]) -> range:
    """The contiguous queries process `rank` of `world` ranks: shares in rank order cover range(count)."""
    rank, world = share
    return range(count * rank // world, count * (rank + 1) // world)


def default_chunk_size(keys: int, score_dtype: torch.dtype = torch.float64) -> int:
    """Queries per block when --val-retrieval-chunk-size is not given: a block of scores within BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // (max(keys, 1) * score_dtype.itemsize))


def blocks(queries: range, chunk_size: int) -> Iterator[slice]:
    """`queries` in slices of at most chunk_size (0: one slice)."""
    step = chunk_size or max(len(queries), 1)
    for start in range(queries.start, queries.stop, step):
        yield slice(start, min(start + step, queries.stop))


PRODUCT_SCORES = 2**22  # converted or multiplied at a time by _product: 32 MB of float64


def _product(
    left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype, left_scale: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """(left_scale * left) @ right.T in `dtype`, [len(left), len(right)], the scale applied in left's own
    precision (as get_clip_metrics scales) and each operand converted a slice at a time: whole float64 copies
    of 1M features would be 4 GB per tower. The longer operand is sliced; the other, at most a block's
    queries, is converted once."""
    out = torch.empty((len(left), len(right)), dtype=dtype)
    if len(left) >= len(right):
        small = right.to(dtype).t()
        step = max(1, PRODUCT_SCORES // max(len(right), left.shape[1]))
        for start in range(0, len(left), step):
            torch.matmul((left_scale * left[start : start + step]).to(dtype), small, out=out[start : start + step])
    else:
        small = (left_scale * left).to(dtype)
        step = max(1, PRODUCT_SCORES // max(len(left), right.shape[1]))
        for start in range(0, len(right), step):
            out[:, start : start + step] = small @ right[start : start + step].to(dtype).t()
    return out


def _rows_per_slice(width: int) -> int:
    return max(1, COMPARE_SCORES // max(width, 1))


def _above_per_row(scores: torch.Tensor, own: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """For each row of scores [q, n], how many of its entries are strictly above own[row], each entry counted
    `weights[column]` times (the rows a distinct key stands for). The counts go into one tensor made first:
    small results kept between the slices' temporaries would fragment the heap, which then grows by a
    temporary per slice (measured: +280 MB for a 25k-key block)."""
    counts = torch.empty(scores.shape[0], dtype=torch.long)
    rows = _rows_per_slice(scores.shape[1])
    for start in range(0, scores.shape[0], rows):
        part = slice(start, start + rows)
        above = scores[part] > own[part].unsqueeze(1)
        counts[part] = torch.count_nonzero(above, dim=1) if weights is None else above.double() @ weights
    return counts


def _above_per_column(scores: torch.Tensor, own: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """For each column of scores [n, q], how many of its entries are strictly above own[column], each entry
    counted `weights[row]` times."""
    counts = torch.zeros(scores.shape[1], dtype=torch.long)
    rows = _rows_per_slice(scores.shape[1])
    for start in range(0, scores.shape[0], rows):
        above = scores[start : start + rows] > own.unsqueeze(0)
        counts += (
            torch.count_nonzero(above, dim=0)
            if weights is None
            else (weights[start : start + rows] @ above.double()).long()
        )
    return counts


@dataclass(frozen=True)
class Distinct:
    """Rows numbered by their key (an image file, a caption): rows with one key are one item, scored once."""

    first_rows: list[int]  # the first row of each distinct key, in order of appearance
    of_row: torch.Tensor  # each row's item number
    weights: torch.Tensor  # rows per item (float64, for weighted counts)

    def select(self, features: torch.Tensor) -> torch.Tensor:
        """The features of each distinct item (its first row's): `features` itself when every row is one."""
        return features if len(self.first_rows) == len(features) else features[self.first_rows]

    @staticmethod
    def of(keys: Sequence[Hashable] | None, rows: int) -> Distinct:
        """`keys` numbered; None: every row its own item."""
        if keys is None:
            return Distinct(list(range(rows)), torch.arange(rows), torch.ones(rows, dtype=torch.float64))
        number: dict[Hashable, int] = {}
        first_rows: list[int] = []
        for row, key in enumerate(keys):
            if key not in number:
                number[key] = len(first_rows)
                first_rows.append(row)
        of_row = torch.tensor([number[key] for key in keys], dtype=torch.long)
        return Distinct(first_rows, of_row, torch.bincount(of_row, minlength=len(first_rows)).double())


def pair_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    queries: range,
    chunk_size: int = 0,
    score_dtype: torch.dtype = torch.float64,
    images: Distinct | None = None,
    captions: Distinct | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of rows `queries` (row i's image and caption are a pair): image-to-text, how many
    captions (rows) score above row i's own caption for image i; text-to-image, how many images (rows) score
    above its own for caption i. Scores are those of `logit_scale * images @ texts.T` (scaled images, then the
    product, as get_clip_metrics computes it) in `score_dtype`.

    Ties count in the pair's favour: rows with the same key as the pair's own (`images`, `captions`: the same
    file, the same caption) are the same item, scored once and never above it, so whatever the last bits of a
    product (BLAS sums in another order for another shape or alignment), they tie. open_clip's position on
    ties depends on how argsort happens to order equal values."""
    rows = len(image_features)
    images, captions = images or Distinct.of(None, rows), captions or Distinct.of(None, rows)
    distinct_images, distinct_texts = images.select(image_features), captions.select(text_features)
    image_to_text, text_to_image = [], []
    for block in blocks(queries, chunk_size):  # one block of scores alive at a time: each dies in its call
        scores = _product(image_features[block], distinct_texts, score_dtype, logit_scale)
        image_to_text.append(_above_own_key(scores, captions, block))
        del scores
        scores = _product(distinct_images, text_features[block], score_dtype, logit_scale)
        text_to_image.append(_above_own_key(scores, images, block, by_column=True))
        del scores
    empty = torch.empty(0, dtype=torch.long)
    return torch.cat(image_to_text or [empty]), torch.cat(text_to_image or [empty])


def _above_own_key(
    scores: torch.Tensor, keys: Distinct, block: slice, *, by_column: bool = False, by_rows: bool = True
) -> torch.Tensor:
    """Ranks of the queries of `block`, whose scores against the distinct keys are the rows of scores [q,
    keys] (the columns of [keys, q] `by_column`): keys above the query's own, each counted as the rows it
    stands for (`by_rows`, the row protocol) or once (the COCO protocol's distinct images)."""
    own_key = keys.of_row[block]
    weights = keys.weights if by_rows else None
    if by_column:
        return _above_per_column(scores, scores[own_key, torch.arange(len(own_key))], weights)
    return _above_per_row(scores, scores[torch.arange(len(own_key)), own_key], weights)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    chunk_size: int | None = 0,
    score_dtype: torch.dtype = torch.float64,
    image_keys: Sequence[Hashable] | None = None,
    caption_keys: Sequence[Hashable] | None = None,
    share: tuple[int, int] = (0, 1),
    gather: Gather = lambda ranks: ranks,
) -> dict[str, float]:
    """Row i's image and caption are a pair. Keys: `{image_to_text,text_to_image}_{mean_rank,
    median_rank,R@1,R@5,R@10}`; ranks are 1-based, recalls fractions in [0, 1]. Equal to
    get_clip_metrics when no logits tie; rows with the pair's own image or caption key tie in its favour
    (`pair_ranks`). Each process ranks its `share` of the rows, `chunk_size` queries at a time (None:
    `default_chunk_size`, 0: one block); `gather` merges the shares."""
    rows = len(image_features)
    chunk = default_chunk_size(rows, score_dtype) if chunk_size is None else chunk_size
    image_to_text, text_to_image = pair_ranks(
        image_features,
        text_features,
        logit_scale,
        share_of(rows, share),
        chunk,
        score_dtype,
        Distinct.of(image_keys, rows),
        Distinct.of(caption_keys, rows),
    )
    metrics = _rank_summary("image_to_text", gather(image_to_text))
    metrics.update(_rank_summary("text_to_image", gather(text_to_image)))
    return metrics


def coco_ranks(
    image_features_per_row: torch.Tensor,
    text_features: torch.Tensor,
    images: Distinct,
    captions: Distinct,
    image_queries: range,
    caption_queries: range,
    chunk_size: int = 0,
    score_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based COCO ranks. Image-to-text, for distinct images `image_queries`: how many captions (rows) score
    above the image's best own caption. Text-to-image, for captions (rows) `caption_queries`: how many
    distinct images score above the caption's own. Scores are cosine similarities (a scale orders alike) in
    `score_dtype`; a caption key shared by rows is scored once."""
    distinct_images, distinct_texts = images.select(image_features_per_row), captions.select(text_features)
    image_to_text = [
        _above_best_own_caption(_product(distinct_images[block], distinct_texts, score_dtype), images, captions, block)
        for block in blocks(image_queries, chunk_size)
    ]
    text_to_image = [
        _above_own_key(
            _product(distinct_images, text_features[block], score_dtype), images, block, by_column=True, by_rows=False
        )
        for block in blocks(caption_queries, chunk_size)
    ]
    empty = torch.empty(0, dtype=torch.long)
    return torch.cat(image_to_text or [empty]), torch.cat(text_to_image or [empty])


def _above_best_own_caption(scores: torch.Tensor, images: Distinct, captions: Distinct, block: slice) -> torch.Tensor:
    """For distinct images `block` (the rows of scores [q images, distinct captions]): captions above the
    image's best own caption, read from this block's own values (O(rows) memory, no mask of the block)."""
    rows = ((images.of_row >= block.start) & (images.of_row < block.stop)).nonzero().squeeze(1)
    image, caption = images.of_row[rows] - block.start, captions.of_row[rows]
    best_own = torch.full((block.stop - block.start,), float("-inf"), dtype=scores.dtype)
    best_own = best_own.scatter_reduce(0, image, scores[image, caption], reduce="amax")
    return _above_per_row(scores, best_own, captions.weights)


def coco_retrieval_metrics(
    image_features_per_row: torch.Tensor,
    text_features: torch.Tensor,
    image_keys: Sequence[Hashable],
    *,
    chunk_size: int | None = 0,
    score_dtype: torch.dtype = torch.float64,
    caption_keys: Sequence[Hashable] | None = None,
    share: tuple[int, int] = (0, 1),
    gather: Gather = lambda ranks: ranks,
) -> dict[str, float]:
    """The COCO protocol, for rows that share images (several captions per image).

    Rows with the same `image_keys` entry (e.g. the file path) are one image; its feature is taken
    from its first row. Image-to-text: an image hits at k when ANY of its captions is among the k
    captions (of all rows) it scores highest. Text-to-image: a caption hits at k when its own image
    is among the k unique images that score it highest.

    Keys: `coco_image_to_text_R@{1,5,10}`, `coco_text_to_image_R@{1,5,10}` (fractions in [0, 1])
    and `coco_num_images` (unique images).
    """
    rows = len(image_keys)
    images, captions = Distinct.of(image_keys, rows), Distinct.of(caption_keys, rows)
    chunk = default_chunk_size(rows, score_dtype) if chunk_size is None else chunk_size
    image_to_text, text_to_image = coco_ranks(
        image_features_per_row,
        text_features,
        images,
        captions,
        share_of(len(images.first_rows), share),
        share_of(rows, share),
        chunk,
        score_dtype,
    )
    metrics = _recalls("coco_image_to_text", gather(image_to_text))
    metrics.update(_recalls("coco_text_to_image", gather(text_to_image)))
    metrics["coco_num_images"] = len(images.first_rows)
    return metrics


# --- distributed collection ----------------------------------------------------------------------


def same_key_same_features(features: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
    """Give every row the features of the first row with its key (an image file, a caption).

    Rows that share an image encode to features that differ only by float noise from batching
    (so by how rows were split over processes); made identical, their comparisons are exact ties,
    which the ranks resolve in the row's favour (`pair_ranks`) instead of by that noise."""
    first_row_of_key: dict[str, int] = {}
    first_rows = [first_row_of_key.setdefault(key, row) for row, key in enumerate(keys)]
    return features[first_rows]

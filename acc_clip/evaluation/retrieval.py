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

from collections.abc import Callable, Iterator, Sequence

import torch

RECALL_AT = (1, 5, 10)
BLOCK_BYTES = 512 * 2**20  # the default block: as many queries as keep their scores within this
COMPARE_ROWS = 256  # the comparison's boolean temporary covers this many rows of a block at a time

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


def _above_per_row(scores: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """For each row of scores [q, n], how many of its entries are strictly above own[row]."""
    return torch.cat(
        [
            (part > mine.unsqueeze(1)).sum(dim=1)
            for part, mine in zip(scores.split(COMPARE_ROWS), own.split(COMPARE_ROWS))
        ]
    )


def _above_per_column(scores: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """For each column of scores [n, q], how many of its entries are strictly above own[column]."""
    counts = torch.zeros(scores.shape[1], dtype=torch.long)
    for part in scores.split(COMPARE_ROWS):
        counts += (part > own.unsqueeze(0)).sum(dim=0)
    return counts


def pair_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    queries: range,
    chunk_size: int = 0,
    score_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of rows `queries` (row i's image and caption are a pair): image-to-text, how many
    captions score above row i's own caption for image i; text-to-image, how many images score above it
    for caption i. Every block is a slice of the one matrix `logit_scale * images @ texts.T`, computed as
    get_clip_metrics computes it (scaled images, then the product), in `score_dtype`, text queries as
    its columns.

    Ties count in the pair's favour: an equal logit comes from an identical feature (the same image or
    caption on another row), which retrieves the pair as well as its own; open_clip's position on ties
    depends on how argsort happens to order equal values."""
    scaled = (logit_scale * image_features).to(score_dtype)
    text_features = text_features.to(score_dtype)
    image_to_text, text_to_image = [], []
    for rows in blocks(queries, chunk_size):  # one block of scores alive at a time: each dies in its call
        image_to_text.append(_rows_above_own(scaled[rows] @ text_features.t(), rows.start))
        text_to_image.append(_columns_above_own(scaled @ text_features[rows].t(), rows.start))
    empty = torch.empty(0, dtype=torch.long)
    return torch.cat(image_to_text or [empty]), torch.cat(text_to_image or [empty])


def _rows_above_own(scores: torch.Tensor, first: int) -> torch.Tensor:
    """Ranks of queries first, first + 1, ... as the rows of scores [q, keys]: their own key is key first + row."""
    return _above_per_row(scores, scores.diagonal(offset=first))


def _columns_above_own(scores: torch.Tensor, first: int) -> torch.Tensor:
    """Ranks of queries first, first + 1, ... as the columns of scores [keys, q]: their own key is first + column."""
    return _above_per_column(scores, scores.diagonal(offset=-first))


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    chunk_size: int | None = 0,
    score_dtype: torch.dtype = torch.float64,
    share: tuple[int, int] = (0, 1),
    gather: Gather = lambda ranks: ranks,
) -> dict[str, float]:
    """Row i's image and caption are a pair. Keys: `{image_to_text,text_to_image}_{mean_rank,
    median_rank,R@1,R@5,R@10}`; ranks are 1-based, recalls fractions in [0, 1]. Equal to
    get_clip_metrics when no logits tie; ties count in the pair's favour (`pair_ranks`). Each process
    ranks its `share` of the rows, `chunk_size` queries at a time (None: `default_chunk_size`, 0: one
    block); `gather` merges the shares."""
    rows = len(image_features)
    chunk = default_chunk_size(rows, score_dtype) if chunk_size is None else chunk_size
    image_to_text, text_to_image = pair_ranks(
        image_features, text_features, logit_scale, share_of(rows, share), chunk, score_dtype
    )
    metrics = _rank_summary("image_to_text", gather(image_to_text))
    metrics.update(_rank_summary("text_to_image", gather(text_to_image)))
    return metrics


def unique_images(image_keys: Sequence[str]) -> tuple[list[int], torch.Tensor]:
    """The first row of each distinct key (an image file), and each row's image number."""
    image_of_key: dict[str, int] = {}
    first_rows: list[int] = []
    for row, key in enumerate(image_keys):
        if key not in image_of_key:
            image_of_key[key] = len(first_rows)
            first_rows.append(row)
    return first_rows, torch.tensor([image_of_key[key] for key in image_keys], dtype=torch.long)


def coco_ranks(
    images: torch.Tensor,
    text_features: torch.Tensor,
    image_of_row: torch.Tensor,
    image_queries: range,
    caption_queries: range,
    chunk_size: int = 0,
    score_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based COCO ranks. Image-to-text, for images `image_queries`: how many captions (of all rows)
    score above the image's best own caption. Text-to-image, for captions `caption_queries`: how many
    unique images score above the caption's own. Scores are cosine similarities (a scale orders alike),
    every block a slice of `images @ texts.T` in `score_dtype`."""
    images, text_features = images.to(score_dtype), text_features.to(score_dtype)
    image_to_text = [
        _above_best_own_caption(images[block] @ text_features.t(), image_of_row, block)
        for block in blocks(image_queries, chunk_size)
    ]
    text_to_image = [
        _images_above_own(images @ text_features[block].t(), image_of_row[block])
        for block in blocks(caption_queries, chunk_size)
    ]
    empty = torch.empty(0, dtype=torch.long)
    return torch.cat(image_to_text or [empty]), torch.cat(text_to_image or [empty])


def _above_best_own_caption(scores: torch.Tensor, image_of_row: torch.Tensor, block: slice) -> torch.Tensor:
    """For images `block` (the rows of scores [q images, all captions]): captions above the image's best
    own caption, read from this block's own values (O(rows) memory, no mask of the block)."""
    captions = ((image_of_row >= block.start) & (image_of_row < block.stop)).nonzero().squeeze(1)
    image = image_of_row[captions] - block.start
    best_own = torch.full((block.stop - block.start,), float("-inf"), dtype=scores.dtype)
    best_own = best_own.scatter_reduce(0, image, scores[image, captions], reduce="amax")
    return _above_per_row(scores, best_own)


def _images_above_own(scores: torch.Tensor, own_images: torch.Tensor) -> torch.Tensor:
    """For captions (the columns of scores [all images, q captions]) of images own_images: images above their own."""
    return _above_per_column(scores, scores[own_images, torch.arange(len(own_images))])


def coco_retrieval_metrics(
    image_features_per_row: torch.Tensor,
    text_features: torch.Tensor,
    image_keys: Sequence[str],
    *,
    chunk_size: int | None = 0,
    score_dtype: torch.dtype = torch.float64,
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
    first_rows, image_of_row = unique_images(image_keys)
    images = image_features_per_row[first_rows]
    chunk = default_chunk_size(len(image_keys), score_dtype) if chunk_size is None else chunk_size
    image_to_text, text_to_image = coco_ranks(
        images,
        text_features,
        image_of_row,
        share_of(len(first_rows), share),
        share_of(len(image_keys), share),
        chunk,
        score_dtype,
    )
    metrics = _recalls("coco_image_to_text", gather(image_to_text))
    metrics.update(_recalls("coco_text_to_image", gather(text_to_image)))
    metrics["coco_num_images"] = len(first_rows)
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

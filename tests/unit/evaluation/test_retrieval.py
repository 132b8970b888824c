"""Chunked retrieval equals the whole matrix, exactly: every key, both protocols, ties, odd chunk sizes,
a chunk larger than the set, and queries split over simulated processes (real processes:
tests/integration/test_eval_processes.py)."""

from __future__ import annotations

import pytest
import torch

from acc_clip.evaluation.retrieval import coco_retrieval_metrics, default_chunk_size, retrieval_metrics


def whole_matrix_row_ranks(images, texts, scale):
    """The definition, written independently: the full logit matrix (float64 sums of the float32 scaled
    features' products, as the metrics take them), ranks = entries above the diagonal."""
    logits = (scale * images).double() @ texts.double().t()
    diagonal = logits.diagonal()
    return (logits > diagonal.unsqueeze(1)).sum(1), (logits.t() > diagonal.unsqueeze(1)).sum(1)


def whole_matrix_coco_ranks(images_per_row, texts, keys):
    firsts = {key: row for row, key in reversed(list(enumerate(keys)))}
    names = list(dict.fromkeys(keys))
    scores = images_per_row[[firsts[name] for name in names]].double() @ texts.double().t()  # [images, captions]
    own = torch.tensor([[key == name for key in keys] for name in names])
    best_own = scores.masked_fill(~own, float("-inf")).max(1).values
    image_of_row = torch.tensor([names.index(key) for key in keys])
    own_score = scores[image_of_row, torch.arange(len(keys))]
    return (scores > best_own.unsqueeze(1)).sum(1), (scores.t() > own_score.unsqueeze(1)).sum(1)


def recalls(ranks):
    return [(ranks < k).sum().item() / len(ranks) for k in (1, 5, 10)]


def tied_set(rows: int, seed: int, dim: int = 8):
    """Paired features where several rows share an image (COCO-like: 1-4 captions per image) and some
    captions repeat exactly, so many logits tie; coarse values make more exact ties."""
    generator = torch.Generator().manual_seed(seed)
    keys, image_rows = [], []
    for number in range(rows):
        image = torch.randint(-3, 4, (dim,), generator=generator).float()
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            keys.append(f"img{number}")
            image_rows.append(image)
    keys, images = keys[:rows], torch.stack(image_rows[:rows])
    texts = images + torch.randint(-2, 3, (rows, dim), generator=generator).float()
    texts[1::7] = texts[0]  # a caption repeated on every 7th row
    return images, texts, keys


def caption_keys_of(rows: int) -> list[str]:
    """tied_set's captions: every 7th row from row 1 repeats row 0's."""
    return ["c0" if row % 7 == 1 else f"c{row}" for row in range(rows)]


def split(metric, *args, processes: int, **kwargs):
    """The metric with queries split over `processes` simulated processes: each ranks its share, and the
    gather joins the shares in rank order, as the evaluator's all-gather does."""
    shares: dict[int, list[torch.Tensor]] = {}

    def gather_all(ranks):
        call = gather_all.calls = getattr(gather_all, "calls", -1) + 1
        shares.setdefault(call, []).append(ranks)
        return ranks

    for rank in range(processes):
        gather_all.calls = -1
        metric(*args, share=(rank, processes), gather=gather_all, **kwargs)
    joined = iter(torch.cat(parts) for _, parts in sorted(shares.items()))
    return metric(*args, share=(0, 1), gather=lambda _: next(joined), **kwargs)


CHUNKS = [0, 1, 2, 3, 7, 16, 49, 50, 51, 1000]


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("rows,seed", [(1, 0), (50, 1), (97, 2)])
def test_chunked_row_protocol_equals_the_whole_matrix(rows, seed, chunk_size):
    images, texts, keys = tied_set(rows, seed)
    scale = torch.tensor(3.7)
    expected_i2t, expected_t2i = whole_matrix_row_ranks(images, texts, scale)
    whole = retrieval_metrics(images, texts, scale)
    chunked = retrieval_metrics(images, texts, scale, chunk_size=chunk_size)
    assert chunked == whole
    keyed = retrieval_metrics(
        images, texts, scale, chunk_size=chunk_size, image_keys=keys, caption_keys=caption_keys_of(rows)
    )
    assert keyed == whole  # the keys name the identical features: the same ties
    assert [chunked[f"image_to_text_R@{k}"] for k in (1, 5, 10)] == recalls(expected_i2t)
    assert [chunked[f"text_to_image_R@{k}"] for k in (1, 5, 10)] == recalls(expected_t2i)
    assert chunked["image_to_text_mean_rank"] == expected_i2t.sum().item() / rows + 1
    assert chunked["text_to_image_mean_rank"] == expected_t2i.sum().item() / rows + 1


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("rows,seed", [(1, 3), (50, 4), (97, 5)])
def test_chunked_coco_protocol_equals_the_whole_matrix(rows, seed, chunk_size):
    images, texts, keys = tied_set(rows, seed)
    expected_i2t, expected_t2i = whole_matrix_coco_ranks(images, texts, keys)
    chunked = coco_retrieval_metrics(images, texts, keys, chunk_size=chunk_size)
    assert chunked == coco_retrieval_metrics(images, texts, keys)
    assert chunked == coco_retrieval_metrics(
        images, texts, keys, chunk_size=chunk_size, caption_keys=caption_keys_of(rows)
    )
    assert [chunked[f"coco_image_to_text_R@{k}"] for k in (1, 5, 10)] == recalls(expected_i2t)
    assert [chunked[f"coco_text_to_image_R@{k}"] for k in (1, 5, 10)] == recalls(expected_t2i)
    assert chunked["coco_num_images"] == len(set(keys))


def test_the_sets_have_ties_and_imperfect_ranks():
    # Guards the two tests above: with no ties, or every rank 0, they would prove little.
    images, texts, keys = tied_set(97, 2)
    logits = images @ texts.t()
    assert (logits == logits.diagonal().unsqueeze(1)).sum() > 2 * 97
    i2t, t2i = whole_matrix_row_ranks(images, texts, 1.0)
    assert 0 < (i2t == 0).sum() < 97 and 0 < (t2i == 0).sum() < 97
    assert len(set(keys)) < len(keys)


@pytest.mark.parametrize("processes,chunk_size", [(2, 0), (2, 7), (3, 5), (4, 1000), (5, 1)])
def test_queries_split_over_processes_give_the_one_process_metrics(processes, chunk_size):
    images, texts, keys = tied_set(61, 6)
    scale = torch.tensor(2.0)
    assert split(retrieval_metrics, images, texts, scale, processes=processes, chunk_size=chunk_size) == (
        retrieval_metrics(images, texts, scale)
    )
    assert split(coco_retrieval_metrics, images, texts, keys, processes=processes, chunk_size=chunk_size) == (
        coco_retrieval_metrics(images, texts, keys)
    )


def test_a_chunk_holds_chunk_size_queries_not_the_whole_matrix(monkeypatch):
    """Memory O(chunk x rows): every score block the metrics compute has at most chunk_size query rows."""
    images, texts, keys = tied_set(40, 7)
    shapes = []
    real_matmul = torch.Tensor.__matmul__

    def recording_matmul(a, b):
        result = real_matmul(a, b)
        shapes.append(tuple(result.shape))
        return result

    monkeypatch.setattr(torch.Tensor, "__matmul__", recording_matmul)
    retrieval_metrics(images, texts, 1.0, chunk_size=6)
    coco_retrieval_metrics(images, texts, keys, chunk_size=6)
    assert shapes and all(min(shape) <= 6 for shape in shapes), shapes
    assert default_chunk_size(25_000) == 2684  # 512 MB of float64 scores


def test_rows_with_the_pairs_key_tie_in_its_favour_whatever_their_last_bits():
    """Rows of one image file (or one caption) are one item: scored once, so a product that differs in its
    last bits (BLAS sums in another order for another block shape or memory alignment: measured, one
    text-to-image rank in 105 moved between two processes) cannot put a copy of the pair above it."""
    generator = torch.Generator().manual_seed(8)
    keys = [f"img{row // 3}" for row in range(60)]  # 3 rows per image file
    images = torch.randn(20, 16, generator=generator).repeat_interleave(3, dim=0)
    texts = images + torch.randn(60, 16, generator=generator)  # near their images: many low ranks
    texts[1::7] = texts[0]
    captions = caption_keys_of(60)
    noise = torch.Generator().manual_seed(9)
    noisy_images = images * (1 + 1e-6 * torch.randn(images.shape, generator=noise))  # each row: other last bits
    noisy_texts = texts * (1 + 1e-6 * torch.randn(texts.shape, generator=noise))
    exact = {**retrieval_metrics(images, texts, 2.0), **coco_retrieval_metrics(images, texts, keys)}
    keyed = {
        **retrieval_metrics(noisy_images, noisy_texts, 2.0, image_keys=keys, caption_keys=captions),
        **coco_retrieval_metrics(noisy_images, noisy_texts, keys, caption_keys=captions),
    }
    assert keyed == pytest.approx(exact, abs=0)
    # Without the keys the noise decides the ties: the metrics move (what the keys guard against).
    assert retrieval_metrics(noisy_images, noisy_texts, 2.0) != retrieval_metrics(images, texts, 2.0)

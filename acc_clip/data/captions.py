"""Choosing a sample's caption when it has several: the keys of a shard's .json member (--json-text-key,
--json-text-key-probs, with open_clip main's meaning) and lists of captions (a tabular cell holding a JSON
list, a list column, a grouped shard's `captions`).

Guarantees:
- Training draws come from `caption_rng(seed, epoch, sample index)` only, so a sample gets the same caption
  whichever process or worker reads it, and a resumed run draws what the uninterrupted one did, under any
  number of processes and workers; another epoch draws afresh.
- With weights (one per key, in order; keys beyond the weights weigh 0), the keys of positive weight are
  drawn into a priority order without replacement, each next key with probability proportional to its
  weight among those left; the keys of weight 0 follow in their given order, as fallbacks (open_clip main's
  `_weighted_order`). Without weights the order is the given one. When every key holds a caption, key k
  comes first, so gives the caption, with probability w_k / sum(w).
- The first key in that order whose value is a non-empty string gives the caption (stripped). A value that is
  a list of strings (acc_clip's extension: main reads strings only) gives one of its non-empty entries, drawn
  uniformly in training, the first in validation.
- Validation (`rng` None) is deterministic: the keys in their given order (weights ignored), a list's first
  non-empty entry.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from acc_clip.data.common import sample_seed


def caption_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of sample `index`'s caption draws in `epoch`: every source draws from it."""
    return random.Random(sample_seed(seed, epoch, index))


def draw_caption(captions: Sequence[str], seed: int, epoch: int, index: int) -> str:
    """One of `captions` (not empty) for sample `index` in `epoch`."""
    return str(caption_rng(seed, epoch, index).choice(captions))


def split_keys(text: str) -> tuple[str, ...]:
    """';'-separated names (tar member suffixes, .json keys) in order, blanks dropped, as open_clip main reads them."""
    return tuple(part.strip() for part in text.split(";") if part.strip())


def key_order(keys: Sequence[str], weights: Sequence[float] | None, rng: random.Random | None) -> list[str]:
    """The priority order of `keys` for one sample: drawn by `weights` (see the module docstring), or as given
    without weights or without a generator (validation)."""
    if weights is None or rng is None:
        return list(keys)
    padded = list(weights) + [0.0] * (len(keys) - len(weights))
    left = [(key, weight) for key, weight in zip(keys, padded) if weight > 0]
    order = []
    while left:
        chosen = rng.choices(range(len(left)), weights=[weight for _, weight in left])[0]
        order.append(left.pop(chosen)[0])
    return order + [key for key, weight in zip(keys, padded) if weight <= 0]


def one_caption(value: Any, rng: random.Random | None) -> str:
    """The caption a .json value gives: a non-empty string, stripped; from a list of them one drawn with `rng`
    (the first without); '' for anything else."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        captions = [entry.strip() for entry in value if isinstance(entry, str) and entry.strip()]
        if captions:
            return rng.choice(captions) if rng is not None else captions[0]
    return ""


def caption_from_json(
    document: Any, keys: Sequence[str], weights: Sequence[float] | None, rng: random.Random | None
) -> str:
    """The caption of a parsed .json `document` under `keys` (module docstring); '' when no key gives one."""
    if not isinstance(document, dict):
        return ""
    for key in key_order(keys, weights, rng):
        caption = one_caption(document.get(key), rng)
        if caption:
            return caption
    return ""

"""The one rule that picks a caption when a sample has several (a tabular cell holding a JSON list, a list
column, a grouped shard's `captions`): a function of (seed, epoch, sample index) only, so a resumed run
draws what the uninterrupted run drew, under any number of processes and workers, and another epoch
draws again."""

from __future__ import annotations

import random
from collections.abc import Sequence

from acc_clip.data.common import sample_seed


def draw_caption(captions: Sequence[str], seed: int, epoch: int, index: int) -> str:
    """One of `captions` (not empty) for sample `index` in `epoch`."""
    return str(random.Random(sample_seed(seed, epoch, index)).choice(captions))

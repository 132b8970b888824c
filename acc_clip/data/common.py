"""Pieces shared by every input pipeline: the batch type, bad-sample skipping, per-sample seeding.

Augmentation randomness of a sample is a pure function of (seed, epoch, sample index), not of
which worker or process decoded it. That is what lets a run resume mid-epoch with exactly the
draws it would have made, and gives the same draws under any number of workers or processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch.utils.data import default_collate


class Batch(NamedTuple):
    # [B, 3, H, W]: float, model-ready; uint8, to normalise on the device; or undecoded
    # (`pixels.EncodedImages`, decoded on the device). See acc_clip/data/pixels.py.
    images: Any
    texts: torch.Tensor  # [B, context_length] long
    indices: torch.Tensor  # [B] long: sample index within the dataset (CSV row, or shard sample number)
    num_bad: int  # samples of this batch that were skipped (missing or corrupt image, empty caption)


class Sample(NamedTuple):
    image: Any  # what the dataset's transform returns
    text: torch.Tensor
    index: int  # type: ignore[assignment]  # the sample's index, not tuple.index


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, index)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextmanager
def seeded_torch_rng(seed: int) -> Iterator[None]:
    """Run a block (a torchvision transform) on torch's global CPU RNG seeded with `seed`,
    restoring the caller's RNG state afterwards so a worker-less loader does not disturb
    the main process's random stream. Only the CPU generator is touched: transforms draw from it,
    and `torch.manual_seed` would also reseed every accelerator (0.4 ms per sample)."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def collate_skipping_bad(samples: list[Sample | None], collate_images: Callable = default_collate) -> Batch:
    """Stack the good samples; a `None` stands for a skipped one and is counted. `collate_images`
    puts the images together (`pixels.collate_images` of the dataset's transform)."""
    good = [s for s in samples if s is not None]
    num_bad = len(samples) - len(good)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), num_bad)
    # default_collate stacks straight into shared memory inside a worker: one copy fewer.
    return Batch(
        images=collate_images([s.image for s in good]),
        texts=default_collate([s.text for s in good]),
        indices=torch.tensor([s.index for s in good], dtype=torch.long),
        num_bad=num_bad,
    )

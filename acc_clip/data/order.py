"""The sample order of an epoch and the position in it, kept in samples so that a run can resume on another layout.

Order. The sample order of epoch e is a pure function of (seed, e) over the samples only: a permutation of the
rows (`epoch_permutation`, tabular sources) or the shards' samples end to end (wds.epoch_sequence). Which
process and loader worker reads which part depends on the layout (processes, per-process batch, workers).

Position. What an epoch has trained so far is a list of `Segment`s, each a layout and the micro-batches every
process trained in it. The samples consumed are a pure function of (seed, epoch, segments), so a resume on
another layout serves exactly the samples not trained yet, each once, and later epochs are whole epochs of the
new layout. A resume on the layout of the last segment continues that segment (`split_position`): with nothing
changed it is the batch-count resume it always was, bit for bit.

Tabular sources consume consecutive stretches of the permutation: a segment of layout (R processes, B per
process) that trained k micro-batches used the next k x R x B samples (`consumed_samples`); the new layout cuts
what remains into its global micro-batches, dropping the last part shorter than one.

Sampler. `EpochBatchSampler` gives one rank's batches of `(epoch, index)` keys, global batch j being the next
B x R samples of the permutation and rank r taking the r-th contiguous slice of it: the set of samples in a
step does not depend on how many processes share it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from acc_clip.data.source import Segment, too_few_samples
from acc_clip.errors import UsageError


def _draw_int64(generator: torch.Generator) -> int:
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of `epoch`. A generator seeded with `seed` makes two 64-bit draws per epoch, the way a
    torch DataLoader over a RandomSampler draws from the global RNG (worker base seed, then permutation seed),
    and the second one seeds `randperm`: after `torch.manual_seed(seed)` open_clip_train's single-process
    loader makes exactly those draws, so both trainers visit the same samples in the same order."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch):
        _draw_int64(generator), _draw_int64(generator)
    _draw_int64(generator)  # the DataLoader's worker base seed, unused here: per-sample seeds instead
    permutation_seed = _draw_int64(generator)
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(permutation_seed))


def global_micro_batch(layout: dict[str, Any]) -> int:
    """Samples of one micro-batch over all processes in `layout` ({"batch_size", "world_size", ...})."""
    return int(layout["batch_size"]) * int(layout["world_size"])


def split_position(done: Sequence[Segment], layout: dict[str, Any]) -> tuple[list[Segment], int]:
    """(the segments before the one this layout continues, micro-batches already trained in it): a resume on the
    last segment's layout continues that segment; on another layout a new segment starts after all of them."""
    if done and done[-1].layout == layout:
        return list(done[:-1]), done[-1].batches
    return list(done), 0


def consumed_samples(done: Sequence[Segment]) -> int:
    """Samples of the permutation the segments consumed (tabular sources: consecutive stretches)."""
    return sum(segment.batches * global_micro_batch(segment.layout) for segment in done)


class EpochBatchSampler(Sampler):
    """Batches of `(epoch, index)` keys for one rank; `set_epoch(e, start_batch=k, consumed=n)` starts after the
    first n samples of the permutation (earlier segments of the epoch) and skips k batches of this layout, by
    index arithmetic, without reading them (exact mid-epoch resume)."""

    def __init__(self, num_samples: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch_size = batch_size * world_size
        self.batches_per_epoch = num_samples // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise too_few_samples(num_samples, batch_size, world_size)
        self.epoch, self.start_batch, self.consumed = 0, 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0, consumed: int = 0) -> None:
        if not 0 <= consumed <= self.num_samples or start_batch > self.batches_after(consumed):
            raise UsageError(
                f"cannot start epoch {epoch} at batch {start_batch} after {consumed} samples: it has "
                f"{self.num_samples} samples, {self.global_batch_size} per global micro-batch"
            )
        self.epoch, self.start_batch, self.consumed = epoch, start_batch, consumed

    def batches_after(self, consumed: int) -> int:
        """Global micro-batches of this layout in what remains of the epoch after `consumed` samples."""
        return (self.num_samples - consumed) // self.global_batch_size

    def __len__(self) -> int:
        return self.batches_after(self.consumed) - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        permutation = epoch_permutation(self.num_samples, self.seed, self.epoch).tolist()
        for batch in range(self.start_batch, self.batches_after(self.consumed)):
            first = self.consumed + batch * self.global_batch_size + self.rank * self.batch_size
            yield [(self.epoch, index) for index in permutation[first : first + self.batch_size]]

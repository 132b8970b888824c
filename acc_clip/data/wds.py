"""Webdataset shards -> `Batch`es for one rank, with an epoch order that is a pure function of
(seed, epoch, rank, worker) and a mid-epoch resume that skips samples before decoding them.

Build one loader per epoch with `build_wds_loader`; it splits by rank itself, so do not pass it
through `accelerate.prepare`.

Training order of epoch e (R = world_size ranks, B = batch_size per rank):
  1. Each rank yields num_batches = num_samples // (B * R) batches (drop last), from
     W = max(1, min(workers, num_batches)) loader workers: one beyond the rank's batch count would
     have no batch to make, so it is not started (the trainer says so in one line). torch's DataLoader takes batches
     from its workers in turn, so batch b is batch b // W of worker b % W, and worker w makes exactly
     batches_of_worker(w) = len(range(w, num_batches, W)) of them.
  2. The shard list is shuffled with a generator seeded from (seed, e): the same on every rank. Its
     shards' samples, laid end to end in that order (each shard in file order, as many as its sizes.json
     count), are the epoch's sequence. Should the epoch be longer than the shards (--train-num-samples
     above their total), the sequence goes on with further passes, each shuffled from (seed, e, pass).
  3. Its first num_batches * B * R positions are cut into R * W contiguous spans that lie end to end in the
     order rank 0 worker 0, rank 0 worker 1, ..., rank 0 worker W-1, rank 1 worker 0, ...; the span of
     (r, w) is batches_of_worker(w) * B positions long. A worker opens only the shards its span reaches:
     in the first it reads past the samples before its span without decoding them, and it stops at the
     span's end, so two workers may read different parts of one shard (`epoch_sequence`, `worker_span`,
     `span_parts`).
  4. Each worker feeds its span through a shuffle buffer (seeded from seed, e, r, w) of raw, undecoded
     samples. With `resampled=True` it instead draws shards with replacement from the whole list, seeded
     from (seed, e, r, w): uniformly, or, with `upsampling_factors` F1::F2::... for the sources joined by
     '::' in the URLs, each shard of source i with weight F_i (a source of weight 0 is never opened); steps
     2 and 3 do not apply, and the epoch ends after the worker's batches.

Guarantee (not resampled), for any number of shards and shard sizes, ranks and workers (more workers than
shards included): every position among the first num_batches * B * R of the epoch's sequence is trained on
exactly once in the epoch, across all ranks and workers, and nothing else is. The positions after them,
fewer than one global batch of B * R, are left out of the epoch (drop last); the shard order is reshuffled
every epoch, so they are other samples each time. At the default length (the sizes.json total) the
sequence is one pass, so no sample repeats within an epoch; --train-num-samples below the total takes the
first positions only, above it later passes repeat samples. Which samples an epoch holds depends only on
the shards, their sizes.json, seed, epoch and num_batches * B * R; which rank and worker reads each, and
the order, on R, B and W as well. The spans are positions in the shards' counts: sizes.json, else
img2dataset's _stats.json, the count cache or, for local shards, their tar headers (data/shard_counts.py).
A set with no counts (remote shards never indexed by `acc-clip shards index`) trains only with
--train-num-samples, as open_clip_train trains it and with a warning (`warn_uncounted`): the shards
shuffled from (seed, e), rank r takes every R-th, its worker w every W-th of those, and reads them over
and over until its batches are made; no exactly-once then, and a resume is exact for the same R, B, W.
A shard that holds fewer samples than sizes.json says (cut short, damaged) leaves gaps at its missing
positions, counted as bad samples: nothing moves into them, so no other position shifts; one that holds
more has its extra samples left out, with a warning.

Resume: `start_batch=k` yields batches k, k+1, ... of the uninterrupted epoch: the same samples,
indices and pixels. Worker w drops the samples of its batches before k undecoded (tar bytes are
still read, images are not decoded), and the worker roles are rotated by k so that the loader,
which always starts at its worker 0, begins with batch k. This holds with resampled=True too.
The trainer keeps the position in samples (data/order.py): the segments of the epoch, each a layout
(R, B, --workers) and the micro-batches trained on it; on the last segment's layout it resumes with
k = that segment's batches, so a resumed run trains on exactly the batches the uninterrupted run would have,
with the same pixels (and, on the same number of CPU threads, bit-equal losses:
tests/integration/test_train_shards.py).

Elastic resume (not resampled). After `done` segments on other layouts, the samples they trained are known
without reading any: in a segment, worker role w of rank r trained the first batches_of_worker(w, k, W) x B
outputs of its shuffle buffer over its span, and the buffer's draws depend only on how many items pass, so
replaying it over the positions (`consumed_indices`) gives them. The positions no segment trained, in sequence
order, are laid out for this layout as a whole epoch is (steps 1 and 3 over them instead of 0, 1, ...), each
worker reading the shards its positions reach and skipping the others undecoded (`position_parts`), its buffer
seeded with the segment's number too (`buffer_rng`). So every position of the epoch (0 .. length-1, the
epoch's sequence) is trained at most once over all segments, and the last layout leaves out fewer than one
of its global batches. With no segment before, this is the epoch above exactly.

What resume guarantees when the order is not the same. The order above depends on the shards and
their sizes.json, seed, the epoch length (--train-num-samples), --dataset-resampled and
--train-data-upsampling-factors; with resampling also on R, B and W, whose draws cannot be replayed.
Change any of them between the save and the resume (refused unless --resume-changed-data), or, with
--dataset-resampled, let a shard fail to read in only one of the runs (it is cut short with a warning,
shifting what follows in its worker; without resampling its missing samples are gaps and nothing
shifts), and the resumed run takes batches k, k+1, ... of the new order: for the rest of that epoch
some samples are seen twice and others not at all. Still, every rank gets the same number of batches,
and later epochs are whole epochs of the new order. A position past the end of the new epoch is
refused with an error.

Augmentation: `preprocess` runs under `seeded_torch_rng(sample_seed(seed, epoch, index))`, index
being the sample number in its key, so the draws do not depend on which worker decodes a sample.
Shards made with --group-by-image carry all captions in the .json; one is drawn per epoch from
the same seed.

Members (`SampleMembers`, open_clip main's flags): the image is the first present of --image-key's suffixes
(jpg;png;jpeg;webp), the caption the first present of --text-key's (txt); with --json-text-key the caption
comes from those keys of the .json instead, in a priority order drawn per sample from (seed, epoch, index) by
--json-text-key-probs (captions.py; validation: the given order, a list's first entry). Images above
--max-image-pixels are refused from their header, before decoding (pixels.load_pixels).

Eval (`is_train=False`): shards in file order, rank r takes shards r, r+R, ..., no shuffle, no
augmentation seeding, every sample exactly once across ranks, the last batch of a worker partial.
Ranks may get different numbers of batches, so gather after the loop, not per batch.

Bad samples (no image, undecodable or too large image, no or empty caption, a gap for a sample missing from a
shard) become None and are counted by `collate_skipping_bad`; they keep their place, so they do not shift the
order of the others.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, islice
from typing import Any, ClassVar, cast

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from acc_clip.config.parsing import Config
from acc_clip.config.schema import NON_NEGATIVE, Domain, Section, option
from acc_clip.data.captions import caption_from_json, caption_rng, split_keys
from acc_clip.data.common import Batch, Sample, collate_skipping_bad, sample_seed
from acc_clip.data.order import global_micro_batch, split_position
from acc_clip.data.pixels import MAX_IMAGE_PIXELS, ImageDecodeError, ImageTooLarge, collate_images, load_pixels
from acc_clip.data.shard_counts import shard_counts
from acc_clip.data.source import DataOptions, Segment, Source, TrainData, too_few_samples
from acc_clip.errors import DataError, UsageError
from acc_clip.runtime.signals import ignore_stop_signals

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 2000  # raw samples per worker; at ~100 KB per JPEG about 200 MB of memory
SHUFFLE_INITIAL = 100  # samples read before the buffer yields its first
DEFAULT_IMAGE_KEY = "jpg;png;jpeg;webp"  # open_clip main's --image-key
NEEDS_RESAMPLED = (
    "--train-data-upsampling-factors weighs shard draws with replacement: it needs "
    "--dataset-resampled (as in open_clip_train)"
)
# A resampled worker gives up after this many empty shards in a row rather than spin forever.
MAX_EMPTY_DRAWS = 1000


# ---------------------------------------------------------------------------------------------
# Shard lists and sizes


def expand_sources(urls: str) -> list[list[str]]:
    """The shards of each source: 'DIR/{00000..00031}.tar', a folder (its *.tar, sorted), or several of
    those joined by '::', one source each."""
    sources = []
    for part in urls.split("::"):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise DataError(f"{part}: folder holds no .tar shards")
            sources.append(found)
        else:
            sources.append(list(wds.shardlists.expand_urls(part)))
    shards = [shard for source in sources for shard in source]
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not os.path.isfile(s)]
    if missing:
        raise DataError(f"{missing[0]}: shard not found ({len(missing)} of {len(shards)} missing) in {urls!r}")
    return sources


def expand_shard_urls(urls: str) -> list[str]:
    """All shards of `urls` (see `expand_sources`), in order."""
    return [shard for source in expand_sources(urls) for shard in source]


def source_factors(urls: str, factors: str) -> list[float]:
    """--train-data-upsampling-factors 'F1::F2::...' as numbers, one per '::'-joined source of `urls`."""
    num_sources = len(urls.split("::"))
    parts = factors.split("::")
    if len(parts) != num_sources:
        raise UsageError(
            f"--train-data-upsampling-factors {factors!r} gives {len(parts)} factors for "
            f"{num_sources} sources in --train-data (one per '::'-joined source)"
        )
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"--train-data-upsampling-factors {factors!r}: {part!r} is not a number >= 0")
        values.append(value)
    if not any(values):
        raise UsageError(f"--train-data-upsampling-factors {factors!r}: all factors are 0, no shard could be drawn")
    return values


def shard_weights(urls: str, factors: str | None) -> list[float] | None:
    """The draw weight of each shard of `expand_shard_urls(urls)`: its source's factor; None without factors."""
    if factors is None:
        return None
    return [factor for source, factor in zip(expand_sources(urls), source_factors(urls, factors)) for _ in source]


def read_shard_sizes(shards: list[str], *, count_local: bool = True) -> list[int] | None:
    """Sample count of each shard: sizes.json beside it (open_clip's format), img2dataset's _stats.json, the
    count cache, or for a local shard its tar headers (data/shard_counts.py); None when a remote shard has
    none of those (or a local one, with `count_local=False`)."""
    return shard_counts(shards, count_local=count_local)


def _rng(*parts) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`, the same in every process and run.
    return random.Random("acc_clip.wds:" + ":".join(map(str, parts)))


def draw_shards(shards: list[str], weights: list[float] | None, rng: random.Random) -> Iterator[str]:
    """Shards drawn with replacement for ever, uniformly or with these weights. Shards of weight 0 are
    left out of the population, so they are never drawn (not even by a rounding of the cumulative sums)."""
    if weights is None:
        while True:
            yield rng.choice(shards)  # the draws of runs before weights existed: their resumes still match
    population = [shard for shard, weight in zip(shards, weights) if weight > 0]
    cumulative = list(accumulate(weight for weight in weights if weight > 0))
    while True:
        yield rng.choices(population, cum_weights=cumulative)[0]


def batches_of_worker(worker: int, num_batches: int, num_workers: int) -> int:
    """How many of the first `num_batches` batches of a rank worker `worker` makes (round-robin)."""
    return len(range(worker, num_batches, num_workers))


def train_workers(workers: int, num_batches: int) -> int:
    """Loader workers to start for an epoch of `num_batches` batches per rank: no more than it has batches,
    as each worker makes whole batches and one beyond that would have none."""
    return min(workers, num_batches)


def epoch_sequence(shards: list[str], sizes: list[int], seed: int, epoch: int, length: int) -> list[tuple[str, int]]:
    """The samples of an epoch end to end, as (shard, sizes.json count) runs covering at least `length` positions:
    the shards in the order shuffled from (seed, epoch); where they hold fewer, further passes, each in an order
    of its own. Every rank computes the same sequence."""
    if not sum(sizes):  # would never reach `length`
        raise DataError(f"{shards[0]}: sizes.json gives these {len(shards)} shards no samples")
    sequence: list[tuple[str, int]] = []
    number, total = 0, sum(sizes)
    while number * total < length:
        runs = list(zip(shards, sizes))
        # Pass 0 is seeded as the shard order was before passes existed; later passes get their own seeds.
        _rng("shards", seed, epoch, *([number] if number else [])).shuffle(runs)
        sequence += runs
        number += 1
    return sequence


def worker_span(rank: int, worker: int, *, num_batches: int, num_workers: int, batch_size: int) -> range:
    """The positions of the epoch's sequence that worker `worker` of rank `rank` reads: the spans lie end to
    end, rank by rank and, within a rank, worker by worker, each its worker's batches x batch_size long."""
    before = rank * num_batches + sum(batches_of_worker(w, num_batches, num_workers) for w in range(worker))
    return range(before * batch_size, (before + batches_of_worker(worker, num_batches, num_workers)) * batch_size)


def span_parts(sequence: list[tuple[str, int]], span: range) -> list[tuple[str, int, int, int]]:
    """(shard, its count, first, stop) for each shard of `sequence` that `span` reaches, in order: the span
    holds that shard's samples first .. stop-1 (in file order)."""
    parts, offset = [], 0
    for shard, size in sequence:
        if offset >= span.stop:
            break
        first, stop = max(span.start - offset, 0), min(span.stop - offset, size)
        if first < stop:
            parts.append((shard, size, first, stop))
        offset += size
    return parts


def position_parts(sequence: list[tuple[str, int]], positions: np.ndarray) -> list[tuple[str, int, int, int, Any]]:
    """`span_parts` for a worker whose positions (sorted) have holes, the samples earlier segments of the epoch
    trained: (shard, its count, first, stop, the offsets wanted in first .. stop-1, or None for all of them)."""
    parts, offset = [], 0
    for shard, size in sequence:
        low, high = np.searchsorted(positions, [offset, offset + size])
        if low < high:
            offsets = positions[low:high] - offset
            first, stop = int(offsets[0]), int(offsets[-1]) + 1
            keep = None if stop - first == high - low else frozenset(offsets.tolist())
            parts.append((shard, size, first, stop, keep))
        offset += size
        if high == len(positions):
            break
    return parts


def buffer_rng(seed: int, epoch: int, rank: int, worker: int, segment: int) -> random.Random:
    """The shuffle buffer's generator of a worker role in a segment of the epoch (segment 0: the one seeded as
    before segments existed, so an epoch on one layout is shuffled as it always was)."""
    return _rng("buffer", seed, epoch, rank, worker, *(["segment", segment] if segment else []))


def consumed_indices(available: int, segment: Segment, number: int, *, seed: int, epoch: int, buffer: int) -> list[int]:
    """Which of the `available` positions left for segment `number` of the epoch it trained, as indices into them:
    each worker role's span (laid out as for a whole epoch of that many positions) went through its shuffle
    buffer, and the first batches_of_worker x B of what came out were trained. The buffer's draws depend only on
    how many items pass, so replaying it over the indices (no data read) gives exactly those."""
    batch_size, world_size = segment.layout["batch_size"], segment.layout["world_size"]
    num_batches = available // global_micro_batch(segment.layout)
    if segment.batches > num_batches:
        raise UsageError(
            f"epoch {epoch}: a checkpoint's segment trained {segment.batches} micro-batches of {segment.layout}, "
            f"but only {num_batches} were left to it: not this data's position"
        )
    num_workers = max(1, train_workers(segment.layout["workers"], num_batches))
    consumed: list[int] = []
    for rank in range(world_size):
        for worker in range(num_workers):
            span = worker_span(rank, worker, num_batches=num_batches, num_workers=num_workers, batch_size=batch_size)
            trained = batches_of_worker(worker, segment.batches, num_workers) * batch_size
            shuffled = buffer_shuffle(span, buffer, buffer_rng(seed, epoch, rank, worker, number))
            consumed += islice(shuffled, trained)
    return consumed


def remaining_positions(
    num_samples: int, done: Sequence[Segment], *, seed: int, epoch: int, buffer: int = SHUFFLE_BUFFER
) -> np.ndarray:
    """The positions 0 .. num_samples-1 of the epoch's sequence that the segments `done` did not train, in order:
    each segment laid out what the ones before it left as a whole epoch of its layout."""
    positions = np.arange(num_samples, dtype=np.int64)
    for number, segment in enumerate(done):
        consumed = consumed_indices(len(positions), segment, number, seed=seed, epoch=epoch, buffer=buffer)
        positions = np.delete(positions, consumed)
    return positions


# ---------------------------------------------------------------------------------------------
# One worker's sample stream


def buffer_shuffle(samples: Iterable, size: int, rng: random.Random, initial: int = SHUFFLE_INITIAL) -> Iterator:
    """Shuffle a stream through a buffer of up to `size` items. Yielding starts once `initial` items
    are in, and the buffer then grows by one for every item yielded until it is full: the first batch
    does not wait for `size` samples to be read (200 MB at the default). The rest is shuffled at the end."""
    buffer: list = []
    for read, sample in enumerate(samples, 1):
        buffer.append(sample)
        if len(buffer) < min(initial, size) or (len(buffer) < size and read % 2):
            continue
        slot = rng.randrange(len(buffer))
        buffer[slot], buffer[-1] = buffer[-1], buffer[slot]
        yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


MISSING_SAMPLE = "__missing_from__"  # a gap standing for a sample a shard's sizes.json count promised


def read_raw_samples(shards: Iterable[str]) -> Generator[dict, None, None]:
    """Raw samples ({"__key__", "jpg": bytes, ...}) of the shards, in order; damaged tars warn and are cut short."""
    return tarfile_samples(({"url": url} for url in shards), handler=wds.warn_and_continue)


def sample_index(key: str) -> int:
    """The sample number a key stands for; keys that are not numbers get a stable 63-bit hash."""
    if key.isdigit():
        return int(key)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


class ShardEpoch(IterableDataset):
    """The batches of one rank for one epoch; see the module docstring for the order. Training reads the
    spans of `sequence` (`epoch_sequence`), or draws from `all_shards` when resampled; eval reads `eval_shards`."""

    def __init__(
        self,
        *,
        all_shards: list[str],
        preprocess: Callable,
        tokenizer: Callable,
        batch_size: int,
        num_workers: int,
        num_batches: int | None,
        seed: int,
        epoch: int,
        rank: int,
        is_train: bool,
        resampled: bool,
        start_batch: int,
        shuffle_buffer: int,
        weights: list[float] | None = None,
        num_samples: int | None = None,
        sequence: list[tuple[str, int]] | None = None,
        eval_shards: list[str] | None = None,
        positions: np.ndarray | None = None,
        segment: int = 0,
        worker_shards: list[list[str]] | None = None,
        members: SampleMembers | None = None,
    ):
        self.members = members or SampleMembers()
        self.all_shards, self.weights, self.sequence, self.eval_shards = all_shards, weights, sequence, eval_shards
        self.worker_shards = worker_shards  # training without counts: each worker role's shards (uncounted_shards)
        # Of the epoch (training), or of the whole set as given or in sizes.json (eval: the loader reads
        # every sample there is whatever this says; the evaluator compares it with what was read).
        self.num_samples = num_samples
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.batch_size, self.num_workers, self.num_batches = batch_size, num_workers, num_batches
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.is_train, self.resampled = is_train, resampled
        self.start_batch, self.shuffle_buffer = start_batch, shuffle_buffer
        # A segment after others in the epoch: the sequence positions they left (None: all of them, 0, 1, ...).
        self.positions, self.segment = positions, segment

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("length unknown: no sizes.json for these shards")
        return self.num_batches - self.start_batch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        raw: Iterator[dict]
        if not self.is_train:
            raw = read_raw_samples(cast(list[str], self.eval_shards)[loader_worker :: self.num_workers])
        else:
            # Rotated roles: the loader starts with its worker 0, which must make batch start_batch.
            worker = (loader_worker + self.start_batch) % self.num_workers
            first = batches_of_worker(worker, self.start_batch, self.num_workers) * self.batch_size
            end = batches_of_worker(worker, cast(int, self.num_batches), self.num_workers) * self.batch_size
            raw = islice(self.train_raw(worker), first, end)
        while True:
            chunk = list(islice(raw, self.batch_size))
            if not chunk:
                return
            yield collate_skipping_bad([self._decode(sample) for sample in chunk], collate_images(self.preprocess))

    def train_raw(self, worker: int) -> Iterator[dict]:
        """Worker role `worker`'s raw samples of the epoch, shuffled, before any are skipped for a resume."""
        place = (self.seed, self.epoch, self.rank, worker)
        if self.resampled:
            shards = draw_shards(self.all_shards, self.weights, _rng("resample", *place))
            return buffer_shuffle(self._non_empty(shards), self.shuffle_buffer, _rng("buffer", *place))
        if self.worker_shards is not None:  # no counts: open_clip_train's reading (warn_uncounted)
            return buffer_shuffle(self._passes(self.worker_shards[worker]), self.shuffle_buffer, _rng("buffer", *place))
        # Training without resampling always has its batch count, and its sequence when counted (_train_epoch).
        span = worker_span(
            self.rank,
            worker,
            num_batches=cast(int, self.num_batches),
            num_workers=self.num_workers,
            batch_size=self.batch_size,
        )
        sequence = cast(list[tuple[str, int]], self.sequence)
        if self.positions is None:
            parts = [(*part, None) for part in span_parts(sequence, span)]
        else:
            parts = position_parts(sequence, self.positions[span.start : span.stop])
        samples = (sample for part in parts for sample in self._read_part(*part))
        return buffer_shuffle(samples, self.shuffle_buffer, buffer_rng(*place, self.segment))

    def _read_part(self, shard: str, size: int, first: int, stop: int, keep: frozenset | None) -> Iterator[dict]:
        """Samples first .. stop-1 of `shard` (only those in `keep`, unless None), whose sizes.json count is
        `size`: those before `first` or not kept are read but not decoded. Positions the tar does not hold (cut
        short, damaged) become gaps, counted as bad samples: filling them with other samples would shift every
        later position, into other workers' spans."""
        samples = read_raw_samples([shard])
        found = 0
        for sample in samples:
            if found == size:  # only the part that ends the shard reads this far
                log.warning("%s: holds more samples than the %d sizes.json says; the rest are left out", shard, size)
                break
            if found >= first and (keep is None or found in keep):
                yield sample
            found += 1
            if found == stop < size:
                break  # the rest of the shard is another worker's
        samples.close()
        if found < stop:
            log.warning(
                "%s: holds %d samples, sizes.json says %d: a cut or damaged shard; the %d missing count as bad samples",
                shard,
                found,
                size,
                size - found,
            )
            gaps = range(max(first, found), stop)
            yield from ({MISSING_SAMPLE: shard} for offset in gaps if keep is None or offset in keep)

    def _passes(self, shards: list[str]) -> Iterator[dict]:
        """The samples of `shards` over and over (open_clip_train's with_epoch), until the caller stops."""
        while True:
            found = 0
            for sample in read_raw_samples(shards):
                found += 1
                yield sample
            if not found:
                raise DataError(f"{shards[0]}: these {len(shards)} shards hold no readable samples")

    def _non_empty(self, shards: Iterator[str]) -> Iterator[dict]:
        empty_in_a_row = 0
        for shard in shards:
            found = 0
            for sample in read_raw_samples([shard]):
                found += 1
                yield sample
            empty_in_a_row = 0 if found else empty_in_a_row + 1
            if empty_in_a_row == MAX_EMPTY_DRAWS:
                raise DataError(f"{MAX_EMPTY_DRAWS} shards drawn in a row hold no readable samples, e.g. {shard}")

    def _caption(self, raw: dict, index: int) -> str | None:
        """The sample's caption ('' when empty), or None when it has no member to take one from."""
        members = self.members
        rng = caption_rng(self.seed, self.epoch, index) if self.is_train else None
        if members.json_text_keys:  # the caption is in the .json; --text-key does not apply (as in open_clip main)
            if "json" not in raw:
                return None
            try:
                document = json.loads(raw["json"])
            except ValueError:  # not UTF-8 or not JSON: no key can give a caption
                document = None
            return caption_from_json(document, members.json_text_keys, members.json_text_key_probs, rng)
        if rng is not None and "json" in raw:  # shards made with --group-by-image: one of "captions" per epoch
            try:
                captions = json.loads(raw["json"]).get("captions")
            except (ValueError, AttributeError):
                captions = None
            if isinstance(captions, list) and len(captions) > 1:
                return str(rng.choice(captions))
        text = next((raw[key] for key in members.text_keys if key in raw), None)
        return None if text is None else text.decode("utf-8", errors="replace")

    def _decode(self, raw: dict) -> Sample | None:
        if MISSING_SAMPLE in raw:  # said once per shard in _read_accounted
            return None
        index = sample_index(raw["__key__"])
        where = f"{raw.get('__url__')} sample {raw['__key__']}"
        image_bytes = next((raw[key] for key in self.members.image_keys if key in raw), None)
        caption = self._caption(raw, index)
        if image_bytes is None or not caption or not caption.strip():
            log.warning("%s: %s, sample skipped", where, self._missing(image_bytes is None, caption))
            return None
        try:
            pixels = load_pixels(
                image_bytes,
                self.preprocess,
                sample_seed(self.seed, self.epoch, index) if self.is_train else None,
                self.members.max_image_pixels,
            )
        except ImageTooLarge as error:
            log.warning("%s: image skipped: %s", where, error)
            return None
        except ImageDecodeError as error:
            log.warning("%s: image does not decode (%s), sample skipped", where, error)
            return None
        return Sample(pixels, self.tokenizer([caption])[0], index)

    def _missing(self, no_image: bool, caption: str | None) -> str:
        """What a skipped sample lacks, naming the members or keys looked for."""
        members = self.members
        if no_image:
            return f"no image member ({'/'.join('.' + key for key in members.image_keys)})"
        if members.json_text_keys:
            keys = ";".join(members.json_text_keys)
            return "no .json member" if caption is None else f"no caption under the .json keys {keys}"
        looked = "/".join("." + key for key in members.text_keys)
        return f"no caption member ({looked})" if caption is None else "empty caption"


def _as_is(batch: Any) -> Any:
    return batch  # batches are collated inside the workers


# ---------------------------------------------------------------------------------------------
# The loader


def build_wds_loader(
    urls: str,
    *,
    preprocess: Callable,
    tokenizer: Callable,
    batch_size: int,
    workers: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    is_train: bool = True,
    num_samples: int | None = None,
    resampled: bool = False,
    upsampling_factors: str | None = None,
    start_batch: int = 0,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    pin_memory: bool | None = None,
    done: Sequence[Segment] = (),
    members: SampleMembers | None = None,
) -> tuple[DataLoader, int]:
    """A DataLoader of this rank's `Batch`es for one epoch, and the number of batches per epoch of
    this rank (the whole epoch, including the `start_batch` skipped ones). Call once per epoch. `done`: the
    segments of the epoch trained on other layouts before this one (the batches counted after them).
    `preprocess` takes a PIL image, or is a `pixels.SplitTransform` (takes the encoded bytes).

    `members`: which tar members hold the image and the caption, and the pixel limit (`SampleMembers`).

    `upsampling_factors`: 'F1::F2::...', the draw weight of each '::'-joined source of `urls`; resampled
    training only (--train-data-upsampling-factors).

    Epoch length: `num_samples`, else the sum of the shards' counts (of every source, whatever its factor,
    as open_clip_train counts; `read_shard_sizes` says where counts come from). Training without
    `resampled` splits the samples by those counts; a set without them (remote, never indexed) is read as
    open_clip_train reads it (`uncounted_shards`), with a warning. Eval reads every sample of the shards,
    whatever `num_samples` says (--val-num-samples: the count the evaluator expects, needed without
    counts); without counts the returned batch count is an estimate from it, and the loader has no len()
    (how the set splits among processes depends on the sizes of the shards)."""
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"bad worker layout: workers={workers}, rank={rank}, world_size={world_size}")
    if upsampling_factors is not None and not (is_train and resampled):
        raise UsageError(NEEDS_RESAMPLED)
    shards = expand_shard_urls(urls)
    weights = shard_weights(urls, upsampling_factors)
    # Eval reads every sample whatever the counts say: it counts no tars for an estimate of its batches.
    sizes = read_shard_sizes(shards, count_local=is_train)
    if num_samples is None:
        if sizes is None:
            raise DataError(
                f"{urls}: no sample count for every shard (sizes.json, img2dataset _stats.json, the count cache); "
                f"give the number of samples "
                f"({'--train-num-samples' if is_train else '--val-num-samples'}), or count them first: "
                f"acc-clip shards index '{urls}'"
            )
        num_samples = sum(sizes)
    common = dict(
        all_shards=shards,
        preprocess=preprocess,
        tokenizer=tokenizer,
        batch_size=batch_size,
        seed=seed,
        epoch=epoch,
        rank=rank,
        is_train=is_train,
        resampled=resampled and is_train,
        shuffle_buffer=shuffle_buffer,
        weights=weights,
        num_samples=num_samples,
        members=members,
    )
    if is_train:
        dataset = _train_epoch(
            shards, sizes, world_size=world_size, workers=workers, start_batch=start_batch, done=done, **common
        )
        num_batches = cast(int, dataset.num_batches)  # a training epoch always knows it
        workers = train_workers(workers, num_batches)
    else:
        if start_batch:
            raise UsageError("start_batch is for training; an eval pass always starts at its beginning")
        dataset, num_batches = _eval_pass(shards, sizes, world_size=world_size, workers=workers, **common)
        workers = min(workers, dataset.num_workers)  # a worker without shards would add nothing
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=ignore_stop_signals,
    )  # the main process saves on SIGTERM first
    return loader, num_batches


def _train_epoch(
    shards: list[str],
    sizes: list[int] | None,
    *,
    world_size: int,
    workers: int,
    start_batch: int,
    done: Sequence[Segment],
    **common,
) -> ShardEpoch:
    """The dataset of one training epoch: its batch count, and the epoch's sequence unless resampled; after
    segments `done` on other layouts, the positions they left, laid out as a whole epoch of this layout."""
    num_samples, batch_size, epoch = common["num_samples"], common["batch_size"], common["epoch"]
    positions = None
    if done:  # _train_data's resampled epochs never pass segments: their draws cannot be replayed
        positions = remaining_positions(
            num_samples, done, seed=common["seed"], epoch=epoch, buffer=common["shuffle_buffer"]
        )
    available = num_samples if positions is None else len(positions)
    num_batches = available // (batch_size * world_size)
    if num_batches == 0 and not done:
        raise too_few_samples(num_samples, batch_size, world_size)
    if not 0 <= start_batch <= num_batches:
        raise UsageError(
            f"cannot start epoch {epoch} at batch {start_batch}: it has {num_batches} batches per "
            f"process (a resume after the batch size, processes or epoch length changed?)"
        )
    sequence = None
    num_workers = max(1, train_workers(workers, num_batches))
    if not common["resampled"] and sizes is not None:
        # every position of the epoch (not only the first num_batches x B x R) can be reached after segments on
        # other layouts
        sequence = epoch_sequence(shards, sizes, common["seed"], epoch, num_samples)
    elif not common["resampled"]:  # uncounted: never elastic, so no segments reach here
        warn_uncounted(shards, num_batches=num_batches, world_size=world_size, num_workers=num_workers)
        common["worker_shards"] = uncounted_shards(
            shards, common["seed"], epoch, common["rank"], world_size=world_size, num_workers=num_workers
        )
    # The order is laid out for the workers started (workers=0: one role, read in the calling process).
    return ShardEpoch(
        num_workers=num_workers,
        num_batches=num_batches,
        start_batch=start_batch,
        sequence=sequence,
        positions=positions,
        segment=len(done),
        **common,
    )


_WARNED_UNCOUNTED: set[str] = set()


def warn_uncounted(shards: list[str], *, num_batches: int, world_size: int, num_workers: int) -> None:
    """Refuse a layout open_clip_train's split cannot serve, and say once per process what this mode gives."""
    if len(shards) < world_size * num_workers:
        raise DataError(
            f"{shards[0]}: {len(shards)} shards without sample counts cannot be split among {world_size} "
            f"processes x {num_workers} loader workers: count them (acc-clip shards index SHARDS), use fewer "
            f"--workers, or --dataset-resampled"
        )
    if shards[0] not in _WARNED_UNCOUNTED:
        _WARNED_UNCOUNTED.add(shards[0])
        log.warning(
            "%s ...: no sample counts for these %d shards (no sizes.json, no img2dataset _stats.json, never "
            "indexed): reading them as open_clip_train does, each process and loader worker its own shards, "
            "reshuffled every epoch, over and over until its batches are made (%d per process): samples may "
            "repeat or go unseen within an epoch, and a resume is exact only with the same processes, batch "
            "size and --workers. Exactly once per epoch needs counts: acc-clip shards index SHARDS (writes "
            "sizes.json, or --out FILE and the count cache for remote shards)",
            shards[0],
            len(shards),
            num_batches,
        )


def uncounted_shards(shards: list[str], seed: int, epoch: int, rank: int, *, world_size: int, num_workers: int):
    """The shards each worker of rank `rank` reads in an epoch without counts, as open_clip_train deals them:
    the list shuffled from (seed, epoch), every world_size-th for the rank, every num_workers-th of those
    for the worker."""
    order = list(shards)
    _rng("shards", seed, epoch).shuffle(order)
    return [order[rank::world_size][worker::num_workers] for worker in range(num_workers)]


def _eval_pass(
    shards: list[str], sizes: list[int] | None, *, world_size: int, workers: int, **common
) -> tuple[ShardEpoch, int]:
    """The dataset of one eval pass and its batch count (an estimate without sizes.json)."""
    rank, batch_size = common["rank"], common["batch_size"]
    if len(shards) < world_size:
        raise DataError(
            f"{len(shards)} eval shards cannot be split among {world_size} ranks: make more, smaller shards"
        )
    rank_shards = shards[rank::world_size]
    num_workers = min(max(1, workers), len(rank_shards))
    if sizes is not None:
        rank_sizes = sizes[rank::world_size]
        num_batches = sum(math.ceil(sum(rank_sizes[w::num_workers]) / batch_size) for w in range(num_workers))
    else:
        num_batches = math.ceil(common["num_samples"] / (batch_size * world_size))
    dataset = ShardEpoch(
        eval_shards=rank_shards,
        num_workers=num_workers,
        num_batches=num_batches if sizes is not None else None,
        start_batch=0,
        **common,
    )
    return dataset, num_batches


# ---------------------------------------------------------------------------------------------
# The source


KEY_LIST = Domain("';'-separated names, at least one", lambda v: bool(split_keys(v)), ("", ";"))


@dataclass
class ShardOptions(Section):
    """The webdataset source's own flags: open_clip_train 3.3's, and open_clip main's member keys."""

    title: ClassVar[str] = "webdataset"
    dataset_resampled: bool = option(False, "sample shards with replacement", train_only=True)
    train_data_upsampling_factors: str | None = option(
        None,
        "with --dataset-resampled: 'F1::F2::...', one draw weight per '::'-joined source of --train-data",
        train_only=True,
    )
    image_key: str = option(
        DEFAULT_IMAGE_KEY,
        "tar member suffixes holding the image, ';'-separated, the first present taken",
        domain=KEY_LIST,
    )
    text_key: str = option(
        "txt",
        "tar member suffixes holding the caption, ';'-separated, the first present taken (not with --json-text-key)",
        domain=KEY_LIST,
    )
    json_text_key: str | None = option(
        None,
        "read the caption from these keys of the sample's .json, ';'-separated in priority order: the first "
        "non-empty string wins (of a list, one entry drawn per epoch; validation: the first)",
        domain=KEY_LIST,
    )
    json_text_key_probs: list[float] | None = option(
        None,
        "weights of the --json-text-key keys, in order: each training sample draws its key priority order by "
        "them, the first non-empty wins; keys left without a weight (or weight 0) are fallbacks only",
        domain=NON_NEGATIVE,
    )

    def check(self) -> None:
        probs = self.json_text_key_probs
        if probs is None:
            return
        if self.json_text_key is None:
            raise UsageError("--json-text-key-probs weighs the keys of --json-text-key, which is not given")
        keys = split_keys(self.json_text_key)
        if len(probs) > len(keys):
            raise UsageError(
                f"--json-text-key-probs gives {len(probs)} weights for the {len(keys)} keys of --json-text-key "
                f"{self.json_text_key!r} (one per key, in order)"
            )
        if not sum(probs) > 0:
            raise UsageError("--json-text-key-probs: every weight is 0; give at least one key a positive weight")


@dataclass(frozen=True)
class SampleMembers:
    """Where a shard sample's image and caption are (member suffixes, .json keys) and the pixel limit; the
    defaults are open_clip main's."""

    image_keys: tuple[str, ...] = split_keys(DEFAULT_IMAGE_KEY)
    text_keys: tuple[str, ...] = ("txt",)
    json_text_keys: tuple[str, ...] = ()  # empty: the caption is a text member (or a group-by-image draw)
    json_text_key_probs: tuple[float, ...] | None = None
    max_image_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def of(cls, config: Config) -> SampleMembers:
        shards, data = config[ShardOptions], config[DataOptions]
        probs = shards.json_text_key_probs
        return cls(
            image_keys=split_keys(shards.image_key),
            text_keys=split_keys(shards.text_key),
            json_text_keys=split_keys(shards.json_text_key) if shards.json_text_key else (),
            json_text_key_probs=tuple(probs) if probs is not None else None,
            max_image_pixels=data.max_image_pixels,
        )


class WebdatasetSource(Source):
    """Webdataset shards: a brace pattern, a folder of .tar files, or several joined by '::'."""

    name = "webdataset"
    options = ShardOptions
    refuse_elsewhere = True  # resampling and weighing shard sources mean nothing for other data

    def detect(self, path: str) -> bool:
        return all(".tar" in part or os.path.isdir(part) for part in path.split("::"))  # '::' joins sources

    def check(self, config: Config) -> list[str]:
        shards, data = config[ShardOptions], config[DataOptions]
        if shards.train_data_upsampling_factors is not None:
            if not shards.dataset_resampled:
                raise UsageError(NEEDS_RESAMPLED)
            source_factors(str(data.train_data), shards.train_data_upsampling_factors)
        return []

    def train_data(
        self,
        config: Config,
        preprocess: Callable,
        tokenizer: Callable,
        *,
        seed: int,
        rank: int,
        world_size: int,
        pin_memory: bool,
    ) -> TrainData:
        data, shards = config[DataOptions], config[ShardOptions]
        members = SampleMembers.of(config)

        # Resampled shards are drawn with replacement, and uncounted ones split by shard, per process and worker:
        # not elastic (their layout is part of the order, and a resume on another one is refused there).
        sizes = None if shards.dataset_resampled else read_shard_sizes(expand_shard_urls(str(data.train_data)))
        counted = shards.dataset_resampled or sizes is not None
        elastic = not shards.dataset_resampled and counted
        layout = {"batch_size": data.batch_size, "world_size": world_size, "workers": data.workers}

        def loader(epoch: int, done: Sequence[Segment] = ()) -> tuple[DataLoader, int]:
            before, start_batch = split_position(done, layout)
            if not elastic:  # today's batch count (--resume-changed-data on another layout: the warned-of mix)
                before, start_batch = [], sum(segment.batches for segment in done)
            return build_wds_loader(
                str(data.train_data),
                preprocess=preprocess,
                tokenizer=tokenizer,
                batch_size=data.batch_size,
                workers=data.workers,
                seed=seed,
                epoch=epoch,
                rank=rank,
                world_size=world_size,
                is_train=True,
                num_samples=data.train_num_samples,
                resampled=shards.dataset_resampled,
                upsampling_factors=shards.train_data_upsampling_factors,
                start_batch=start_batch,
                pin_memory=pin_memory,
                done=before,
                members=members,
            )

        def batches(epoch: int, done: Sequence[Segment]) -> DataLoader:
            return loader(epoch, done)[0]  # its len() is the ShardEpoch's: the batches from the position on

        first, batches_per_epoch = loader(0)
        if train_workers(data.workers, batches_per_epoch) < data.workers:
            log.info(
                "%d batches per process per epoch: starting %d loader workers, not --workers %d (each makes "
                "whole batches)",
                batches_per_epoch,
                batches_per_epoch,
                data.workers,
            )
        num_samples = data.train_num_samples or batches_per_epoch * data.batch_size * world_size
        shards_list = expand_shard_urls(str(data.train_data))
        identity: dict[str, Any] = {
            "path": str(data.train_data),
            "shards": len(shards_list),
            "names_sha256": hashlib.sha256("\n".join(shards_list).encode()).hexdigest(),
        }
        if sizes is not None:  # the sequence follows each shard's count, which sizes.json, a cache or a recount gives
            identity["counts_sha256"] = hashlib.sha256(json.dumps(sizes).encode()).hexdigest()
        order = {
            "source": self.name,
            # the epoch's length: its sequence's positions (the layout drops fewer than one global batch of them)
            "samples": cast(ShardEpoch, first.dataset).num_samples,
            "resampled": shards.dataset_resampled,
            "upsampling_factors": shards.train_data_upsampling_factors,
            "data": identity,
        }
        if not counted:
            # Counted later (shards index), the same set takes the counted order: a resume then must not go on.
            order["counts"] = "none: open_clip_train's reading"
        if not elastic:  # each (process, worker) draws its own shards: the layout is part of the order
            order |= {
                "samples": num_samples,
                "batch_size": data.batch_size,
                "world_size": world_size,
                "workers": max(1, train_workers(data.workers, batches_per_epoch)),
            }
        return TrainData(num_samples, batches_per_epoch, batches, order, layout, elastic)

    def eval_loader(
        self,
        config: Config,
        path: str,
        preprocess: Callable,
        tokenizer: Callable,
        *,
        rank: int,
        world_size: int,
        expected_samples: int | None,
    ) -> Any:
        data = config[DataOptions]
        loader, _ = build_wds_loader(
            path,
            preprocess=preprocess,
            tokenizer=tokenizer,
            batch_size=data.batch_size,
            workers=data.workers,
            seed=0,
            epoch=0,
            rank=rank,
            world_size=world_size,
            is_train=False,
            num_samples=expected_samples,
            members=SampleMembers.of(config),
        )
        return loader


WEBDATASET = WebdatasetSource()

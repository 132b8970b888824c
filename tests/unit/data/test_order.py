"""The position in an epoch kept in samples (acc_clip.data.order, and wds's replay of its shuffle buffers): an
epoch trained in segments on random layouts (processes, per-process batch, workers) trains every sample at most
once, and its last layout trains all that remains but fewer than one global micro-batch; with one layout the
segments resume as the batch count always did. Shards are read by the real loader, so the replay of what a
segment consumed is checked against what its workers actually yielded."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from acc_clip.data.order import EpochBatchSampler, consumed_samples, split_position
from acc_clip.data.source import Segment
from acc_clip.data.wds import build_wds_loader, remaining_positions
from acc_clip.errors import AccClipError

SHARD_SAMPLES = (10, 7, 13, 10, 9, 11, 10, 12, 8, 10)  # uneven on purpose: 100 samples
PLAIN = transforms.Compose([transforms.Resize(8), transforms.ToTensor()])


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.zeros(1, 4, dtype=torch.long)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Tars whose sample keys are their numbers 0 .. 99, with a sizes.json."""
    root = tmp_path_factory.mktemp("order")
    image = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(image, format="JPEG")
    number, sizes = 0, {}
    for shard, count in enumerate(SHARD_SAMPLES):
        name = f"{shard:05d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for _ in range(count):
                for extension, data in (("jpg", image.getvalue()), ("txt", f"sample {number}".encode())):
                    info = tarfile.TarInfo(f"{number:06d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                number += 1
        sizes[name] = count
    (root / "sizes.json").write_text(json.dumps(sizes))
    return str(root)


def random_layout(rng: random.Random) -> dict:
    return {"batch_size": rng.randint(1, 5), "world_size": rng.randint(1, 4), "workers": rng.randint(0, 3)}


# ---------------------------------------------------------------------------------------------
# Tabular sources: consecutive stretches of the permutation


def csv_rest(num_samples: int, epoch: int, done: list[Segment], layout: dict) -> list[list[int]]:
    """Each rank's indices in the rest of the epoch after `done`, on `layout`, as the CSV source reads them."""
    before, start_batch = split_position(done, layout)
    ranks = []
    for rank in range(layout["world_size"]):
        sampler = EpochBatchSampler(
            num_samples, batch_size=layout["batch_size"], seed=11, rank=rank, world_size=layout["world_size"]
        )
        sampler.set_epoch(epoch, start_batch, consumed_samples(before))
        ranks.append([[index for _, index in batch] for batch in sampler])
    assert len({len(batches) for batches in ranks}) == 1  # every rank the same number of batches
    return ranks


def test_csv_segments_on_random_layouts_train_every_sample_once():
    rng = random.Random(5)
    for trial in range(200):
        num_samples, epoch = rng.randint(40, 200), rng.randint(0, 3)
        done: list[Segment] = []
        trained: list[int] = []
        for _ in range(rng.randint(0, 4)):
            layout = random_layout(rng) if not done or rng.random() < 0.7 else done[-1].layout  # same layout again too
            rest = csv_rest(num_samples, epoch, done, layout)
            batches = rng.randint(0, len(rest[0]))
            trained += [i for rank in rest for batch in rank[:batches] for i in batch]
            before, start = split_position(done, layout)
            done = [*before, Segment(layout, start + batches)]
        last = random_layout(rng)
        trained += [i for rank in csv_rest(num_samples, epoch, done, last) for batch in rank for i in batch]
        counts = Counter(trained)
        assert max(counts.values(), default=1) == 1, f"trial {trial}: a sample twice"
        left_out = num_samples - len(counts)
        assert 0 <= left_out < last["batch_size"] * last["world_size"], f"trial {trial}: {left_out} never trained"


def test_csv_one_layout_resumes_as_the_batch_count_did():
    layout = {"batch_size": 8, "world_size": 2}
    whole = csv_rest(100, 2, [], layout)
    assert csv_rest(100, 2, [Segment(layout, 3)], layout) == [batches[3:] for batches in whole]


def test_csv_a_position_past_the_epoch_is_refused():
    sampler = EpochBatchSampler(100, batch_size=8, seed=0)
    with pytest.raises(AccClipError, match="cannot start epoch 1 at batch 5 after 64 samples"):
        sampler.set_epoch(1, 5, 64)


# ---------------------------------------------------------------------------------------------
# Shards: each worker's shuffle buffer over its span, replayed


def shard_rest(urls: str, epoch: int, done: list[Segment], layout: dict) -> list[list[list[int]]]:
    """Each rank's batches (sample numbers) in the rest of the epoch after `done`, on `layout`, read by the real
    loader as the webdataset source builds it."""
    before, start_batch = split_position(done, layout)
    ranks = []
    for rank in range(layout["world_size"]):
        loader, _ = build_wds_loader(
            urls,
            preprocess=PLAIN,
            tokenizer=tokenize,
            batch_size=layout["batch_size"],
            workers=layout["workers"],
            seed=3,
            epoch=epoch,
            rank=rank,
            world_size=layout["world_size"],
            shuffle_buffer=6,
            start_batch=start_batch,
            done=before,
            pin_memory=False,
        )
        batches = list(loader)
        assert len(batches) == len(loader) and all(batch.num_bad == 0 for batch in batches)
        ranks.append([batch.indices.tolist() for batch in batches])
    assert len({len(batches) for batches in ranks}) == 1
    return ranks


def test_shard_segments_on_random_layouts_train_every_sample_once(shards):
    rng = random.Random(8)
    total = sum(SHARD_SAMPLES)
    for trial in range(12):
        epoch = rng.randint(0, 3)
        done: list[Segment] = []
        trained: list[int] = []
        for _ in range(rng.randint(1, 3)):
            layout = random_layout(rng)
            rest = shard_rest(shards, epoch, done, layout)
            batches = rng.randint(0, len(rest[0]))
            trained += [i for rank in rest for batch in rank[:batches] for i in batch]
            done = [*done, Segment(layout, batches)]
        last = random_layout(rng)
        trained += [i for rank in shard_rest(shards, epoch, done, last) for batch in rank for i in batch]
        counts = Counter(trained)
        assert max(counts.values()) == 1, f"trial {trial}: {[i for i, n in counts.items() if n > 1]} twice"
        left_out = total - len(counts)
        assert 0 <= left_out < last["batch_size"] * last["world_size"], f"trial {trial}: {left_out} never trained"


def test_shards_on_one_layout_resume_as_the_batch_count_did(shards):
    layout = {"batch_size": 4, "world_size": 2, "workers": 2}
    whole = shard_rest(shards, 1, [], layout)
    assert shard_rest(shards, 1, [Segment(layout, 5)], layout) == [batches[5:] for batches in whole]


def test_shards_continue_a_segment_after_one_on_another_layout(shards):
    """A, then B stopped after 2 batches and resumed on B: the same batches B would have made from there."""
    first, second = {"batch_size": 3, "world_size": 2, "workers": 1}, {"batch_size": 4, "world_size": 1, "workers": 2}
    rest = shard_rest(shards, 0, [Segment(first, 4)], second)
    assert shard_rest(shards, 0, [Segment(first, 4), Segment(second, 2)], second) == [b[2:] for b in rest]


def test_remaining_positions_with_no_segment_are_the_whole_epoch_and_a_segment_too_long_is_refused():
    assert remaining_positions(50, [], seed=0, epoch=0).tolist() == list(range(50))
    with pytest.raises(AccClipError, match="trained 7 micro-batches"):
        remaining_positions(50, [Segment({"batch_size": 4, "world_size": 2, "workers": 1}, 7)], seed=0, epoch=0)

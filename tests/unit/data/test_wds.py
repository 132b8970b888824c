"""Training and eval batches from shards (acc_clip.data.wds): coverage across ranks and workers,
deterministic epochs, exact mid-epoch resume, per-sample augmentation, caption draws, bad samples."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from acc_clip.cli import main as cli_main
from acc_clip.data import wds as wds_data
from acc_clip.data.wds import ShardOptions, build_wds_loader, expand_shard_urls
from acc_clip.errors import AccClipError
from acc_clip.prep.shards.convert import convert_csv_to_shards

CONTEXT = 24


def tokenize(texts: list[str]) -> torch.Tensor:
    """A stand-in tokenizer that can be read back: the caption's bytes, zero-padded."""
    codes = list(texts[0].encode())[:CONTEXT]
    return torch.tensor([codes + [0] * (CONTEXT - len(codes))], dtype=torch.long)


def detokenize(tokens: torch.Tensor) -> str:
    return bytes(t for t in tokens.tolist() if t).decode()


# Random on purpose: equal pixels then prove equal augmentation draws.
AUGMENT = transforms.Compose([transforms.RandomResizedCrop(16, scale=(0.2, 1.0)), transforms.ToTensor()])
PLAIN = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16), transforms.ToTensor()])


def make_shards(root, *, count=40, per_shard=10, captions_per_image=1) -> str:
    os.makedirs(root / "img", exist_ok=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(count):
        path = str(root / "img" / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(path, quality=90)
        rows += [(path, f"image {i} caption {c}") for c in range(captions_per_image)]
    with open(root / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "title"), *rows])
    out = root / "shards"
    convert_csv_to_shards(
        str(root / "data.csv"),
        str(out),
        samples_per_shard=per_shard,
        workers=1,
        group_by_image=captions_per_image > 1,
        progress=False,
    )
    return str(out)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("wds"))


def load(urls, **kwargs):
    """All batches of one loader, and the batch count it announced."""
    arguments = dict(
        preprocess=AUGMENT,
        tokenizer=tokenize,
        batch_size=5,
        workers=2,
        seed=7,
        epoch=0,
        rank=0,
        world_size=1,
        shuffle_buffer=100,
    )
    arguments.update(kwargs)
    loader, num_batches = build_wds_loader(urls, **arguments)
    return list(loader), num_batches


def indices_of(batches) -> list[int]:
    return [i for batch in batches for i in batch.indices.tolist()]


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(shard_dir):
    orders = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            batches, num_batches = load(shard_dir, epoch=epoch, rank=rank, world_size=2)
            assert num_batches == 40 // (5 * 2) == len(batches)
            assert all(len(batch.indices) == 5 and batch.num_bad == 0 for batch in batches)
            orders[epoch, rank] = indices_of(batches)
        seen = orders[epoch, 0] + orders[epoch, 1]
        assert sorted(seen) == list(range(40))
    assert orders[0, 0] + orders[0, 1] != orders[1, 0] + orders[1, 1]

    again, _ = load(shard_dir, epoch=1, rank=1, world_size=2)
    assert indices_of(again) == orders[1, 1]
    other_seed, _ = load(shard_dir, epoch=1, rank=1, world_size=2, seed=8)
    assert indices_of(other_seed) != orders[1, 1]


def test_url_forms_name_the_same_shards(shard_dir):
    names = [os.path.join(shard_dir, f"{i:05d}.tar") for i in range(4)]
    assert expand_shard_urls(shard_dir) == names
    assert expand_shard_urls(os.path.join(shard_dir, "{00000..00003}.tar")) == names
    assert expand_shard_urls("::".join(names)) == names
    with pytest.raises(AccClipError, match=r"00004.tar: shard not found \(6 of 10 missing\)"):
        expand_shard_urls(os.path.join(shard_dir, "{00000..00009}.tar"))


def test_augmentation_follows_the_sample_not_the_worker(shard_dir):
    def pixels_by_index(workers):
        batches, _ = load(shard_dir, workers=workers, epoch=3, batch_size=4)
        return {i: image for batch in batches for i, image in zip(batch.indices.tolist(), batch.images)}

    single, parallel = pixels_by_index(0), pixels_by_index(2)
    assert sorted(single) == sorted(parallel) == list(range(40))
    assert all(torch.equal(single[i], parallel[i]) for i in single)
    next_epoch, _ = load(shard_dir, workers=0, epoch=4, batch_size=4)
    assert not torch.equal(next_epoch[0].images[0], single[next_epoch[0].indices[0].item()])


@pytest.mark.parametrize("resampled", [False, True])
def test_start_batch_gives_the_rest_of_the_uninterrupted_epoch(shard_dir, resampled):
    # 13 batches over 2 workers: uneven quotas (7 and 6), so the worker rotation is exercised.
    settings = dict(batch_size=3, workers=2, epoch=2, resampled=resampled)
    full, num_batches = load(shard_dir, **settings)
    assert num_batches == len(full) == 13
    for start in (4, 5, 13):
        rest, _ = load(shard_dir, start_batch=start, **settings)
        assert len(rest) == num_batches - start
        for resumed, original in zip(rest, full[start:]):
            assert torch.equal(resumed.indices, original.indices)
            assert torch.equal(resumed.images, original.images)
            assert torch.equal(resumed.texts, original.texts)


def test_skipped_batches_are_not_decoded(shard_dir, monkeypatch):
    decoded = []
    real_decode = wds_data.ShardEpoch._decode

    def counting_decode(self, raw):
        decoded.append(raw["__key__"])
        return real_decode(self, raw)

    monkeypatch.setattr(wds_data.ShardEpoch, "_decode", counting_decode)
    rest, num_batches = load(shard_dir, workers=0, batch_size=4, start_batch=6)
    assert len(rest) == num_batches - 6 == 4
    assert len(decoded) == 4 * 4


def test_more_ranks_x_workers_than_shards_still_sees_every_sample_once(shard_dir):
    # 4 shards for 3 ranks x 2 workers: was refused when shards were dealt out whole. 40 // (2 * 3) = 6 batches
    # per rank, so 36 of the epoch's 40 positions are trained on and 4 (less than a global batch) left out.
    seen = []
    for rank in range(3):
        batches, num_batches = load(shard_dir, workers=2, world_size=3, rank=rank, batch_size=2)
        assert len(batches) == num_batches == 40 // (2 * 3)
        assert all(len(batch.indices) == 2 and batch.num_bad == 0 for batch in batches)
        seen += indices_of(batches)
    assert len(seen) == len(set(seen)) == 36
    # Sampling shards with replacement needs no split either.
    batches, num_batches = load(shard_dir, workers=2, world_size=3, batch_size=2, resampled=True)
    assert len(batches) == num_batches == 40 // (2 * 3)


def test_a_resume_position_past_the_epoch_is_refused(shard_dir):
    # A checkpoint's position from a longer epoch (e.g. saved with half the processes) does not fit.
    rest, _ = load(shard_dir, batch_size=5, workers=0, start_batch=8)
    assert rest == []  # the end of the epoch is a valid position: nothing left
    with pytest.raises(AccClipError, match="cannot start epoch 0 at batch 9: it has 8 batches per process"):
        load(shard_dir, batch_size=5, workers=0, start_batch=9)


def bare_copy(shard_dir: str, folder: Path) -> Path:
    """The shards alone: no sizes.json, no _stats.json."""
    folder.mkdir()
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".tar"):
            (folder / name).write_bytes((Path(shard_dir) / name).read_bytes())
    return folder


def test_shards_without_sizes_json_are_counted_and_train_exactly_once(tmp_path, shard_dir, monkeypatch):
    """Local shards without sizes.json (webdataset's ShardWriter, img2dataset) are counted from their tar
    headers: the epoch is the one sizes.json would give, every sample once."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bare = bare_copy(shard_dir, tmp_path / "bare")
    for rank in (0, 1):
        batches, num_batches = load(str(bare), rank=rank, world_size=2)
        counted, _ = load(shard_dir, rank=rank, world_size=2)
        assert num_batches == 4 and indices_of(batches) == indices_of(counted)
    assert os.listdir(tmp_path / "cache" / "acc_clip" / "shard_counts")  # the counts were cached


def test_uncounted_shards_train_as_open_clip_train_does_with_a_warning(tmp_path, shard_dir, monkeypatch, caplog):
    """Shards nothing counts (remote, here `pipe:`) train with --train-num-samples as open_clip_train trains
    them: each process and worker reads its own shards over and over until its batches are made."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bare = bare_copy(shard_dir, tmp_path / "bare")
    urls = f"pipe:cat {bare}/{{00000..00003}}.tar"
    with pytest.raises(AccClipError, match=r"give the number of samples \(--train-num-samples\), or count them"):
        load(urls)
    seen: list[int] = []
    for rank in (0, 1):
        batches, num_batches = load(urls, num_samples=60, rank=rank, world_size=2, shuffle_buffer=1)
        assert num_batches == len(batches) == 6 and all(len(batch.indices) == 5 for batch in batches)
        seen += indices_of(batches)
        # A resume skips the batches done: the same order from there.
        rest, _ = load(urls, num_samples=60, rank=rank, world_size=2, shuffle_buffer=1, start_batch=2)
        assert indices_of(rest) == indices_of(batches[2:])
    shuffled, _ = load(urls, num_samples=60, rank=0, world_size=2)
    assert indices_of(load(urls, num_samples=60, rank=0, world_size=2, start_batch=3)[0]) == indices_of(shuffled[3:])
    # Each of the 4 workers reads its one shard of 10 samples for 15 (no shuffle buffer mixing the passes):
    # every sample, 5 of each shard twice.
    assert sorted(set(seen)) == list(range(40)) and len(seen) == 60
    assert sum("no sample counts for these 4 shards" in r.getMessage() for r in caplog.records) == 1
    assert "acc-clip shards index SHARDS" in caplog.text
    with pytest.raises(AccClipError, match="4 shards without sample counts cannot be split among 2 processes x 3"):
        load(urls, num_samples=60, rank=0, world_size=2, workers=3)


def test_eval_sees_every_sample_once_in_order_without_dropping(shard_dir):
    seen = []
    for rank in (0, 1):
        batches, num_batches = load(shard_dir, is_train=False, preprocess=PLAIN, batch_size=3, rank=rank, world_size=2)
        assert len(batches) == num_batches == 2 * 4  # each worker: one shard of 10 -> batches of 3,3,3,1
        assert sorted(len(b.indices) for b in batches) == [1, 1, 3, 3, 3, 3, 3, 3]
        seen += indices_of(batches)
    assert sorted(seen) == list(range(40))
    again = []
    for rank in (0, 1):
        again += indices_of(load(shard_dir, is_train=False, preprocess=PLAIN, batch_size=3, rank=rank, world_size=2)[0])
    assert again == seen


def test_group_by_image_draws_one_caption_per_epoch(tmp_path):
    grouped = make_shards(tmp_path, count=8, per_shard=4, captions_per_image=3)

    def captions(epoch, workers):
        batches, _ = load(grouped, epoch=epoch, workers=workers, batch_size=2, world_size=1)
        return {i: detokenize(t) for batch in batches for i, t in zip(batch.indices.tolist(), batch.texts)}

    first = captions(0, workers=0)
    assert sorted(first) == list(range(8))
    assert all(text.startswith(f"image {i} caption ") for i, text in first.items())
    assert captions(0, workers=2) == first
    drawn = [captions(epoch, workers=0) for epoch in (1, 2, 3)]
    assert any(d != first for d in drawn)
    assert len({text for d in [first, *drawn] for text in d.values()}) > 8


def write_tar(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_bad_samples_become_counted_gaps(tmp_path, caplog):
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(buffer, "JPEG")
    good = buffer.getvalue()
    write_tar(
        tmp_path / "00000.tar",
        {
            "000000000": {"jpg": good, "txt": b"fine"},
            "000000001": {"jpg": b"not a jpeg at all", "txt": b"broken image"},
            "000000002": {"jpg": good, "txt": b"  "},
            "000000003": {"txt": b"no image"},
            "000000004": {"jpg": good, "txt": b"fine too", "json": json.dumps({"row": 4}).encode()},
            "000000005": {"jpg": good[:100], "txt": b"truncated"},
        },
    )
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 6}))
    batches, num_batches = load(str(tmp_path / "00000.tar"), workers=0, batch_size=6, preprocess=PLAIN)
    assert num_batches == len(batches) == 1
    assert batches[0].num_bad == 4
    assert batches[0].indices.tolist() in ([0, 4], [4, 0])
    assert "00000.tar sample 000000001: image does not decode" in caplog.text
    assert "00000.tar sample 000000003: no image" in caplog.text


def test_pinning_follows_the_caller(shard_dir):
    """--pin-memory / --no-pin-memory reach the shard loader; left unsaid, it pins where CUDA is."""
    common = dict(preprocess=PLAIN, tokenizer=tokenize, batch_size=5, workers=0, seed=0, epoch=0, rank=0, world_size=1)
    assert build_wds_loader(shard_dir, pin_memory=False, **common)[0].pin_memory is False
    assert build_wds_loader(shard_dir, pin_memory=True, **common)[0].pin_memory is True
    assert build_wds_loader(shard_dir, **common)[0].pin_memory is torch.cuda.is_available()


def test_the_shuffle_buffer_starts_early_and_loses_nothing():
    import random

    from acc_clip.data.wds import buffer_shuffle

    read = []

    def stream():
        for item in range(5000):
            read.append(item)
            yield item

    shuffled = buffer_shuffle(stream(), 2000, random.Random(3), initial=100)
    first = next(shuffled)
    assert len(read) == 100  # the first item comes after 100 reads, not 2000
    out = [first, *shuffled]
    assert sorted(out) == list(range(5000)) and out != list(range(5000))
    assert out == list(buffer_shuffle(range(5000), 2000, random.Random(3), initial=100))  # a function of the seed
    # Once full, items are yielded one for one: the buffer stays at 2000, so an item can travel far.
    assert max(out.index(item) - item for item in range(5000)) > 1000


# --- --train-data-upsampling-factors ---------------------------------------------------------------


def sigma_bound(count: int, draws: int, p: float, sigmas: float = 5.0) -> bool:
    """Whether `count` successes in `draws` Bernoulli(p) trials are within `sigmas` standard deviations of
    the mean. The draws are seeded, so a test either always passes or always fails; 5 sigmas means a correct
    sampler fails it for fewer than 1 seed in a million, while a sampler that ignored the weights misses by
    dozens of sigmas at these sizes."""
    return abs(count - draws * p) <= sigmas * (draws * p * (1 - p)) ** 0.5


def test_upsampling_factors_weigh_each_shard_by_its_source(shard_dir):
    import random
    from collections import Counter

    names = [os.path.join(shard_dir, f"{i:05d}.tar") for i in range(4)]
    # Three sources of 1, 2 and 1 shards: the factor is per shard (open_clip's meaning), so source 2
    # weighs 2 x 1 = 2 of the total 3 + 2 + 0 = 5, and each of its shards 1/5.
    urls = "::".join([names[0], os.path.join(shard_dir, "{00001..00002}.tar"), names[3]])
    weights = wds_data.shard_weights(urls, "3::1::0")
    assert weights == [3.0, 1.0, 1.0, 0.0]
    draws = 50000
    drawn = Counter(islice_draws(wds_data.draw_shards(names, weights, random.Random(5)), draws))
    assert drawn[names[3]] == 0  # weight 0: never drawn
    for name, p in zip(names[:3], (3 / 5, 1 / 5, 1 / 5)):
        assert sigma_bound(drawn[name], draws, p), (name, drawn[name], draws * p)
    # Without factors the draw is uniform and unchanged (runs saved before factors existed resume the same).
    uniform = random.Random(5)
    assert islice_draws(wds_data.draw_shards(names, None, random.Random(5)), 20) == [
        uniform.choice(names) for _ in range(20)
    ]


def islice_draws(draws, n: int) -> list[str]:
    from itertools import islice

    return list(islice(draws, n))


SOURCE_SHARDS, SOURCE_SHARD_SIZE = 3, 2


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory) -> list[str]:
    """Three folders of 3 shards of 2 samples; source s's sample keys are 1000 * s + n, so a sample's
    index tells its source."""
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (9, 99, 199)).save(buffer, "JPEG")
    folders = []
    for source in range(3):
        folder = tmp_path_factory.mktemp(f"source{source}")
        for shard in range(SOURCE_SHARDS):
            first = 1000 * source + shard * SOURCE_SHARD_SIZE
            write_tar(
                folder / f"{shard:05d}.tar",
                {f"{first + n:09d}": {"jpg": buffer.getvalue(), "txt": b"a caption"} for n in range(SOURCE_SHARD_SIZE)},
            )
        folders.append(str(folder))
    return folders


def test_an_epoch_takes_its_samples_from_the_sources_by_their_factors(three_sources, monkeypatch):
    opened = []
    real_read = wds_data.read_raw_samples

    def recording_read(shards):
        shards = list(shards)
        opened.extend(shards)
        return real_read(shards)

    monkeypatch.setattr(wds_data, "read_raw_samples", recording_read)  # workers=0: read in this process
    num_samples = 1200
    batches, num_batches = load(
        "::".join(three_sources),
        upsampling_factors="1::3::0",
        resampled=True,
        workers=0,
        batch_size=20,
        num_samples=num_samples,
        shuffle_buffer=10,
        preprocess=PLAIN,
    )
    assert len(batches) == num_batches == num_samples // 20
    by_source = [sum(1 for i in indices_of(batches) if i // 1000 == source) for source in range(3)]
    assert sum(by_source) == num_samples
    assert not any(shard.startswith(three_sources[2]) for shard in opened)  # factor 0: never opened
    assert by_source[2] == 0
    # Samples come in whole shards of 2, so source 1's share is that of ~600 shard draws with p = 3/4; the
    # at most 10 samples left in the shuffle buffer at the end of the epoch are within the slack.
    shard_draws = num_samples // SOURCE_SHARD_SIZE
    assert sigma_bound(by_source[1] // SOURCE_SHARD_SIZE, shard_draws, 3 / 4), by_source
    assert by_source[1] > 2.5 * by_source[0]  # far from the uniform draw's 1:1


def test_upsampling_factors_keep_the_exact_resume(shard_dir):
    # The same as test_start_batch_gives_the_rest_of_the_uninterrupted_epoch, with two weighted sources.
    urls = "::".join(os.path.join(shard_dir, pattern) for pattern in ("{00000..00001}.tar", "{00002..00003}.tar"))
    settings = dict(batch_size=3, workers=2, epoch=2, resampled=True, upsampling_factors="1::4", num_samples=60)
    full, num_batches = load(urls, **settings)
    assert num_batches == len(full) == 20
    assert sum(i >= 20 for i in indices_of(full)) > 2 * sum(i < 20 for i in indices_of(full))  # the factors bite
    assert indices_of(load(urls, **{**settings, "upsampling_factors": "4::1"})[0]) != indices_of(full)
    for start in (5, 20):
        rest, _ = load(urls, start_batch=start, **settings)
        assert len(rest) == num_batches - start
        for resumed, original in zip(rest, full[start:]):
            assert torch.equal(resumed.indices, original.indices)
            assert torch.equal(resumed.images, original.images)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "--train-data",
                "a/{0..3}.tar::b/{0..3}.tar",
                "--dataset-resampled",
                "--train-data-upsampling-factors",
                "1",
            ],
            "--train-data-upsampling-factors '1' gives 1 factors for 2 sources in --train-data",
        ),
        (
            ["--train-data", "a.tar::b.tar", "--dataset-resampled", "--train-data-upsampling-factors", "1::2::3"],
            "gives 3 factors for 2 sources",
        ),
        (
            ["--train-data", "a.tar::b.tar", "--dataset-resampled", "--train-data-upsampling-factors", "1::-2"],
            "--train-data-upsampling-factors '1::-2': '-2' is not a number >= 0",
        ),
        (
            ["--train-data", "a.tar::b.tar", "--dataset-resampled", "--train-data-upsampling-factors", "1::two"],
            "'two' is not a number >= 0",
        ),
        (
            ["--train-data", "a.tar::b.tar", "--dataset-resampled", "--train-data-upsampling-factors", "nan::1"],
            "'nan' is not a number >= 0",
        ),
        (
            ["--train-data", "a.tar::b.tar", "--dataset-resampled", "--train-data-upsampling-factors", "0::0.0"],
            "all factors are 0",
        ),
        (["--train-data", "a.tar::b.tar", "--train-data-upsampling-factors", "1::2"], "it needs --dataset-resampled"),
        # Flags of shards on other data are refused, the first given (in the section's order) named.
        (
            ["--train-data", "train.csv", "--train-data-upsampling-factors", "1"],
            "--train-data-upsampling-factors applies to webdataset data; --train-data train.csv is csv data",
        ),
        (
            ["--train-data", "train.csv", "--dataset-resampled", "--train-data-upsampling-factors", "1"],
            "--dataset-resampled applies to webdataset data; --train-data train.csv is csv data",
        ),
        (
            ["--dataset-type", "synthetic", "--train-data-upsampling-factors", "1"],
            "--train-data-upsampling-factors applies to webdataset data; --dataset-type synthetic is synthetic data",
        ),
        (
            ["--dataset-type", "synthetic", "--dataset-resampled", "--train-data-upsampling-factors", "1"],
            "--dataset-resampled applies to webdataset data; --dataset-type synthetic is synthetic data",
        ),
    ],
)
def test_bad_upsampling_factors_are_one_line_errors_at_start(args, message):
    from acc_clip.train.config import parse_train_config as parse_config

    with pytest.raises(AccClipError) as error:
        parse_config(args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_upsampling_factors_are_accepted_for_resampled_shard_folders(three_sources, shard_dir):
    from acc_clip.train.config import parse_train_config as parse_config

    config, _ = parse_config(
        [
            "--train-data",
            "::".join(three_sources),
            "--dataset-resampled",
            "--train-data-upsampling-factors",
            "1::2.5::0",
        ]
    )
    assert config[ShardOptions].train_data_upsampling_factors == "1::2.5::0"
    with pytest.raises(AccClipError, match="it needs --dataset-resampled"):  # the loader checks it too
        load(shard_dir, upsampling_factors="1")


@pytest.mark.parametrize(
    "content, says",
    [
        (b'{"00000.tar": 6', "not a readable sizes.json (JSONDecodeError"),
        (b'["00000.tar", 6]', 'expected {"shard.tar": sample count'),
        (b'{"00000.tar": -1}', "counts >= 0"),
        (b'{"00000.tar": "6"}', "counts >= 0"),
        (b"\xff\xfe{}", "not a readable sizes.json (UnicodeDecodeError"),
    ],
)
def test_a_damaged_sizes_json_is_one_line_not_taken_as_absent(tmp_path, content, says):
    """Taken as absent, a damaged sizes.json sent the user after --train-num-samples; not a dict, it was
    a traceback."""
    from acc_clip.data.wds import read_shard_sizes
    from acc_clip.errors import AccClipError

    (tmp_path / "sizes.json").write_bytes(content)
    with pytest.raises(AccClipError, match=r"sizes.json: ") as error:
        read_shard_sizes([str(tmp_path / "00000.tar")])
    assert says in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "sizes.json").unlink()
    assert read_shard_sizes([str(tmp_path / "00000.tar")], count_local=False) is None  # absent: the sizes are unknown


def test_a_shard_cut_short_counts_its_missing_samples_as_bad_and_replays_nothing(tmp_path, caplog):
    """sizes.json promises 6 samples of 00000.tar, which holds 1 (a copy cut off at a member boundary). The
    epoch takes the promised 12 samples: before, a second pass over the shards filled it by reading the same
    samples again, silently; now the 5 missing are counted as bad and every real sample comes once."""
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(buffer, "JPEG")
    image = buffer.getvalue()
    write_tar(tmp_path / "00000.tar", {"000000000": {"jpg": image, "txt": b"only one"}})
    write_tar(tmp_path / "00001.tar", {f"{i:09d}": {"jpg": image, "txt": f"sample {i}".encode()} for i in range(1, 7)})
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 6, "00001.tar": 6}))
    batches, num_batches = load(str(tmp_path), workers=0, batch_size=4, preprocess=PLAIN)
    assert num_batches == len(batches) == 3
    assert sorted(indices_of(batches)) == list(range(7))
    assert sum(batch.num_bad for batch in batches) == 5
    assert "00000.tar: holds 1 samples, sizes.json says 6" in caplog.text


def test_a_cut_shard_split_between_workers_still_counts_its_missing_samples(tmp_path):
    """The same shards with 3 workers of 4 positions each: the gaps of 00000.tar fall into spans that start
    mid-shard, and are still counted, once each, wherever they fall."""
    image = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(image, "JPEG")
    write_tar(tmp_path / "00000.tar", {"000000000": {"jpg": image.getvalue(), "txt": b"only one"}})
    write_tar(tmp_path / "00001.tar", {f"{i:09d}": {"jpg": image.getvalue(), "txt": b"a caption"} for i in range(1, 7)})
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 6, "00001.tar": 6}))
    batches, num_batches = load(str(tmp_path), workers=3, batch_size=4, preprocess=PLAIN)
    assert num_batches == len(batches) == 3
    assert sorted(indices_of(batches)) == list(range(7))
    assert sum(batch.num_bad for batch in batches) == 5


def test_a_shard_holding_more_than_sizes_json_says_gives_only_its_count(tmp_path, caplog):
    image = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(image, "JPEG")
    write_tar(tmp_path / "00000.tar", {f"{i:09d}": {"jpg": image.getvalue(), "txt": b"a caption"} for i in range(5)})
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 3}))
    batches, num_batches = load(str(tmp_path), workers=0, batch_size=3, preprocess=PLAIN)
    assert num_batches == len(batches) == 1
    assert sorted(indices_of(batches)) == [0, 1, 2]  # positions follow sizes.json: the first 3 in file order
    assert "00000.tar: holds more samples than the 3 sizes.json says; the rest are left out" in caplog.text


# --- Sample-level spans: any shards, ranks and workers ------------------------------------------

SPAN_SIZES = [7, 3, 11, 1, 5]  # 27 samples, keys 0..26 in file order: shard 0 holds 0-6, shard 1 7-9, ...
FIRST_KEY = [sum(SPAN_SIZES[:shard]) for shard in range(len(SPAN_SIZES))]


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> str:
    """Five shards of 7, 3, 11, 1 and 5 samples, each a JPEG of its own noise, with sizes.json."""
    folder = tmp_path_factory.mktemp("uneven")
    rng = np.random.default_rng(2)
    for shard, size in enumerate(SPAN_SIZES):
        samples = {}
        for key in range(FIRST_KEY[shard], FIRST_KEY[shard] + size):
            image = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(image, "JPEG")
            samples[f"{key:09d}"] = {"jpg": image.getvalue(), "txt": f"sample {key}".encode()}
        write_tar(folder / f"{shard:05d}.tar", samples)
    (folder / "sizes.json").write_text(json.dumps({f"{shard:05d}.tar": n for shard, n in enumerate(SPAN_SIZES)}))
    return str(folder)


def shard_of(key: int) -> int:
    return max(shard for shard, first in enumerate(FIRST_KEY) if first <= key)


def epoch_positions(urls: str, *, seed: int, epoch: int, length: int) -> list[int]:
    """The keys at positions 0 .. length-1 of the epoch's sequence (the shuffled shards end to end)."""
    shards = expand_shard_urls(urls)
    sequence = wds_data.epoch_sequence(shards, SPAN_SIZES, seed, epoch, length)
    keys = [
        key
        for shard, size in sequence
        for key in range(FIRST_KEY[shards.index(shard)], FIRST_KEY[shards.index(shard)] + size)
    ]
    return keys[:length]


def read_every_worker(
    urls: str, monkeypatch, *, world_size: int, workers: int, batch_size: int, num_samples=None
) -> tuple[list[int], int]:
    """The raw keys every (rank, worker) of one epoch reads, undecoded, in this process; checks on the way
    that each worker makes its number of batches and opens only shards its keys come from."""
    opened: list[str] = []
    real_read = wds_data.read_raw_samples
    monkeypatch.setattr(wds_data, "read_raw_samples", lambda shards: real_read(opened.extend(shards) or shards))
    seen = []
    for rank in range(world_size):
        loader, num_batches = build_wds_loader(
            urls,
            preprocess=PLAIN,
            tokenizer=tokenize,
            batch_size=batch_size,
            workers=workers,
            seed=7,
            epoch=1,
            rank=rank,
            world_size=world_size,
            num_samples=num_samples,
            shuffle_buffer=4,
        )
        dataset = loader.dataset
        assert loader.num_workers == min(workers, num_batches)  # none started that would have no batch
        for worker in range(dataset.num_workers):
            opened.clear()
            keys = [int(raw["__key__"]) for raw in dataset.train_raw(worker)]
            assert len(keys) == wds_data.batches_of_worker(worker, num_batches, dataset.num_workers) * batch_size
            assert {os.path.basename(shard) for shard in opened} == {f"{shard_of(key):05d}.tar" for key in keys}
            seen += keys
    return seen, num_batches


@pytest.mark.parametrize("batch_size", [2, 3])
@pytest.mark.parametrize("workers", [1, 2, 4, 5])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_position_of_the_epoch_is_read_exactly_once(uneven_shards, monkeypatch, world_size, workers, batch_size):
    seen, num_batches = read_every_worker(
        uneven_shards, monkeypatch, world_size=world_size, workers=workers, batch_size=batch_size
    )
    assert num_batches == 27 // (batch_size * world_size)
    trained = num_batches * batch_size * world_size
    assert len(seen) == len(set(seen)) == trained  # no sample twice
    assert 27 - trained < batch_size * world_size  # only the drop-last remainder is left out
    assert sorted(seen) == sorted(epoch_positions(uneven_shards, seed=7, epoch=1, length=trained))


def test_an_epoch_longer_than_the_shards_goes_on_with_another_pass(uneven_shards, monkeypatch):
    # 60 positions of 27 samples: every sample 2 or 3 times, every position of the sequence once.
    seen, num_batches = read_every_worker(
        uneven_shards, monkeypatch, world_size=2, workers=4, batch_size=3, num_samples=60
    )
    assert num_batches == 10
    assert sorted(seen) == sorted(epoch_positions(uneven_shards, seed=7, epoch=1, length=60))
    assert {seen.count(key) for key in range(27)} == {2, 3}
    # A shorter epoch takes the first positions only.
    seen, _ = read_every_worker(uneven_shards, monkeypatch, world_size=2, workers=4, batch_size=3, num_samples=12)
    assert sorted(seen) == sorted(epoch_positions(uneven_shards, seed=7, epoch=1, length=12))


def test_spans_of_a_sequence_with_empty_shards_tile_it():
    sequence = [("a", 0), ("b", 4), ("c", 0), ("d", 2), ("e", 3)]
    spans = [
        wds_data.worker_span(rank, worker, num_batches=2, num_workers=2, batch_size=2)
        for rank in range(2)
        for worker in range(2)
    ]
    assert spans == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    parts = [wds_data.span_parts(sequence, span) for span in spans]
    assert parts == [[("b", 4, 0, 2)], [("b", 4, 2, 4)], [("d", 2, 0, 2)], [("e", 3, 0, 2)]]  # empty ones not opened


def test_workers_decode_only_their_own_span(uneven_shards, monkeypatch):
    # One worker per rank, 3 ranks, batches of 2: rank 1 and 2 start in the middle of a shard.
    decoded = []
    real_decode = wds_data.ShardEpoch._decode
    monkeypatch.setattr(
        wds_data.ShardEpoch, "_decode", lambda self, raw: decoded.append(raw["__key__"]) or real_decode(self, raw)
    )
    seen = []
    for rank in range(3):
        decoded.clear()
        batches, num_batches = load(uneven_shards, workers=0, world_size=3, rank=rank, batch_size=2, preprocess=PLAIN)
        assert len(decoded) == num_batches * 2 == 8
        assert sorted(int(key) for key in decoded) == sorted(indices_of(batches))
        seen += indices_of(batches)
    assert len(set(seen)) == 24


@pytest.mark.parametrize("world_size, rank, workers, batch_size", [(2, 1, 4, 2), (3, 2, 4, 3)])
def test_resume_on_uneven_shards_gives_the_rest_of_the_epoch(uneven_shards, world_size, rank, workers, batch_size):
    # (2, 1, 4, 2): 6 batches over quotas 2, 2, 1, 1. (3, 2, 4, 3): 3 batches, so 3 workers, not 4.
    settings = dict(world_size=world_size, rank=rank, workers=workers, batch_size=batch_size, epoch=5)
    full, num_batches = load(uneven_shards, **settings)
    assert len(full) == num_batches == 27 // (batch_size * world_size)
    for start in sorted({1, num_batches // 2 + 1, num_batches}):
        rest, _ = load(uneven_shards, start_batch=start, **settings)
        assert len(rest) == num_batches - start
        for resumed, original in zip(rest, full[start:]):
            assert torch.equal(resumed.indices, original.indices)
            assert torch.equal(resumed.images, original.images)


@pytest.mark.parametrize("world_size, workers, batch_size, started", [(1, 4, 4, 4), (2, 8, 5, 4)])
def test_one_shard_feeds_every_worker(tmp_path, world_size, workers, batch_size, started):
    """1 shard of 40 (a small set at the converter's default shard size) on 4 workers: was refused. With
    more workers than batches (2 ranks x 4 batches, --workers 8) only as many as there are batches start."""
    one = make_shards(tmp_path, count=40, per_shard=40)
    assert len(expand_shard_urls(one)) == 1
    seen = []
    for rank in range(world_size):
        loader, num_batches = build_wds_loader(
            one,
            preprocess=AUGMENT,
            tokenizer=tokenize,
            batch_size=batch_size,
            workers=workers,
            seed=7,
            epoch=0,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=100,
        )
        assert loader.num_workers == started
        batches = list(loader)
        assert len(batches) == num_batches == 40 // (batch_size * world_size)
        seen += indices_of(batches)
    assert sorted(seen) == list(range(40))


def test_the_trainer_says_when_it_starts_fewer_workers_than_asked(shard_dir, caplog):
    import logging

    from acc_clip.data import build_train_data
    from acc_clip.train.config import parse_train_config as parse_config

    config, _ = parse_config(["--train-data", shard_dir, "--batch-size", "5", "--workers", "12"])
    with caplog.at_level(logging.INFO, logger="acc_clip.data"):
        data = build_train_data(
            config, AUGMENT, tokenize, seed=config.runtime.seed, rank=0, world_size=1, pin_memory=False
        )
    assert data.batches_per_epoch == 8
    assert "8 batches per process per epoch: starting 8 loader workers, not --workers 12" in caplog.text


def test_an_uncounted_set_records_its_reading_in_the_order(tmp_path, shard_dir, monkeypatch):
    """A resume must not mistake the order a set had before `acc-clip shards index` for the counted one."""
    from acc_clip.data import build_train_data
    from acc_clip.train.config import parse_train_config as parse_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bare = bare_copy(shard_dir, tmp_path / "bare")
    urls = f"pipe:cat {bare}/{{00000..00003}}.tar"
    orders, elastic = [], []
    for _ in range(2):
        config, _ = parse_config(
            ["--train-data", urls, "--batch-size", "5", "--workers", "1"] + ["--train-num-samples", "40"]
        )
        data = build_train_data(config, AUGMENT, tokenize, seed=0, rank=0, world_size=1, pin_memory=False)
        orders.append(data.order)
        elastic.append(data.elastic)
        cli_main(["shards", "index", urls, "--out", str(tmp_path / "sizes.json"), "--workers", "1"])
    assert orders[0]["counts"] == "none: open_clip_train's reading"
    # Uncounted, each process and worker reads its own shards: the layout is part of the order, not elastic.
    layout = {"batch_size": 5, "world_size": 1, "workers": 1}
    assert elastic == [False, True] and orders[0].items() >= layout.items()
    counted = {**orders[1], "data": {k: v for k, v in orders[1]["data"].items() if k != "counts_sha256"}}
    assert "counts" not in orders[1] and {**counted, "counts": orders[0]["counts"], **layout} == orders[0]


def test_the_order_follows_each_shard_s_count_not_only_their_total(tmp_path, shard_dir, monkeypatch):
    """Counts that move between shards (a wrong sizes.json replaced) change the epoch's sequence with the same
    total: a resume mid-epoch must see another order."""
    from acc_clip.data import build_train_data
    from acc_clip.train.config import parse_train_config as parse_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = bare_copy(shard_dir, tmp_path / "set")
    urls = f"{folder}/{{00000..00003}}.tar"
    config, _ = parse_config(["--train-data", urls, "--batch-size", "5", "--workers", "1"])
    orders = []
    for move in (0, 1):
        sizes = json.loads((Path(shard_dir) / "sizes.json").read_text())
        names = sorted(sizes)
        sizes[names[0]] -= move
        sizes[names[1]] += move
        (folder / "sizes.json").write_text(json.dumps(sizes))
        data = build_train_data(config, AUGMENT, tokenize, seed=0, rank=0, world_size=1, pin_memory=False)
        orders.append(data.order)
    assert orders[0]["samples"] == orders[1]["samples"]
    assert orders[0]["data"]["counts_sha256"] != orders[1]["data"]["counts_sha256"]

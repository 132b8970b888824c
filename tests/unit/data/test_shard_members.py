"""Which members give a shard sample's image and caption (--image-key, --text-key, --json-text-key,
--json-text-key-probs), and the pixel limit read from the header (--max-image-pixels), through the real shard
loader and CSV dataset; the flags' one-line errors."""

from __future__ import annotations

import csv
import io
import json
import logging
import tarfile

import pytest
import torch
from PIL import Image
from torchvision import transforms

from acc_clip.data import pixels
from acc_clip.data.csv import CsvDataset
from acc_clip.data.wds import SampleMembers, build_wds_loader
from acc_clip.errors import UsageError
from acc_clip.train.config import parse_train_config

CONTEXT = 32
PLAIN = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16), transforms.ToTensor()])
AUGMENT = transforms.Compose([transforms.RandomResizedCrop(16, scale=(0.2, 1.0)), transforms.ToTensor()])


def tokenize(texts: list[str]) -> torch.Tensor:
    """A stand-in tokenizer that can be read back: the caption's bytes, zero-padded."""
    codes = list(texts[0].encode())[:CONTEXT]
    return torch.tensor([codes + [0] * (CONTEXT - len(codes))], dtype=torch.long)


def detokenize(tokens: torch.Tensor) -> str:
    return bytes(t for t in tokens.tolist() if t).decode()


def encoded(size: tuple[int, int], colour: tuple[int, int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def lying_jpeg(width: int, height: int) -> bytes:
    """A 20x20 JPEG whose start-of-frame claims width x height: decoding it would fail, sizing it does not."""
    data = encoded((20, 20), (90, 90, 90), "JPEG")
    at = data.find(b"\xff\xc0")
    return data[: at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 9 :]


def write_shards(folder, samples: list[dict[str, bytes]], per_shard: int) -> str:
    """Shards of `per_shard` samples (keys 0, 1, ...) and their sizes.json; returns the brace pattern."""
    sizes = {}
    for first in range(0, len(samples), per_shard):
        name = f"{first // per_shard:05d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for key, members in enumerate(samples[first : first + per_shard], first):
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key:09d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = len(samples[first : first + per_shard])
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"{{00000..{len(sizes) - 1:05d}}}.tar")


def load(urls: str, members: SampleMembers, **kwargs):
    arguments = dict(
        preprocess=AUGMENT,
        tokenizer=tokenize,
        batch_size=4,
        workers=0,
        seed=7,
        epoch=0,
        rank=0,
        world_size=1,
        shuffle_buffer=20,
        members=members,
    )
    arguments.update(kwargs)
    loader, _ = build_wds_loader(urls, **arguments)
    return list(loader)


def captions_by_index(batches) -> dict[int, str]:
    return {i: detokenize(t) for batch in batches for i, t in zip(batch.indices.tolist(), batch.texts)}


NUM_SAMPLES = 24
LONG = 4  # captions in each sample's "long" list


@pytest.fixture(scope="module")
def json_shards(tmp_path_factory) -> str:
    """24 samples in 3 shards; each .json holds an empty key, one caption under "short", four under "long"."""
    image = encoded((24, 20), (10, 120, 200), "JPEG")
    samples = [
        {
            "jpg": image,
            "txt": f"txt {i}".encode(),
            "json": json.dumps(
                {"blank": " ", "short": f"short {i}", "long": [f"long {i} {c}" for c in range(LONG)]}
            ).encode(),
        }
        for i in range(NUM_SAMPLES)
    ]
    return write_shards(tmp_path_factory.mktemp("json"), samples, per_shard=8)


WEIGHTED = SampleMembers(json_text_keys=("blank", "short", "long"), json_text_key_probs=(1.0, 1.0, 2.0))


def test_json_key_captions_are_drawn_per_seed_epoch_and_sample(json_shards):
    first = captions_by_index(load(json_shards, WEIGHTED))
    assert sorted(first) == list(range(NUM_SAMPLES))
    # Never the .txt member (--text-key does not apply), never the empty key: one of the sample's own captions.
    own = {i: {f"short {i}", *(f"long {i} {c}" for c in range(LONG))} for i in range(NUM_SAMPLES)}
    assert all(caption in own[i] for i, caption in first.items())
    assert {caption.split()[0] for caption in first.values()} == {"short", "long"}
    assert len({caption.split()[-1] for caption in first.values() if caption.startswith("long")}) > 1
    # Whichever worker reads a sample, and whatever the batch size, it gets the same caption in an epoch.
    assert captions_by_index(load(json_shards, WEIGHTED, workers=2, batch_size=3)) == first
    assert captions_by_index(load(json_shards, WEIGHTED, epoch=1)) != first
    assert captions_by_index(load(json_shards, WEIGHTED, seed=8)) != first


def test_a_resumed_epoch_draws_the_captions_of_the_uninterrupted_one(json_shards):
    whole = load(json_shards, WEIGHTED, workers=2, epoch=3)
    resumed = load(json_shards, WEIGHTED, workers=2, epoch=3, start_batch=3)
    assert len(resumed) == len(whole) - 3
    for kept, again in zip(whole[3:], resumed):
        assert again.indices.tolist() == kept.indices.tolist()
        assert torch.equal(again.texts, kept.texts)


def test_validation_takes_the_first_key_in_order_that_holds_a_caption(json_shards):
    for keys, want in ((("blank", "short", "long"), "short {}"), (("long", "short"), "long {} 0")):
        members = SampleMembers(json_text_keys=keys, json_text_key_probs=(0.0, 1.0, 1.0)[-len(keys) :])
        got = captions_by_index(load(json_shards, members, is_train=False, preprocess=PLAIN))
        assert got == {i: want.format(i) for i in range(NUM_SAMPLES)}


def test_samples_without_a_json_caption_are_counted_and_named(tmp_path, caplog):
    image = encoded((20, 20), (1, 2, 3), "JPEG")
    samples = [
        {"jpg": image, "json": json.dumps({"short": "a caption"}).encode()},
        {"jpg": image, "txt": b"only a text member"},
        {"jpg": image, "json": b"{not json"},
        {"jpg": image, "json": json.dumps({"short": ["", " "], "other": "not asked for"}).encode()},
    ]
    urls = write_shards(tmp_path, samples, per_shard=4)
    with caplog.at_level(logging.WARNING):
        batches = load(urls, SampleMembers(json_text_keys=("short",)), preprocess=PLAIN)
    assert [batch.num_bad for batch in batches] == [3]
    assert captions_by_index(batches) == {0: "a caption"}
    assert "sample 000000001: no .json member" in caplog.text
    assert "sample 000000002: no caption under the .json keys short" in caplog.text
    assert "sample 000000003: no caption under the .json keys short" in caplog.text


RED, BLUE = (250, 0, 0), (0, 0, 250)


@pytest.fixture(scope="module")
def two_member_shards(tmp_path_factory) -> str:
    """Samples with a red .jpg and a blue .png, a .txt and a .caption; the last sample has no .caption."""
    jpg, png = encoded((20, 20), RED, "JPEG"), encoded((20, 20), BLUE, "PNG")
    samples = [{"jpg": jpg, "png": png, "txt": f"txt {i}".encode(), "caption": f"cap {i}".encode()} for i in range(3)]
    samples.append({"jpg": jpg, "png": png, "txt": b"txt 3"})
    return write_shards(tmp_path_factory.mktemp("members"), samples, per_shard=4)


def dominant_channels(batches) -> set[int]:
    return {int(image.mean(dim=(1, 2)).argmax()) for batch in batches for image in batch.images}


def test_image_and_text_keys_pick_their_members(two_member_shards, caplog):
    default = load(two_member_shards, SampleMembers(), preprocess=PLAIN)
    assert dominant_channels(default) == {0}  # jpg comes first in jpg;png;jpeg;webp: red
    assert captions_by_index(default) == {i: f"txt {i}" for i in range(4)}

    members = SampleMembers(image_keys=("webp", "png", "jpg"), text_keys=("caption",))
    with caplog.at_level(logging.WARNING):
        chosen = load(two_member_shards, members, preprocess=PLAIN)
    assert dominant_channels(chosen) == {2}  # the first present of webp;png;jpg: blue
    assert captions_by_index(chosen) == {i: f"cap {i}" for i in range(3)}
    assert sum(batch.num_bad for batch in chosen) == 1
    assert "sample 000000003: no caption member (.caption)" in caplog.text

    only_gif = load(two_member_shards, SampleMembers(image_keys=("gif",)), preprocess=PLAIN)
    assert sum(batch.num_bad for batch in only_gif) == 4  # no such member: every sample counted bad


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """The sizes (width x height) of the images PIL decoded in this process (workers=0)."""
    decoded: list[int] = []
    real = pixels.pil_image

    def recording(data: bytes, *, decode: bool = True):
        image = real(data, decode=decode)
        if decode:
            decoded.append(image.width * image.height)
        return image

    monkeypatch.setattr(pixels, "pil_image", recording)
    return decoded


@pytest.fixture(scope="module")
def sized_shards(tmp_path_factory) -> str:
    """A 20x20 JPEG, a 100x100 PNG and a JPEG whose header claims 3000x3000 on 20x20 data."""
    samples = [
        {"jpg": encoded((20, 20), RED, "JPEG"), "txt": b"small"},
        {"png": encoded((100, 100), BLUE, "PNG"), "txt": b"large png"},
        {"jpg": lying_jpeg(3000, 3000), "txt": b"claims nine million pixels"},
    ]
    return write_shards(tmp_path_factory.mktemp("sized"), samples, per_shard=3)


def test_images_over_the_pixel_limit_are_skipped_before_decoding(sized_shards, decodes, caplog):
    plain_pil = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16), transforms.ToTensor()])
    with caplog.at_level(logging.WARNING):
        batches = load(sized_shards, SampleMembers(max_image_pixels=5000), preprocess=plain_pil, batch_size=3)
    assert [batch.num_bad for batch in batches] == [2] and captions_by_index(batches) == {0: "small"}
    assert decodes == [400]  # only the small image was decoded: the others were refused from their headers
    assert "00000.tar sample 000000001: image skipped: 100x100 = 10000 pixels, more than --max-image-pixels 5000" in (
        caplog.text
    )
    assert "sample 000000002: image skipped: 3000x3000 = 9000000 pixels, more than --max-image-pixels 5000" in (
        caplog.text
    )


def test_the_limit_is_inclusive_and_zero_turns_it_off(sized_shards, decodes):
    at_limit = load(sized_shards, SampleMembers(max_image_pixels=10_000), preprocess=PLAIN, batch_size=3)
    assert sorted(captions_by_index(at_limit).values()) == ["large png", "small"]
    decodes.clear()
    off = load(sized_shards, SampleMembers(max_image_pixels=0), preprocess=PLAIN, batch_size=3)
    assert len(captions_by_index(off)) == 3
    # Without a limit the lying JPEG reaches the decoder, which makes 9 million pixels of its 20x20 data: the
    # cost the limit saves.
    assert sorted(decodes) == [400, 10_000, 9_000_000]


def test_a_csv_image_over_the_pixel_limit_is_skipped_counted_and_named(tmp_path, decodes, caplog):
    (tmp_path / "small.jpg").write_bytes(encoded((20, 20), RED, "JPEG"))
    (tmp_path / "large.png").write_bytes(encoded((100, 100), BLUE, "PNG"))
    with open(tmp_path / "data.csv", "w", newline="") as file:
        csv.writer(file).writerows(
            [("filepath", "title"), (tmp_path / "small.jpg", "a"), (tmp_path / "large.png", "b")]
        )
    common = dict(transform=PLAIN, tokenizer=tokenize, sep=",")
    with caplog.at_level(logging.WARNING):
        limited = CsvDataset(str(tmp_path / "data.csv"), max_image_pixels=5000, **common)
        assert limited[0] is not None and limited[1] is None
    assert f"data.csv row 1: cannot read image {tmp_path / 'large.png'} (100x100 = 10000 pixels" in caplog.text
    assert decodes == [400]
    assert CsvDataset(str(tmp_path / "data.csv"), max_image_pixels=0, **common)[1] is not None


def test_the_default_pixel_limit_is_open_clip_mains():
    config, _ = parse_train_config(["--train-data", "x/{00000..00001}.tar"])
    assert SampleMembers.of(config) == SampleMembers(
        image_keys=("jpg", "png", "jpeg", "webp"), text_keys=("txt",), max_image_pixels=25_000_000
    )


@pytest.mark.parametrize(
    "flags, says",
    [
        (
            ["--json-text-key-probs", "1"],
            "--json-text-key-probs weighs the keys of --json-text-key, which is not given",
        ),
        (["--json-text-key", "a;b", "--json-text-key-probs", "1", "2", "3"], "gives 3 weights for the 2 keys"),
        (["--json-text-key", "a;b", "--json-text-key-probs", "0", "0"], "every weight is 0"),
        (["--json-text-key", "a;b", "--json-text-key-probs", "1", "-2"], "--json-text-key-probs 1.0 -2.0: must be 0"),
        (["--json-text-key", ";"], "--json-text-key ';': must be ';'-separated names, at least one"),
        (["--image-key", ""], "--image-key '': must be ';'-separated names"),
        (["--text-key", " ; "], "--text-key ' ; ': must be ';'-separated names"),
        (["--max-image-pixels", "-1"], "--max-image-pixels -1: must be 0 or more"),
    ],
)
def test_bad_key_flags_are_one_line_errors_at_parse_time(flags, says):
    with pytest.raises(UsageError, match=None) as error:
        parse_train_config(["--train-data", "x/{00000..00001}.tar", *flags])
    assert says in str(error.value) and "\n" not in str(error.value)


def test_probabilities_for_fewer_keys_leave_the_rest_as_fallbacks():
    config, _ = parse_train_config(
        ["--train-data", "x/{00000..00001}.tar", "--json-text-key", "a; b ;c", "--json-text-key-probs", "2", "0.5"]
    )
    members = SampleMembers.of(config)
    assert members.json_text_keys == ("a", "b", "c") and members.json_text_key_probs == (2.0, 0.5)


def test_validation_sets_read_the_flags_of_the_run(json_shards):
    from acc_clip.data import build_eval_loader

    flags = ["--train-data", json_shards, "--json-text-key", "long;short", "--workers", "0", "--batch-size", "5"]
    config, _ = parse_train_config(flags)
    loader = build_eval_loader(config, json_shards, PLAIN, tokenize, rank=0, world_size=1)
    assert captions_by_index(loader) == {i: f"long {i} 0" for i in range(NUM_SAMPLES)}
    config, _ = parse_train_config([*flags, "--max-image-pixels", "479"])  # the images are 24x20 = 480 pixels
    assert sum(
        batch.num_bad for batch in build_eval_loader(config, json_shards, PLAIN, tokenize, rank=0, world_size=1)
    ) == (NUM_SAMPLES)

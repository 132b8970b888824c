"""The split image path (uint8 crops in the workers, normalised on the device, or decoded on the
device) against open_clip's own PIL transforms, and its handling of bad and unusual images."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from acc_clip.data.common import Batch, seeded_torch_rng
from acc_clip.data.pixels import (
    EncodedImages,
    ImageDecodeError,
    ImageTooLarge,
    SplitTransform,
    decode_encoded_batch,
    decode_rgb,
    load_pixels,
    model_input,
    split_transform,
    train_transform,
)


@pytest.fixture(scope="module")
def rn50_transforms():
    """open_clip's RN50 train and val transforms (random weights, nothing downloaded)."""
    _, train, val = open_clip.create_model_and_transforms("RN50")
    return train, val


def encoded(picture: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(height: int, width: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: JPEG-friendly like a photo, with detail for the resampling to show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def images() -> list[bytes]:
    rgb = photo(256, 341, 0)
    return [
        encoded(rgb, "JPEG", quality=90),
        encoded(photo(300, 240, 1), "JPEG", quality=75),
        encoded(rgb.convert("L"), "JPEG"),  # grayscale JPEG: replicated to RGB
        encoded(rgb.convert("CMYK"), "JPEG"),  # CMYK JPEG
        encoded(photo(250, 260, 2).convert("RGBA"), "PNG"),  # alpha dropped
        encoded(rgb.convert("P"), "PNG"),  # palette
        encoded(rgb, "BMP"),  # no fast decoder: through PIL
    ]


def reference(preprocess, data: bytes, seed: int) -> torch.Tensor:
    """open_clip's transform on the PIL image, as open_clip_train runs it."""
    with seeded_torch_rng(seed):
        return preprocess(Image.open(io.BytesIO(data)))


def split_path(split: SplitTransform, data: bytes, seed: int) -> torch.Tensor:
    with seeded_torch_rng(seed):
        pixels = split(data)
    return split.to_model_input(split.collate([pixels]), "cpu")[0]


def test_open_clip_transforms_split_into_geometric_steps_and_a_normalisation(rn50_transforms):
    train, val = rn50_transforms
    for preprocess in (train, val):
        split = split_transform(preprocess)
        assert split is not None
        assert [type(step) for step in split.geometric.transforms] == [type(s) for s in preprocess.transforms[:-3]]
        assert split.mean == tuple(preprocess.transforms[-1].mean) and split.std == tuple(preprocess.transforms[-1].std)


def rounding_levels(got: torch.Tensor, want: torch.Tensor, std) -> torch.Tensor:
    """|got - want| in steps of 1/255 before normalisation, per value."""
    return ((got - want).abs() * 255 * torch.tensor(std).view(3, 1, 1)).round()


@pytest.mark.parametrize("which", ["train", "val"])
def test_split_path_gives_open_clips_pixels_up_to_rounding(rn50_transforms, which):
    preprocess = dict(zip(("train", "val"), rn50_transforms))[which]
    split = split_transform(preprocess)
    for seed, data in enumerate(images()):
        if Image.open(io.BytesIO(data)).mode == "P":
            # PIL resizes palette images nearest-neighbour (it cannot interpolate palette indices), so
            # open_clip's pixels are blocky there; ours are resampled from RGB, as for any image.
            want = reference(preprocess, encoded(Image.open(io.BytesIO(data)).convert("RGB"), "PNG"), seed)
        else:
            want = reference(preprocess, data, seed)
        got = split_path(split, data, seed)
        assert got.dtype == torch.float32 and got.shape == want.shape == (3, 224, 224)
        levels = rounding_levels(got, want, split.std)
        # torch's uint8 bicubic rounds differently from PIL's fixed point. Seen on these noisy images:
        # 78-80% of values equal, 98-100% within one level, at most 9 levels (where clipped bicubic
        # overshoots meet the dithered palette image). A wrong crop or resize would be tens of levels.
        assert (levels <= 1).float().mean() >= 0.98, f"image {seed}"
        assert levels.mean() < 0.3 and levels.max() <= 12, f"image {seed}: max {levels.max()}"


def test_the_crop_draws_are_those_of_open_clips_transform(rn50_transforms):
    """Different seeds crop differently, and each seed crops the same on both paths: a wrong draw
    would move the picture by pixels, far beyond rounding."""
    train, _ = rn50_transforms
    split = split_transform(train)
    data = images()[0]
    a, b = split_path(split, data, 1), split_path(split, data, 2)
    assert (a - b).abs().mean() > 0.05
    assert (a - reference(train, data, 1)).abs().mean() < 0.01


def test_batches_travel_as_uint8(rn50_transforms):
    split = split_transform(rn50_transforms[0])
    batch = split.collate([split(data) for data in images()[:3]])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 224, 224)
    normalised = model_input(batch, split, "cpu", channels_last=True)
    assert normalised.dtype == torch.float32 and normalised.is_contiguous(memory_format=torch.channels_last)
    floats = torch.rand(2, 3, 8, 8)
    assert model_input(floats, split, "cpu", channels_last=False) is floats  # already model-ready: untouched


def test_transforms_of_another_shape_run_whole():
    normalize = T.Normalize([0.5] * 3, [0.25] * 3)
    rgb = open_clip.transform._convert_to_rgb
    jitter = T.Compose([T.RandomResizedCrop(32), T.ColorJitter(0.4), rgb, T.ToTensor(), normalize])
    no_normalize = T.Compose([T.Resize(32), T.CenterCrop(32), rgb, T.ToTensor()])
    lambda_head = T.Compose([T.Lambda(lambda image: image), rgb, T.ToTensor(), normalize])
    zero_std = T.Compose([T.Resize(32), rgb, T.ToTensor(), T.Normalize([0.5] * 3, [0.0] * 3)])
    for preprocess in (jitter, no_normalize, lambda_head, zero_std, T.ToTensor()):
        assert split_transform(preprocess) is None
        assert train_transform(preprocess, decode_on_device=False, device="cpu") is preprocess
    # A custom transform still gets PIL images, and bad bytes still fail as an ImageDecodeError.
    assert load_pixels(images()[0], T.ToTensor()).shape == (3, 256, 341)
    with pytest.raises(ImageDecodeError):
        load_pixels(images()[0][:500], T.ToTensor())


def corrupt(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def damaged_versions(data: bytes) -> list[bytes]:
    return [corrupt(data, at) for at in range(60, len(data) - 1, max(1, len(data) // 40))]  # past the header


def test_damaged_png_and_gif_are_refused_as_pil_refuses_them():
    """torchvision's PNG decoder crashes the process on some flipped bytes in the image data (a
    segfault: seen with torchvision 0.29), and its GIF decoder accepts damaged files PIL refuses:
    formats other than JPEG go through PIL. Run in a child process, so a crash fails this test
    instead of ending the test session."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_pixels import damaged_versions, encoded, images, photo, pil_rgb
from acc_clip.data.pixels import ImageDecodeError, decode_rgb
import torch
refused = 0
for data in (images()[4], encoded(photo(60, 80, 3), "GIF")):
    for damaged in damaged_versions(data):
        try:
            want = pil_rgb(damaged)
        except Exception:
            want = None
        try:
            got = decode_rgb(damaged)
        except ImageDecodeError:
            got = None
        assert (got is None) == (want is None), "refused by one decoder only"
        assert got is None or torch.equal(got, want)
        refused += got is None
print("refused", refused)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert int(result.stdout.split()[-1]) > 0  # the loop did meet damage that PIL refuses


def test_16_bit_and_huge_images(tmp_path, rn50_transforms):
    deep = Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21)  # mode I;16
    data = encoded(deep, "PNG")
    assert decode_rgb(data).dtype == torch.uint8 and torch.equal(decode_rgb(data), pil_rgb(data))
    # A JPEG whose header claims more pixels than --max-image-pixels allows is refused before any decoding, on
    # every image path; so is a PNG (sized by PIL's lazy open).
    good = images()[0]
    at = good.find(b"\xff\xc0")
    huge = good[: at + 5] + (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big") + good[at + 9 :]
    for transform in (
        T.ToTensor(),
        split_transform(rn50_transforms[0]),
        split_transform(rn50_transforms[0], decode_on_device=True),
    ):
        with pytest.raises(
            ImageTooLarge, match="60000x60000 = 3600000000 pixels, more than --max-image-pixels 25000000"
        ):
            load_pixels(huge, transform)
    png = encoded(photo(250, 260, 2), "PNG")
    with pytest.raises(ImageTooLarge, match="260x250 = 65000 pixels, more than --max-image-pixels 64999"):
        load_pixels(png, T.ToTensor(), max_pixels=64_999)
    assert load_pixels(png, T.ToTensor(), max_pixels=65_000).shape == (3, 250, 260)


def test_bad_bytes_raise_one_error_type(rn50_transforms):
    good = images()[0]
    on_device = split_transform(rn50_transforms[0], decode_on_device=True)
    for bad in (good[: len(good) // 2], b"not an image" * 10, b""):
        with pytest.raises(ImageDecodeError):
            decode_rgb(bad)
        if bad[:2] != good[:2]:  # without a JPEG header the worker cannot even size it
            with pytest.raises(ImageDecodeError):
                load_pixels(bad, on_device)


def pil_rgb(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)


def test_the_fast_decoder_agrees_with_pil_on_jpeg():
    """libjpeg-turbo through torchvision.io (or torchcodec, when installed) and through PIL: the same pixels."""
    for data in images()[:4]:
        assert torch.equal(decode_rgb(data), pil_rgb(data))


def test_torchcodec_agrees_with_pil_on_jpeg():
    torchcodec = pytest.importorskip("torchcodec.decoders", reason="torchcodec not installed (optional)")
    for data in images()[:4]:
        assert torch.equal(torchcodec.decode_jpeg(data, mode="RGB"), pil_rgb(data))


# --- decoding on the device ---------------------------------------------------------------------
# No CUDA here: the device half runs on the CPU device, which takes the same code path (batched
# decode_jpeg, crop and resize on that device); nvjpeg itself is exercised only on a GPU.


def test_device_decoding_gives_the_worker_decoded_batch(rn50_transforms):
    train, _ = rn50_transforms
    in_workers, on_device = split_transform(train), split_transform(train, decode_on_device=True)
    assert on_device.decode_on_device and not in_workers.decode_on_device
    data = images()
    samples = []
    for seed, picture in enumerate(data):
        with seeded_torch_rng(seed):
            samples.append(on_device(picture))
    batch = on_device.collate(samples)
    assert isinstance(batch, EncodedImages) and len(batch.offsets) == len(data) + 1
    decoded, failed = on_device.decode_batch(batch, "cpu")
    assert failed == []
    want = []
    for seed, picture in enumerate(data):
        with seeded_torch_rng(seed):
            want.append(in_workers(picture))
    assert torch.equal(decoded, torch.stack(want))  # same decoder, same crop draws, same resize


def bogus_huffman_table(data: bytes) -> bytes:
    """A JPEG that looks whole from its markers but whose Huffman table cannot be decoded."""
    at = data.find(b"\xff\xc4")
    return data[: at + 5] + b"\xff" * 16 + data[at + 21 :]


def test_images_failing_on_the_device_are_dropped_and_counted(rn50_transforms, caplog):
    on_device = split_transform(rn50_transforms[0], decode_on_device=True)
    good = images()[0]
    pixels = [on_device(good), on_device(bogus_huffman_table(good)), on_device(images()[4])]
    batch = Batch(on_device.collate(pixels), torch.arange(30).view(3, 10), torch.tensor([7, 8, 9]), 1)
    assert batch.images.on_device.tolist() == [True, True, False]  # the PNG goes to the host
    with caplog.at_level(logging.WARNING):
        result = decode_encoded_batch(batch, on_device, "cpu")
    assert result.images.shape == (2, 3, 224, 224)
    assert result.indices.tolist() == [7, 9] and result.texts[:, 0].tolist() == [0, 20]
    assert result.num_bad == 2
    assert "[8]" in caplog.text


def test_the_workers_refuse_truncated_jpegs_and_route_odd_ones_to_the_host(rn50_transforms):
    """A truncated JPEG never reaches the device (nvJPEG might decode part of it); grey and CMYK
    JPEGs and other formats are decoded on the host."""
    on_device = split_transform(rn50_transforms[0], decode_on_device=True)
    good = images()[0]
    with pytest.raises(ImageDecodeError, match="truncated"):
        on_device(good[: len(good) // 2])
    routed = on_device.collate([on_device(data) for data in images()])
    assert routed.on_device.tolist() == [True, True, False, False, False, False, False]  # RGB JPEGs only


def test_devices_without_a_jpeg_decoder_fall_back_to_the_workers(rn50_transforms, caplog):
    with caplog.at_level(logging.WARNING):
        chosen = train_transform(rn50_transforms[0], decode_on_device=True, device="cpu")
    assert isinstance(chosen, SplitTransform) and not chosen.decode_on_device
    assert "decoding in the loader workers instead" in caplog.text
    # The val transform (resize, centre crop) cannot be decoded on the device even where possible.
    assert not split_transform(rn50_transforms[1], decode_on_device=True).decode_on_device


def test_a_cuda_device_counts_only_if_its_decoder_decodes_a_probe(monkeypatch, caplog):
    """No GPU here: the decoder is replaced by stand-ins (a mock, as CUDA cannot exist on this
    machine) to check the decision, e.g. a torchvision built without nvJPEG falls back to the workers."""
    import acc_clip.data.pixels as pixels

    def fails(*args, **kwargs):
        raise RuntimeError("decode_jpeg_cuda: torchvision not compiled with nvJPEG support")

    pixels.device_can_decode_jpeg.cache_clear()
    monkeypatch.setattr(pixels, "_decode_jpeg", fails)
    with caplog.at_level(logging.WARNING):
        assert not pixels.device_can_decode_jpeg(torch.device("cuda:0"))
    assert "nvJPEG support" in caplog.text
    pixels.device_can_decode_jpeg.cache_clear()
    monkeypatch.setattr(pixels, "_decode_jpeg", lambda data, mode, device: torch.zeros(3, 16, 16, dtype=torch.uint8))
    assert pixels.device_can_decode_jpeg(torch.device("cuda:0"))
    pixels.device_can_decode_jpeg.cache_clear()
    assert not pixels.device_can_decode_jpeg(torch.device("cpu"))


def test_pil_opens_only_the_photo_formats_it_is_allowed():
    """Without a list PIL tries every plugin it has: an EPS file reached its Ghostscript plugin."""
    import io

    from PIL import Image

    from acc_clip.data.pixels import ImageDecodeError, decode_rgb, pil_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # what PIL would do unasked
    with pytest.raises(ImageDecodeError):
        decode_rgb(eps)
    for image_format in ("PNG", "BMP", "WEBP", "GIF"):
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), (200, 10, 10)).save(buffer, format=image_format)
        assert pil_image(buffer.getvalue()).size == (4, 4)

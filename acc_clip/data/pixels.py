"""Training images from encoded bytes to model input, split between the loader workers and the device.

open_clip's train transform is [RandomResizedCrop (bicubic), convert to RGB, ToTensor, Normalize] on
PIL images. When a transform has that shape (`split_transform`), acc_clip runs it differently:

- loader workers decode JPEGs with libjpeg-turbo straight into uint8 tensors (torchcodec when
  installed, else torchvision.io; other formats through PIL, as open_clip reads them: torchvision's
  PNG and GIF decoders crash or accept damaged files that PIL refuses) and run the geometric steps
  (the same torchvision classes, so the same random draws) on those uint8 tensors; batches travel
  as uint8, 4x fewer bytes between processes and to the device than float;
- the training process converts to float and normalises on the device (`to_model_input`), with
  ToTensor's and Normalize's arithmetic.

Against PIL this halves the workers' CPU time per image (benchmarks/bench_input.py --stages); pixels
differ from PIL's resampling by rounding: mostly equal or one level of 255 apart, rarely a few more
(tests/unit/data/test_pixels.py).

With `decode_on_device=True` the workers do not decode at all: they read the JPEG header (size,
completeness), draw the crop, and send the encoded bytes; `decode_batch` decodes the batch on the
device (nvjpeg on CUDA, one batched call) and crops and resizes there. Devices without a JPEG decoder
fall back to decoding in the workers (`device_can_decode_jpeg`). Truncated JPEGs are refused in the
workers; other formats and JPEGs that are not 3-component (grey, CMYK) are decoded on the host;
images that fail to decode are dropped and counted like any bad sample.

Transforms of any other shape (custom augmentation) run whole, on PIL images, in the workers.

Image size: `load_pixels`, through which every source reads its images, takes width x height from the header
(a JPEG's start-of-frame, else PIL's lazy open) and refuses an image above --max-image-pixels (default
25,000,000, open_clip main's; 0: no limit) with `ImageTooLarge` before any decoder runs, for every format and
decoder. That flag replaces PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS), which is switched
off around PIL's decodes here.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from acc_clip.data.common import Batch, seeded_torch_rng
from acc_clip.io import jpeg
from acc_clip.io.files import PIL_FORMATS

try:  # torchcodec supersedes torchvision.io's image decoders (deprecated in torchvision 0.29)
    from torchcodec.decoders import decode_jpeg as _decode_jpeg

    DECODER = "torchcodec"
    _RGB = "RGB"
except ImportError:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _decode_jpeg

    DECODER = "torchvision"
    _RGB = ImageReadMode.RGB
    # Said on every decode; torchcodec, its successor, is used above when installed.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")

log = logging.getLogger(__name__)

GEOMETRIC_STEPS = (T.RandomResizedCrop, T.Resize, T.CenterCrop)  # run the same on uint8 tensors as on PIL
DECODER_ERRORS = (RuntimeError, ValueError)  # torchvision raises the first, torchcodec also the second


# open_clip main's --max-image-pixels default: width x height above it is refused before decoding.
MAX_IMAGE_PIXELS = 25_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image any decoder here can read."""


class ImageTooLarge(ImageDecodeError):
    """The header says the image has more pixels than --max-image-pixels allows; it was not decoded."""


@contextlib.contextmanager
def _without_pil_pixel_limit() -> Iterator[None]:
    """PIL's decompression-bomb guard off for one call: --max-image-pixels is the limit, checked from the header
    before any decoder runs (`load_pixels`), and PIL's guard, a module global with no per-call setting, would
    refuse some images it allows (above 2 x Image.MAX_IMAGE_PIXELS, or any with --max-image-pixels 0)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def pil_image(data: bytes, *, decode: bool = True) -> Image.Image:
    """PIL's RGB image of `data` (decoded), or with `decode=False` the opened file (its header read:
    size, format). PIL's errors and formats outside PIL_FORMATS become `ImageDecodeError`. PIL's own size
    limit does not apply: the caller's is --max-image-pixels (`check_pixel_count`)."""
    try:
        with _without_pil_pixel_limit():
            opened = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            return opened.convert("RGB") if decode else opened
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(str(error) or type(error).__name__) from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes from the header alone: a JPEG's start-of-frame segment, else
    PIL's lazy open (which reads the header, not the pixels). Bytes no decoder reads raise `ImageDecodeError`."""
    if jpeg.is_jpeg(data) and (size := jpeg.read_header(data).size) is not None:
        return size
    return pil_image(data, decode=False).size


def check_pixel_count(data: bytes, max_pixels: int) -> None:
    """Raise `ImageTooLarge` (naming both numbers) when the header gives `data` more than `max_pixels` pixels,
    before anything is decoded; 0 means no limit."""
    if not max_pixels:
        return
    width, height = image_size(data)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} = {width * height} pixels, more than --max-image-pixels {max_pixels}; not decoded"
        )


def _pil_rgb(data: bytes) -> torch.Tensor:
    rgb = pil_image(data)
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3).permute(2, 0, 1)


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W] RGB. JPEGs through libjpeg-turbo into a tensor; other
    formats, and JPEGs it refuses, through PIL (which raises on damaged data). No size limit here: datasets
    read through `load_pixels`, which checks --max-image-pixels first."""
    if jpeg.is_jpeg(data):
        try:
            image = _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_RGB)
            if image.dtype == torch.uint8 and image.shape[0] == 3:
                return image
        except DECODER_ERRORS:
            pass
    return _pil_rgb(data)


def run_geometric(steps: Sequence, image: torch.Tensor) -> torch.Tensor:
    """open_clip's geometric steps on a uint8 tensor: the same random draws as the steps' own
    forward (`get_params`), with torchvision's v2 kernels, which resize uint8 bicubic without a
    float round trip (v1's convert to float: ~10x slower on the CPU)."""
    for step in steps:
        if type(step) is T.RandomResizedCrop:
            box = step.get_params(image, step.scale, step.ratio)
            image = F.resized_crop(
                image, *box, list(step.size), interpolation=step.interpolation, antialias=step.antialias
            )
        elif type(step) is T.Resize:
            image = F.resize(
                image, step.size, interpolation=step.interpolation, max_size=step.max_size, antialias=step.antialias
            )
        else:
            image = F.center_crop(image, list(step.size))
    return image


class EncodedImages(NamedTuple):
    """A batch of undecoded images: `data[offsets[i]:offsets[i + 1]]` is image i, to be cropped to
    `boxes[i]` (top, left, height, width) and resized to `size`; `on_device[i]` says whether the
    device's JPEG decoder may take it (a whole 3-component JPEG), else the host decodes it."""

    data: torch.Tensor  # uint8, all images back to back
    offsets: torch.Tensor  # long [B + 1]
    boxes: torch.Tensor  # long [B, 4]
    on_device: torch.Tensor  # bool [B]
    size: tuple[int, int]


@dataclass
class SplitTransform:
    """open_clip's transform as geometric steps on uint8 tensors (workers) and a normalisation on the
    device. Call it on encoded bytes in a worker; `to_model_input` on the batch in the trainer."""

    geometric: T.Compose
    mean: tuple[float, ...]
    std: tuple[float, ...]
    decode_on_device: bool = False

    def __call__(self, data: bytes) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.decode_on_device:
            return run_geometric(self.geometric.transforms, decode_rgb(data))
        header = jpeg.read_header(data) if jpeg.is_jpeg(data) else None
        if header is not None and not header.complete:
            raise ImageDecodeError("truncated JPEG (no end-of-image marker after the first scan)")
        size = header.size if header is not None else None
        if size is None:  # not a JPEG, or one whose height comes later (DNL): PIL reads the header
            size = pil_image(data, decode=False).size
        crop = self.geometric.transforms[0]
        # get_params reads only the dimensions (of an empty tensor here), so the draws equal those
        # of the worker-decoded path.
        box = crop.get_params(torch.empty(0, size[1], size[0]), crop.scale, crop.ratio)
        on_device = header is not None and header.components == 3
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor([*box, on_device], dtype=torch.long)

    def collate(self, pixels: list) -> torch.Tensor | EncodedImages:
        if not self.decode_on_device:
            return torch.utils.data.default_collate(pixels)
        lengths = torch.tensor([0] + [len(data) for data, _ in pixels], dtype=torch.long)
        size = tuple(self.geometric.transforms[0].size)
        boxes = torch.stack([box for _, box in pixels])
        return EncodedImages(
            torch.cat([data for data, _ in pixels]), lengths.cumsum(0), boxes[:, :4], boxes[:, 4].bool(), size
        )

    def to_model_input(self, images: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float32 on `device`, with ToTensor's and Normalize's arithmetic
        (equal to them bit for bit on the same uint8 pixels)."""
        images = images.to(device, non_blocking=True)
        mean = torch.tensor(self.mean, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(-1, 1, 1)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=layout)
        # On the CPU one image at a time stays in cache (~30% faster); an accelerator takes the batch.
        step = 1 if images.device.type == "cpu" else max(1, len(images))
        for first in range(0, len(images), step):
            chunk = out[first : first + step]
            chunk.copy_(images[first : first + step]).div_(255).sub_(mean).div_(std)
        return out

    def decode_batch(self, encoded: EncodedImages, device) -> tuple[torch.Tensor, list[int]]:
        """Decode, crop and resize an `EncodedImages` batch on `device`: uint8 [b, 3, H, W] there,
        and the positions of the images that failed to decode (left out of the b)."""
        crop = self.geometric.transforms[0]
        pieces = [encoded.data[int(a) : int(b)] for a, b in zip(encoded.offsets[:-1], encoded.offsets[1:])]
        decoded: list[torch.Tensor | None] = [None] * len(pieces)
        jpegs = encoded.on_device.nonzero().flatten().tolist()
        if jpegs and torch.device(device).type == "cuda":
            # nvJPEG's hardware decoder (A100, H100) writes its output without waiting for the work
            # queued on the stream, so it can overwrite memory the caching allocator just freed while
            # earlier kernels still read it (pytorch/vision#9606, meta-pytorch/torchcodec#1634): wait.
            torch.cuda.current_stream(device).synchronize()
        try:
            if jpegs:
                for i, image in zip(jpegs, _decode_jpeg([pieces[i] for i in jpegs], mode=_RGB, device=device)):
                    decoded[i] = image
        except DECODER_ERRORS:  # one bad image fails the whole batched call: retry one by one
            for i in jpegs:
                decoded[i] = _decode_one_jpeg(pieces[i], device)
        for i, piece in enumerate(pieces):
            if decoded[i] is None:  # not for the device's decoder, or refused by it: on the host
                with contextlib.suppress(ImageDecodeError):
                    decoded[i] = decode_rgb(piece.numpy().tobytes()).to(device)
        failed = [i for i, image in enumerate(decoded) if image is None]
        out = [
            F.resized_crop(
                image,
                *encoded.boxes[i].tolist(),
                list(encoded.size),
                interpolation=crop.interpolation,
                antialias=crop.antialias,
            )
            for i, image in enumerate(decoded)
            if image is not None
        ]
        empty = torch.empty(0, 3, *encoded.size, dtype=torch.uint8, device=device)
        return (torch.stack(out) if out else empty), failed


def _decode_one_jpeg(piece: torch.Tensor, device) -> torch.Tensor | None:
    try:
        return _decode_jpeg(piece, mode=_RGB, device=device)
    except DECODER_ERRORS:
        return None


@functools.cache
def device_can_decode_jpeg(device: torch.device) -> bool:
    """Whether JPEGs decode on `device` here: a CUDA device whose decoder (nvJPEG, through torchcodec
    or torchvision) decodes a small probe image. The CPU always could, but there it would only move
    the work from the workers into the training process, so it does not count."""
    if torch.device(device).type != "cuda":
        return False
    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(probe, "JPEG")
    try:
        _decode_jpeg(torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8), mode=_RGB, device=device)
    except DECODER_ERRORS as error:  # e.g. a torchvision built without nvJPEG
        log.warning("JPEG decoding on %s fails here (%s)", device, str(error).splitlines()[0] if str(error) else error)
        return False
    return True


def _is_convert_to_rgb(step: Callable) -> bool:
    if type(step).__name__ == "MaybeConvertMode":
        return getattr(step, "mode", None) == "RGB"
    return getattr(step, "__name__", None) == "_convert_to_rgb"


def split_transform(preprocess: Callable, *, decode_on_device: bool = False) -> SplitTransform | None:
    """`preprocess` as a `SplitTransform` when it is [geometric steps..., convert to RGB, to-tensor,
    Normalize] (open_clip's train and val transforms), else None: run it whole on PIL images.
    Device decoding needs the geometric part to be one RandomResizedCrop; otherwise it is off."""
    steps: Sequence = getattr(preprocess, "transforms", ())
    if not isinstance(preprocess, T.Compose) or len(steps) < 4:
        return None
    *geometric, convert, to_tensor, normalize = steps
    if not (
        _is_convert_to_rgb(convert)
        and type(normalize) is T.Normalize
        and (type(to_tensor) is T.ToTensor or type(to_tensor).__name__ == "MaybeToTensor")
        and all(type(step) in GEOMETRIC_STEPS for step in geometric)
        and len(normalize.mean) == 3
        and 0 not in list(normalize.std)
    ):
        return None
    device_ok = len(geometric) == 1 and type(geometric[0]) is T.RandomResizedCrop
    return SplitTransform(
        T.Compose(geometric),
        tuple(map(float, normalize.mean)),
        tuple(map(float, normalize.std)),
        decode_on_device=decode_on_device and device_ok,
    )


def load_pixels(data: bytes, transform: Callable, seed: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """What a dataset stores for one image: `transform` on the bytes when it is a `SplitTransform`,
    else on the decoded image as an RGB PIL image (custom transforms); with `seed`, its random draws
    come from torch's CPU generator seeded with it (`seeded_torch_rng`). Undecodable bytes raise
    `ImageDecodeError`; an image whose header gives more than `max_pixels` pixels (--max-image-pixels,
    0: no limit) raises `ImageTooLarge` before any decoding. Every source reads its images through here."""
    check_pixel_count(data, max_pixels)
    with seeded_torch_rng(seed) if seed is not None else contextlib.nullcontext():
        if isinstance(transform, SplitTransform):
            return transform(data)
        return transform(pil_image(data))


def collate_images(transform: Callable) -> Callable[[list], object]:
    """How a batch's images are put together: `SplitTransform.collate`, else stacked."""
    return transform.collate if isinstance(transform, SplitTransform) else torch.utils.data.default_collate


def train_transform(preprocess: Callable, *, decode_on_device: bool, device) -> Callable:
    """The transform the training loaders run: open_clip's split (uint8 in the workers, normalised on
    the device), device decoding where asked for and possible, else `preprocess` whole."""
    split = split_transform(preprocess, decode_on_device=decode_on_device and device_can_decode_jpeg(device))
    if decode_on_device and (split is None or not split.decode_on_device):
        why = (
            f"{torch.device(device).type} has no JPEG decoder here"
            if not device_can_decode_jpeg(device)
            else "the train transform is not a single RandomResizedCrop"
        )
        log.warning("--decode-on-device: %s; decoding in the loader workers instead", why)
    if split is None:
        log.info("images: the train transform is not open_clip's shape; it runs whole on PIL images in the workers")
        return preprocess
    where = f"on {device} (JPEG)" if split.decode_on_device else f"with {DECODER} in the loader workers"
    log.info("images: decoded %s, cropped as uint8, normalised on %s", where, device)
    return split


def model_input(images: torch.Tensor, transform: Callable, device, channels_last: bool) -> torch.Tensor:
    """A batch's images as the model takes them, on `device`: uint8 ones are normalised there."""
    if isinstance(transform, SplitTransform) and images.dtype == torch.uint8:
        return transform.to_model_input(images, device, channels_last)
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def decode_encoded_batch(batch: Batch, transform: Callable, device) -> Batch:
    """A batch of `EncodedImages` decoded on `device` (others are returned as they are); images that
    fail to decode are dropped from the batch and counted in `num_bad`."""
    if not isinstance(batch.images, EncodedImages):
        return batch
    images, failed = cast(SplitTransform, transform).decode_batch(batch.images, device)
    if not failed:
        return Batch(images, batch.texts, batch.indices, batch.num_bad)
    log.warning("samples %s: image does not decode on %s, skipped", [int(batch.indices[i]) for i in failed], device)
    keep = torch.ones(len(batch.indices), dtype=torch.bool)
    keep[failed] = False
    return Batch(images, batch.texts[keep], batch.indices[keep], batch.num_bad + len(failed))

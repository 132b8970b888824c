"""What a JPEG's header says, without decoding it: whether the file looks complete, its size and
its number of colour components. Microseconds per file, against milliseconds for a decode; used by
the shard writer (copy mode) and by the image path (which decoder may take a file).

The walk follows the marker segments from start-of-image, so an EXIF thumbnail's own markers,
inside APP1, are skipped. Complete means an end-of-image marker after the main image's first scan:
entropy-coded data cannot hold FF D9 (libjpeg stuffs every FF), so a truncated file fails, while a
complete file with a trailer appended (camera makers do that) passes.
"""

from __future__ import annotations

from typing import NamedTuple

from PIL import Image

SOI, SOS, EOI = b"\xff\xd8", b"\xff\xda", b"\xff\xd9"
MAGIC = b"\xff\xd8\xff"  # start-of-image and the first marker's FF: what decoders sniff
# Start-of-frame markers (C0-CF but DHT C4, JPG C8, DAC CC): their segment holds the size.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class JpegHeader(NamedTuple):
    complete: bool
    size: tuple[int, int] | None  # (width, height); None when not in the header (a DNL marker gives it later)
    components: int | None  # 1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK


def is_jpeg(data: bytes) -> bool:
    return data[:3] == MAGIC


def read_header(data: bytes) -> JpegHeader:
    """The header of `data`; `complete` is False for anything that is not a whole JPEG."""
    if not data.startswith(SOI):
        return JpegHeader(False, None, None)
    position, size, components = 2, None, None
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker == SOS[1]:
            return JpegHeader(data.rfind(EOI, position) >= 0, size, components)
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
        else:
            if marker in SOF_MARKERS and components is None and position + 10 <= len(data):
                height = int.from_bytes(data[position + 5 : position + 7], "big")
                width = int.from_bytes(data[position + 7 : position + 9], "big")
                size = (width, height) if width and height else None
                components = data[position + 9]
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return JpegHeader(False, size, components)


def too_many_pixels(size: tuple[int, int] | None) -> str | None:
    """Why an image of `size` is refused, by PIL's own decompression-bomb limit (twice
    Image.MAX_IMAGE_PIXELS, where PIL raises), else None: the shard writer's limit. Training and validation
    use --max-image-pixels instead (data/pixels.py `check_pixel_count`)."""
    limit = Image.MAX_IMAGE_PIXELS
    if size is None or limit is None or size[0] * size[1] <= 2 * limit:
        return None
    return f"{size[0]}x{size[1]} pixels, more than PIL's limit of {2 * limit} (Image.MAX_IMAGE_PIXELS x 2)"

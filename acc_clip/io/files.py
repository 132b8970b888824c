"""Reading files: an image file with bounds, the image formats PIL may open, and a file's SHA-256
(checkpoint manifests, the converter's record of its CSV). No torch here."""

from __future__ import annotations

import hashlib
import os
import stat

# The formats PIL may open: open_clip's data are photos. Without the list PIL tries every plugin it
# has, and an EPS file reaches Ghostscript.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # PIL opens MPO (a JPEG with pictures appended) as JPEG
# --max-image-bytes' default: far above a photo (COCO's largest JPEG is under 1 MB), far below what
# would strain a loader worker's memory.
MAX_IMAGE_BYTES = 50_000_000


class ImageFileError(OSError):
    """A path that is not read: not a regular file (a FIFO would block, /dev/zero never end), or larger
    than the size limit."""


def read_image_file(path: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of an image file, read only when it is a regular file of at most `max_bytes`. Checked
    before opening (a device is never opened), then on the open descriptor (opened non-blocking, so a
    FIFO swapped in meanwhile neither blocks nor slips through)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ImageFileError(f"{path}: not a regular file")
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ImageFileError(f"{path}: not a regular file")
        if status.st_size > max_bytes:
            raise ImageFileError(f"{path}: {status.st_size} bytes, above the limit of {max_bytes} (--max-image-bytes)")
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)
    finally:
        os.close(descriptor)
    if len(data) > max_bytes:  # grew since the check
        raise ImageFileError(f"{path}: more than {max_bytes} bytes (--max-image-bytes)")
    return data


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()

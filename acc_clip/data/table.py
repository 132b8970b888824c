"""Tabular rows (CSV, parquet, `datasets` folders) held in Arrow buffers, and the dataset that reads them.

Guarantees:
- No Python object per row. Each column is pyarrow arrays (a few buffers per chunk the reader made);
  a row becomes a `str` or `bytes` only when it is read, and is dropped after. Forked loader workers
  read the parent's buffers without writing to them (no reference counts live in those pages), so the
  pages stay shared and a worker's memory stays flat over a whole epoch.
- `TextColumn` and `ImageColumn` are read-only sequences by row index (what the evaluator's
  `dataset.filepaths` / `dataset.captions` need): `ImageColumn[i]` is the image's identity (its path,
  or `sha256:HEX` of its bytes, so rows holding identical bytes share one), `TextColumn[i]` the cell's
  text, or for a list cell its first caption.
- Several captions: a cell holding a JSON list of strings (`["a dog", "a puppy"]`), or a list<string>
  parquet cell, is several captions; `captions.draw_caption` picks one per (seed, epoch, index).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import pyarrow as pa
import pyarrow.compute as pc
from torch.utils.data import Dataset

from acc_clip.data.captions import draw_caption
from acc_clip.data.common import Sample, sample_seed
from acc_clip.data.pixels import MAX_IMAGE_PIXELS, ImageDecodeError, ImageTooLarge, load_pixels
from acc_clip.errors import DataError
from acc_clip.io.files import MAX_IMAGE_BYTES, ImageFileError, read_image_file

log = logging.getLogger(__name__)

# Errors that mean "this image cannot be used"; anything else is a bug and must surface.
IMAGE_ERRORS = (OSError, ImageDecodeError)  # OSError: missing, unreadable, a folder, a FIFO, too large


class Chunks:
    """Row i of a column kept in the chunks the reader made (no combining copy): the chunk found by
    bisection over the chunks' first rows (a list as long as the chunks, not the rows)."""

    def __init__(self, column: pa.ChunkedArray | pa.Array):
        self.column = column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])
        self.chunks = self.column.chunks
        self.starts = list(itertools.accumulate((len(chunk) for chunk in self.chunks), initial=0))

    @property
    def type(self) -> pa.DataType:
        return self.column.type

    def __len__(self) -> int:
        return self.starts[-1]

    def get(self, index: int) -> Any:
        chunk = bisect.bisect_right(self.starts, index) - 1
        return self.chunks[chunk][index - self.starts[chunk]].as_py()

    def field(self, name: str) -> Chunks:
        """A struct column's child, with the struct's own nulls (a null struct has no bytes, no path)."""
        kind = self.type.field(name).type
        return Chunks(pa.chunked_array([pc.struct_field(chunk, name) for chunk in self.chunks], type=kind))


class _Column(Sequence):
    """A read-only sequence over one Arrow column; equal to any sequence holding the same values."""

    def __init__(self, column: pa.ChunkedArray | pa.Array):
        self.column = Chunks(column)

    def __len__(self) -> int:
        return len(self.column)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.value(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.value(index)

    def __iter__(self) -> Iterator:
        return (self.value(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-sequence semantics: compared by value

    def value(self, index: int) -> Any:
        raise NotImplementedError


def is_text(column_type: pa.DataType) -> bool:
    return pa.types.is_string(column_type) or pa.types.is_large_string(column_type)


def is_text_list(column_type: pa.DataType) -> bool:
    return (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)) and is_text(column_type.value_type)


def caption_choices(cell: Any) -> list[str]:
    """The captions of one cell: a list cell, or a text cell holding a JSON list of strings (nulls allowed), as
    its non-empty entries (none: the sample has no caption); any other text (a caption that starts with `[` but
    is no such list too) as one caption. Shards' caption lists keep the same entries (captions.one_caption)."""
    if not isinstance(cell, list):
        text = "" if cell is None else str(cell)
        if not text.lstrip().startswith("["):
            return [text]
        try:
            cell = json.loads(text)
        except ValueError:
            return [text]
        if not (isinstance(cell, list) and all(caption is None or isinstance(caption, str) for caption in cell)):
            return [text]
    return [str(caption) for caption in cell if caption is not None and str(caption).strip()]


class TextColumn(_Column):
    """Captions: a string column, or a list<string> one. `self[i]` is the caption validation uses (the
    first of a list); `choices(i)` all of them."""

    def __init__(self, column: pa.ChunkedArray | pa.Array):
        if not (is_text(column.type) or is_text_list(column.type)):
            raise TypeError(f"a caption column holds text or lists of text, not {column.type}")
        super().__init__(column)

    def choices(self, index: int) -> list[str]:
        return caption_choices(self.column.get(index))

    def value(self, index: int) -> str:
        choices = self.choices(index)
        return choices[0] if choices else ""

    def raw(self, index: int) -> str:
        """The cell as written (a CSV field as text)."""
        cell = self.column.get(index)
        return json.dumps(cell, ensure_ascii=False) if isinstance(cell, list) else (cell or "")


class ImageColumn(_Column):
    """Images: paths (a string column), bytes (a binary column), or `datasets`' Image struct {bytes, path}
    (bytes used where present, else the path). `self[i]` is the identity of row i's image."""

    def __init__(self, column: pa.ChunkedArray | pa.Array):
        super().__init__(column)
        self.paths: Chunks | None = None
        self.data: Chunks | None = None
        kind = column.type
        if pa.types.is_struct(kind) and {"bytes", "path"} <= {kind.field(i).name for i in range(kind.num_fields)}:
            self.paths, self.data = self.column.field("path"), self.column.field("bytes")
        elif is_text(kind):
            self.paths = self.column
        elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            self.data = self.column
        else:
            raise TypeError(f"an image column holds paths, bytes or a datasets Image {{bytes, path}}, not {kind}")

    def path(self, index: int) -> str | None:
        return None if self.paths is None else self.paths.get(index)

    def bytes_of(self, index: int) -> bytes | None:
        return None if self.data is None else self.data.get(index)

    def value(self, index: int) -> str:
        data = self.bytes_of(index)
        if data is not None:
            return "sha256:" + hashlib.sha256(data).hexdigest()
        return self.path(index) or ""

    def describe(self, index: int) -> str:
        """How a warning names row i's image."""
        path = self.path(index)
        return path if path else f"<{'no image' if self.bytes_of(index) is None else 'image bytes'}>"

    def read(self, index: int, max_bytes: int) -> bytes:
        """Row i's encoded image: its bytes, or its file's; OSError (ImageFileError) when there is none."""
        data = self.bytes_of(index)
        if data is not None:
            if len(data) > max_bytes:
                raise ImageFileError(f"{len(data)} bytes, above the limit of {max_bytes} (--max-image-bytes)")
            return data
        path = self.path(index)
        if not path:
            raise ImageFileError("no image bytes and no path")
        return read_image_file(path, max_bytes)


class RowTable:
    """The two columns a tabular source reads; `where` names its file(s) in messages."""

    def __init__(self, where: str, images: pa.ChunkedArray | pa.Array, captions: pa.ChunkedArray | pa.Array):
        self.where = where
        self.images, self.captions = ImageColumn(images), TextColumn(captions)
        if len(self.images) == 0:
            raise DataError(f"{where}: no rows")

    def __len__(self) -> int:
        return len(self.images)


class TableDataset(Dataset):
    """One sample per row. `dataset[(epoch, i)]` or `dataset[i]` gives a `Sample`, or None when the image
    is missing or corrupt or the caption empty (the collate counts those). `transform` takes a PIL image,
    or is a `pixels.SplitTransform` (takes the bytes). With `augment_seeded` (training) the augmentation and
    the caption drawn from several are functions of (seed, epoch, index); without, the first caption."""

    def __init__(
        self,
        table: RowTable,
        *,
        transform: Callable,
        tokenizer: Callable,
        seed: int = 0,
        augment_seeded: bool = True,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        self.path, self.table = table.where, table
        self.filepaths, self.captions = table.images, table.captions
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        self.transform, self.tokenizer = transform, tokenizer
        self.seed, self.augment_seeded = seed, augment_seeded

    def __len__(self) -> int:
        return len(self.table)

    def caption(self, epoch: int, index: int) -> str:
        choices = self.captions.choices(index)
        if not choices:
            return ""
        return draw_caption(choices, self.seed, epoch, index) if self.augment_seeded else choices[0]

    def __getitem__(self, key) -> Sample | None:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        caption = self.caption(epoch, index).strip()
        if not caption:
            log.warning("%s row %d: empty caption, sample skipped", self.path, index)
            return None
        try:
            data = self.filepaths.read(index, self.max_image_bytes)
            seed = sample_seed(self.seed, epoch, index) if self.augment_seeded else None
            pixels = load_pixels(data, self.transform, seed, self.max_image_pixels)
        except IMAGE_ERRORS as error:
            why = str(error) if isinstance(error, (ImageFileError, ImageTooLarge)) else type(error).__name__
            image = self.filepaths.describe(index)
            log.warning("%s row %d: cannot read image %s (%s), sample skipped", self.path, index, image, why)
            return None
        return Sample(pixels, self.tokenizer([caption])[0], index)

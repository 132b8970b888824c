"""Tabular rows in Arrow buffers (acc_clip/data/table.py) and the caption rule (captions.py): several
captions in a cell, drawn per (seed, epoch, index); columns that read like lists; a forked loader worker
that reads every row without its private memory growing."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from acc_clip.data.captions import draw_caption
from acc_clip.data.common import sample_seed
from acc_clip.data.csv_file import read_csv_table
from acc_clip.data.table import ImageColumn, RowTable, TableDataset, TextColumn, caption_choices


def test_a_cell_holding_a_json_list_of_strings_is_several_captions_anything_else_one():
    assert caption_choices('["a dog", "a puppy"]') == ["a dog", "a puppy"]
    assert caption_choices(' ["one"]') == ["one"]
    assert caption_choices(["x", "y"]) == ["x", "y"]  # a list<string> parquet cell
    # Captions that start with '[' and are no JSON list of strings stay text, as written.
    for text in ("[draft] a cat on a mat", "[1, 2]", '["a", 3]', "[", '{"a": 1}', "a [dog]"):
        assert caption_choices(text) == [text]
    assert caption_choices("[]") == []  # no caption: the sample is skipped as having an empty caption
    # Empty entries and nulls are no captions, in a text cell or a list cell alike (never drawn, never skipped for).
    assert caption_choices('["ok", "", " "]') == caption_choices(["ok", None, ""]) == ["ok"]
    assert caption_choices('["x", null, "y"]') == ["x", "y"]


def test_the_draw_is_the_shard_source_s_rule_deterministic_and_changes_with_the_epoch():
    captions = [f"caption {i}" for i in range(5)]
    for index in range(50):
        want = random.Random(sample_seed(7, 3, index)).choice(captions)
        assert draw_caption(captions, 7, 3, index) == want == draw_caption(captions, 7, 3, index)
    per_epoch = [[draw_caption(captions, 7, epoch, index) for index in range(50)] for epoch in range(3)]
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]
    assert len(set(per_epoch[0])) == 5  # all five are drawn


def _rows(tmp_path, body: str):
    path = tmp_path / "rows.csv"
    path.write_text("filepath,title\n" + body)
    return read_csv_table(str(path), img_key="filepath", caption_key="title", sep=",")


def test_csv_columns_are_arrow_backed_sequences_equal_to_lists(tmp_path):
    rows = _rows(tmp_path, 'a.jpg,a cat\nb.jpg,"[""x"", ""y""]"\nc.jpg,[draft] z\n')
    assert isinstance(rows.images.column.column, pa.ChunkedArray)
    assert (
        rows.images == ["a.jpg", "b.jpg", "c.jpg"]
        and rows.images[-1] == "c.jpg"
        and rows.images[1:] == ["b.jpg", "c.jpg"]
    )
    assert rows.captions == ["a cat", "x", "[draft] z"]  # validation's caption: the first of several
    assert rows.captions.choices(1) == ["x", "y"] and rows.captions.raw(1) == '["x", "y"]'
    with pytest.raises(IndexError):
        rows.images[3]


class _Tokens:
    def __call__(self, texts):
        return torch.tensor([[len(texts[0])]])


def test_training_draws_one_caption_per_epoch_and_validation_takes_the_first(tmp_path):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(image)
    rows = "".join(f'{image},"[""{"a" * (i + 1)}"", ""{"b" * (i + 11)}""]"\n' for i in range(40))
    table = _rows(tmp_path, rows)
    train = TableDataset(table, transform=lambda im: torch.zeros(1), tokenizer=_Tokens(), seed=3)
    val = TableDataset(table, transform=lambda im: torch.zeros(1), tokenizer=_Tokens(), augment_seeded=False)
    for index in range(40):
        choices = table.captions.choices(index)
        for epoch in range(2):
            assert train.caption(epoch, index) == draw_caption(choices, 3, epoch, index)
            assert train[(epoch, index)].text.item() == len(draw_caption(choices, 3, epoch, index))
        assert val.caption(5, index) == choices[0] and val[index].text.item() == index + 1
    assert [train.caption(0, i) for i in range(40)] != [train.caption(1, i) for i in range(40)]


def test_image_columns_hold_paths_bytes_or_a_datasets_image_struct():
    paths = ImageColumn(pa.array(["a.jpg", "b.jpg"]))
    assert paths == ["a.jpg", "b.jpg"] and paths.bytes_of(0) is None
    data = ImageColumn(pa.array([b"same", b"other", b"same"], pa.binary()))
    assert data[0] == data[2] != data[1] and data[0].startswith("sha256:")  # identical bytes: one identity
    assert data.read(1, max_bytes=10) == b"other"
    with pytest.raises(OSError, match="5 bytes, above the limit of 4"):
        data.read(1, max_bytes=4)
    struct = pa.array(
        [{"bytes": b"x", "path": "p.png"}, {"bytes": None, "path": "q.png"}, None],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    images = ImageColumn(struct)
    assert images.bytes_of(0) == b"x" and images.path(1) == "q.png" and images.path(2) is None
    assert images[1] == "q.png" and images.describe(2) == "<no image>"
    with pytest.raises(OSError, match="no image bytes and no path"):
        images.read(2, max_bytes=10)
    with pytest.raises(TypeError, match="an image column holds paths, bytes"):
        ImageColumn(pa.array([1, 2]))
    with pytest.raises(TypeError, match="a caption column holds text"):
        TextColumn(pa.array([1, 2]))


def test_rows_split_over_chunks_read_in_order():
    chunks = pa.chunked_array([pa.array([f"p{i}" for i in range(n, n + 3)]) for n in (0, 3, 6)])
    table = RowTable("x", chunks, pa.chunked_array([pa.array(["c"] * 4), pa.array(["d"] * 5)]))
    assert list(table.images) == [f"p{i}" for i in range(9)] and table.captions[3] == "c" and table.captions[4] == "d"


class _RowFields(TableDataset):
    """Reads each row's path and caption, decodes no image."""

    def __getitem__(self, index):
        return len(self.filepaths[index]) + len(self.captions[index])


def _private_bytes(lengths):
    import psutil

    return sum(lengths), psutil.Process().memory_full_info().uss


def test_a_forked_worker_reading_every_row_keeps_its_private_memory_flat(tmp_path):
    """A Python str per row is copied page by page into each worker as its reference count changes
    (about 45 MB for these 200k rows); Arrow buffers are read without a write, so they stay shared."""
    pytest.importorskip("psutil")
    rows = 200_000
    path = tmp_path / "big.csv"
    with open(path, "w") as file:
        file.write("filepath,title\n")
        for row in range(rows):
            file.write(f"/data/images/part-{row // 1000:05d}/image_{row:09d}.jpg,a photo of thing {row} on a table\n")
    dataset = _RowFields(
        read_csv_table(str(path), img_key="filepath", caption_key="title", sep=","),
        transform=lambda image: image,
        tokenizer=None,
    )
    loader = DataLoader(dataset, batch_size=5000, num_workers=1, collate_fn=_private_bytes)
    readings = list(loader)
    assert sum(total for total, _ in readings) == sum(
        len(f"/data/images/part-{row // 1000:05d}/image_{row:09d}.jpg") + len(f"a photo of thing {row} on a table")
        for row in range(rows)
    )
    growth = readings[-1][1] - readings[0][1]
    assert growth < 8 * 2**20, f"the worker's private memory grew by {growth / 2**20:.1f} MiB over the pass"

"""The parquet / `datasets` source (acc_clip/data/parquet.py) on files written by the real `datasets`
library and by pyarrow: the image column as a datasets Image, raw bytes or paths; several files in name
order; bad rows counted and skipped; the order's fingerprint; `acc-clip shards --csv` from it."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from acc_clip.data import source_for
from acc_clip.data.common import collate_skipping_bad
from acc_clip.data.parquet import PARQUET, data_files, read_parquet_table
from acc_clip.data.table import TableDataset
from acc_clip.errors import AccClipError

datasets = pytest.importorskip("datasets")


def encoded(colour: str, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format=format)
    return buffer.getvalue()


COLOURS = ["red", "green", "blue", "yellow", "red"]  # rows 0 and 4: the same bytes


def hf_dataset(captions=None):
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {
        "image": [{"bytes": encoded(c, "JPEG" if i % 2 else "PNG"), "path": None} for i, c in enumerate(COLOURS)],
        "text": captions or [f"a {c} square" for c in COLOURS],
    }
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture
def bundle():
    import torchvision.transforms as T

    return T.Compose([T.Resize((8, 8)), T.ToTensor()]), lambda texts: __import__("torch").tensor([[len(texts[0])]])


def rows_of(path: str, **keys) -> TableDataset:
    keys = {"img_key": "image", "caption_key": "text", **keys}
    return TableDataset(read_parquet_table(path, **keys), transform=lambda image: image, tokenizer=None)


def test_to_parquet_and_save_to_disk_read_the_same_rows(tmp_path):
    hf_dataset().to_parquet(str(tmp_path / "train.parquet"))
    hf_dataset().save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "train.parquet", tmp_path / "saved"):
        assert source_for(str(path), "auto") is PARQUET
        rows = rows_of(str(path))
        assert rows.captions == [f"a {c} square" for c in COLOURS]
        assert [rows.filepaths.read(i, 1 << 20) for i in range(5)] == [
            encoded(c, "JPEG" if i % 2 else "PNG") for i, c in enumerate(COLOURS)
        ]
        # The evaluator's image identity: identical bytes share one (rows 0 and 4), no file path invented.
        assert rows.filepaths[0] == rows.filepaths[4] and len(set(rows.filepaths)) == 4
    assert data_files(str(tmp_path / "saved")) == [str(tmp_path / "saved" / "data-00000-of-00001.arrow")]


def test_raw_bytes_and_path_columns_and_several_files_in_name_order(tmp_path):
    paths = []
    for colour in COLOURS:
        paths.append(str(tmp_path / f"{colour}.png"))
        Image.new("RGB", (9, 9), colour).save(paths[-1])
    pq.write_table(pa.table({"filepath": paths[3:], "title": ["d", "e"]}), tmp_path / "part-1.parquet")
    pq.write_table(pa.table({"filepath": paths[:3], "title": ["a", "b", "c"]}), tmp_path / "part-0.parquet")
    for where in (str(tmp_path), str(tmp_path / "part-*.parquet")):
        rows = rows_of(where, img_key="filepath", caption_key="title")
        assert list(rows.filepaths) == paths and list(rows.captions) == list("abcde")
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(
        pa.table({"jpg": pa.array([encoded("red")], pa.binary()), "txt": [["one", "two"]]}), raw / "x.parquet"
    )
    rows = rows_of(str(raw / "x.parquet"), img_key="jpg", caption_key="txt")
    assert rows.filepaths.read(0, 1 << 20) == encoded("red") and rows.captions.choices(0) == ["one", "two"]
    assert rows.captions[0] == "one"  # validation's caption: the first


def test_bad_rows_missing_or_corrupt_bytes_and_empty_captions_are_counted_and_skipped(tmp_path, bundle, caplog):
    table = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": encoded("red"), "path": None},
                    {"bytes": None, "path": None},  # no image at all
                    {"bytes": b"\xff\xd8\xff\xe0 not really", "path": None},  # corrupt bytes
                    {"bytes": encoded("blue"), "path": None},
                    {"bytes": None, "path": str(tmp_path / "missing.png")},
                ],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "text": ["ok", "no image", "corrupt", "  ", "missing file"],
        }
    )
    pq.write_table(table, tmp_path / "bad.parquet")
    transform, tokenizer = bundle
    rows = TableDataset(
        read_parquet_table(str(tmp_path / "bad.parquet"), img_key="image", caption_key="text"),
        transform=transform,
        tokenizer=tokenizer,
    )
    with caplog.at_level("WARNING"):
        batch = collate_skipping_bad([rows[(0, i)] for i in range(5)])
    assert batch.num_bad == 4 and batch.indices.tolist() == [0]
    assert "bad.parquet row 1: cannot read image <no image> (no image bytes and no path)" in caplog.text
    assert "bad.parquet row 3: empty caption" in caplog.text and "missing.png" in caplog.text


def test_missing_columns_and_files_are_one_line_errors(tmp_path):
    hf_dataset().to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(
        AccClipError, match=r"x\.parquet: no column 'filepath', 'title' .*columns found: 'image', 'text'$"
    ):
        read_parquet_table(str(tmp_path / "x.parquet"), img_key="filepath", caption_key="title")
    with pytest.raises(AccClipError, match=r"nope\.parquet: file not found$"):
        read_parquet_table(str(tmp_path / "nope.parquet"), img_key="image", caption_key="text")
    with pytest.raises(AccClipError, match=r"\*\.parquet: no parquet files there$"):
        read_parquet_table(str(tmp_path / "none" / "*.parquet"), img_key="image", caption_key="text")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(AccClipError, match=r"junk\.parquet: cannot read it as parquet or Arrow"):
        read_parquet_table(str(tmp_path / "junk.parquet"), img_key="image", caption_key="text")
    dataset_dict = datasets.DatasetDict({"train": hf_dataset()})
    dataset_dict.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(AccClipError, match=r"dict: a DatasetDict folder; name one split's folder \(train\)$"):
        read_parquet_table(str(tmp_path / "dict"), img_key="image", caption_key="text")
    assert len(rows_of(str(tmp_path / "dict" / "train"))) == 5


def test_the_order_fingerprint_covers_every_file(tmp_path):
    hf_dataset().to_parquet(str(tmp_path / "a.parquet"))
    hf_dataset().to_parquet(str(tmp_path / "b.parquet"))
    before = PARQUET.fingerprint(str(tmp_path))
    assert [entry["path"] for entry in before] == [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    hf_dataset(captions=[f"another {c}" for c in COLOURS]).to_parquet(str(tmp_path / "b.parquet"))
    assert PARQUET.fingerprint(str(tmp_path)) != before


def test_shards_from_a_parquet_file_pass_verify_and_hold_its_rows(tmp_path):
    from acc_clip.cli import main as cli_main
    from acc_clip.prep.shards.verify import verify_shards

    hf_dataset().to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "shards"
    argv = ["shards", "--csv", str(tmp_path / "train.parquet"), "--out", str(out), "--workers", "1"]
    assert cli_main([*argv, "--csv-img-key", "image", "--csv-caption-key", "text"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 5}
    assert verify_shards(str(out))["problems"] == []
    import tarfile

    with tarfile.open(out / "00000.tar") as tar:
        members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
    assert members["000000000.txt"] == b"a red square" and members["000000003.jpg"] == encoded("yellow", "JPEG")
    meta = json.loads(members["000000000.json"])
    assert meta["source"].startswith("sha256:") and meta["row"] == 0  # image bytes: no file path written

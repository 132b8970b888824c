"""CSV -> shards conversion (acc_clip.prep.shards): content, bad rows, resume, verify, bad input. (That
open_clip's own trainer reads the result: tests/integration/test_shards_open_clip.py.)"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from open_clip_train.data import get_dataset_size
from PIL import Image

from acc_clip.cli import main as cli_main
from acc_clip.errors import AccClipError
from acc_clip.prep.shards import convert as converter
from acc_clip.prep.shards.verify import verify_shards


def write_images(folder, count: int, size=(48, 36)) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"im{i:03d}.jpg")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def write_csv(path, rows, header=("filepath", "title"), sep=",") -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def read_shard(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar}


def shard_files(folder) -> dict[str, bytes]:
    """Every output file except the per-shard stats' timing field, which is allowed to differ."""
    files = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        if name.endswith("_stats.json"):
            stats = json.loads(data)
            stats.pop("seconds")
            data = json.dumps(stats, sort_keys=True).encode()
        files[name] = data
    return files


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 40)


@pytest.fixture
def dataset_csv(tmp_path, images):
    return write_csv(tmp_path / "train.csv", [(path, f"caption number {i}") for i, path in enumerate(images)])


def convert(csv_path, out_dir, **kwargs):
    kwargs.setdefault("samples_per_shard", 10)
    kwargs.setdefault("workers", 1)
    return converter.convert_csv_to_shards(csv_path, str(out_dir), progress=False, **kwargs)


def test_copy_mode_keeps_original_bytes_and_writes_open_clip_sizes(tmp_path, images, dataset_csv):
    result = convert(dataset_csv, tmp_path / "out")
    assert (result["shards"], result["samples"], result["shards_reused"]) == (4, 40, 0)
    names = sorted(os.listdir(tmp_path / "out"))
    assert [n for n in names if n.endswith(".tar")] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]

    members = read_shard(tmp_path / "out" / "00001.tar")
    assert list(members)[:3] == ["000000010.jpg", "000000010.txt", "000000010.json"]
    for number in range(10, 20):
        key = f"{number:09d}"
        with open(images[number], "rb") as f:
            assert members[key + ".jpg"] == f.read()
        assert members[key + ".txt"].decode() == f"caption number {number}"
        assert json.loads(members[key + ".json"]) == {
            "source": images[number],
            "row": number,
            "width": 48,
            "height": 36,
            "key": key,
        }
    with tarfile.open(tmp_path / "out" / "00001.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar} == {(0, 0, 0, "", "", 0o644)}

    assert get_dataset_size(str(tmp_path / "out" / "{00000..00003}.tar")) == (40, 4)
    assert get_dataset_size(str(tmp_path / "out" / "{00001..00002}.tar")) == (20, 2)


def test_default_shard_size_comes_from_the_image_sizes(tmp_path, dataset_csv):
    # ~1.5 KB per sample -> far more than 40 per 256 MB shard: one shard, and the value is recorded.
    result = convert(dataset_csv, tmp_path / "out", samples_per_shard=None)
    assert result["shards"] == 1 and result["samples"] == 40
    with open(tmp_path / "out" / "_conversion.json") as f:
        recorded = json.load(f)["resolved_samples_per_shard"]
    assert recorded == result["samples_per_shard"] > 40


def test_bad_rows_are_skipped_and_counted_per_shard(tmp_path, images):
    with open(images[0], "rb") as f:
        good = f.read()
    truncated, garbage = tmp_path / "truncated.jpg", tmp_path / "garbage.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    garbage.write_bytes(b"this is not an image" * 10)
    rows = [
        (images[0], "fine"),
        (str(truncated), "truncated"),
        (str(tmp_path / "nowhere.jpg"), "missing"),
        (images[1], "   "),
        (str(garbage), "garbage"),
        (images[2], "fine again"),
        ("/dev/zero", "not a regular file: read, it would never end"),
    ]
    result = convert(write_csv(tmp_path / "bad.csv", rows), tmp_path / "out", samples_per_shard=4)
    assert result["samples"] == 2
    assert result["skipped"] == {
        "missing_file": 1,
        "unreadable_file": 0,
        "not_read": 1,
        "corrupt_image": 2,
        "empty_caption": 1,
    }

    with open(tmp_path / "out" / "00000_stats.json") as f:
        first = json.load(f)
    assert first["count"] == 1
    assert [(r["rows"], r["reason"]) for r in first["skipped_rows"]] == [
        ([1], "corrupt_image"),
        ([2], "missing_file"),
        ([3], "empty_caption"),
    ]
    with open(tmp_path / "out" / "00001_stats.json") as f:
        second = json.load(f)
    assert (second["count"], second["skipped"]["corrupt_image"]) == (1, 1)
    with open(tmp_path / "out" / "sizes.json") as f:
        assert json.load(f) == {"00000.tar": 1, "00001.tar": 1}
    # Keys keep their row numbers, so a skipped row leaves a gap rather than renumbering the rest.
    assert sorted(read_shard(tmp_path / "out" / "00001.tar")) == ["000000005.jpg", "000000005.json", "000000005.txt"]


def test_a_complete_jpeg_with_a_trailer_is_kept(tmp_path, images):
    with open(images[0], "rb") as f:
        data = f.read() + b"camera maker trailer"
    (tmp_path / "trailer.jpg").write_bytes(data)
    result = convert(write_csv(tmp_path / "t.csv", [(str(tmp_path / "trailer.jpg"), "x")]), tmp_path / "out")
    assert result["samples"] == 1
    assert read_shard(tmp_path / "out" / "00000.tar")["000000000.jpg"] == data


def test_a_truncated_jpeg_is_caught_despite_a_complete_exif_thumbnail(tmp_path, images):
    with open(images[0], "rb") as f:
        main_image = f.read()
    with open(images[1], "rb") as f:
        thumbnail = f.read()
    exif = b"Exif\0\0" + thumbnail  # the thumbnail brings its own scan and end-of-image markers
    with_thumbnail = main_image[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + main_image[2:]
    (tmp_path / "whole.jpg").write_bytes(with_thumbnail)
    (tmp_path / "cut.jpg").write_bytes(with_thumbnail[:-200])
    rows = [(str(tmp_path / "whole.jpg"), "whole"), (str(tmp_path / "cut.jpg"), "cut")]
    result = convert(write_csv(tmp_path / "x.csv", rows), tmp_path / "out")
    assert (result["samples"], result["skipped"]["corrupt_image"]) == (1, 1)
    assert read_shard(tmp_path / "out" / "00000.tar")["000000000.jpg"] == with_thumbnail


def test_resize_sets_the_shorter_side(tmp_path, images):
    tall = tmp_path / "tall.png"
    Image.new("RGB", (30, 90), (10, 200, 30)).save(tall)
    rows = [(images[0], "wide"), (str(tall), "tall png")]
    convert(write_csv(tmp_path / "r.csv", rows), tmp_path / "out", resize=24, quality=90)
    members = read_shard(tmp_path / "out" / "00000.tar")
    expected = {"000000000": (32, 24, 48, 36), "000000001": (24, 72, 30, 90)}
    for key, (width, height, source_width, source_height) in expected.items():
        image = Image.open(io.BytesIO(members[key + ".jpg"]))
        assert (image.format, image.size) == ("JPEG", (width, height))
        meta = json.loads(members[key + ".json"])
        assert (meta["width"], meta["height"], meta["source_width"], meta["source_height"]) == (
            width,
            height,
            source_width,
            source_height,
        )


def test_group_by_image_puts_all_captions_in_one_sample(tmp_path, images):
    rows = [
        (images[0], "a0"),
        (images[1], "b0"),
        (images[0], "a1"),
        (images[0], ""),
        (images[1], "b1"),
        (images[2], "c0"),
    ]
    result = convert(write_csv(tmp_path / "g.csv", rows), tmp_path / "out", group_by_image=True)
    assert result["samples"] == 3
    members = read_shard(tmp_path / "out" / "00000.tar")
    metas = [json.loads(members[f"{n:09d}.json"]) for n in range(3)]
    assert [m["captions"] for m in metas] == [["a0", "a1"], ["b0", "b1"], ["c0"]]
    assert [m["rows"] for m in metas] == [[0, 2, 3], [1, 4], [5]]
    assert [members[f"{n:09d}.txt"].decode() for n in range(3)] == ["a0", "b0", "c0"]


def test_a_row_with_several_captions_keeps_them_all_without_group_by_image(tmp_path, images):
    rows = [(images[0], '["a0", "a1", ""]'), (images[1], "b0")]
    convert(write_csv(tmp_path / "m.csv", rows), tmp_path / "out")
    members = read_shard(tmp_path / "out" / "00000.tar")
    metas = [json.loads(members[f"{n:09d}.json"]) for n in range(2)]
    assert metas[0]["captions"] == ["a0", "a1"] and "captions" not in metas[1]  # drawn per epoch in training
    assert [members[f"{n:09d}.txt"].decode() for n in range(2)] == ["a0", "b0"]


def test_interrupted_conversion_resumes_to_identical_bytes(tmp_path, dataset_csv, monkeypatch):
    convert(dataset_csv, tmp_path / "clean")

    calls = {"n": 0}
    real_prepare = converter.prepare_image

    def dies_on_the_fifteenth_image(*args):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt  # as if killed in the middle of shard 1
        return real_prepare(*args)

    monkeypatch.setattr(converter, "prepare_image", dies_on_the_fifteenth_image)
    with pytest.raises(KeyboardInterrupt):
        convert(dataset_csv, tmp_path / "resumed")
    monkeypatch.setattr(converter, "prepare_image", real_prepare)
    left = set(os.listdir(tmp_path / "resumed"))
    assert {"00000.tar", "00000_stats.json", "00001.tar.tmp"} <= left
    assert not left & {"00001.tar", "00001_stats.json", "sizes.json"}
    first_shard_written_at = os.stat(tmp_path / "resumed" / "00000.tar").st_mtime_ns

    result = convert(dataset_csv, tmp_path / "resumed", workers=2)  # worker count must not matter either
    assert result["shards_reused"] == 1
    assert os.stat(tmp_path / "resumed" / "00000.tar").st_mtime_ns == first_shard_written_at
    assert shard_files(tmp_path / "resumed") == shard_files(tmp_path / "clean")

    # A shard whose stats do not match its tar (killed between rename and stats) is redone.
    with open(tmp_path / "resumed" / "00002.tar", "ab") as f:
        f.write(b"\0" * 512)
    assert convert(dataset_csv, tmp_path / "resumed")["shards_reused"] == 3
    assert shard_files(tmp_path / "resumed") == shard_files(tmp_path / "clean")


def test_bad_input_is_refused_without_touching_anything(tmp_path, dataset_csv, capsys):
    wrong_columns = write_csv(tmp_path / "cols.csv", [("a.jpg", "x")], header=("path", "caption"))
    with pytest.raises(AccClipError, match="columns found: 'path', 'caption'"):
        convert(wrong_columns, tmp_path / "out1")
    assert not (tmp_path / "out1").exists()

    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(AccClipError, match="empty"):
        convert(str(tmp_path / "empty.csv"), tmp_path / "out2")
    header_only = write_csv(tmp_path / "header.csv", [])
    with pytest.raises(AccClipError, match="no rows"):
        convert(header_only, tmp_path / "out2")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (foreign / "00000.tar").write_text("not a shard of ours")
    status = cli_main(
        [
            "shards",
            "--csv",
            dataset_csv,
            "--out",
            str(foreign),
            "--samples-per-shard",
            "10",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert status == 2 and "holds other files" in capsys.readouterr().err
    assert sorted(os.listdir(foreign)) == ["00000.tar", "notes.txt"]
    assert (foreign / "00000.tar").read_text() == "not a shard of ours"

    status = cli_main(["shards", "--csv", dataset_csv, "--out", str(tmp_path / "out3"), "--samples-per-shard", "0"])
    assert status == 2 and "--samples-per-shard 0: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out3").exists()


def test_rerun_with_other_parameters_is_refused(tmp_path, dataset_csv):
    convert(dataset_csv, tmp_path / "out")
    before = shard_files(tmp_path / "out")
    with pytest.raises(AccClipError, match="resize"):
        convert(dataset_csv, tmp_path / "out", resize=24)
    with pytest.raises(AccClipError, match="samples_per_shard"):
        convert(dataset_csv, tmp_path / "out", samples_per_shard=20)
    assert shard_files(tmp_path / "out") == before


def overwrite_member(tar_path, member_name: str, data: bytes) -> None:
    with tarfile.open(tar_path) as tar:
        offset = tar.getmember(member_name).offset_data
    with open(tar_path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_verify_passes_good_shards_and_reports_damage(tmp_path, dataset_csv, capsys):
    out = tmp_path / "out"
    convert(dataset_csv, out)
    assert cli_main(["shards", "verify", str(out), "--workers", "1"]) == 0
    assert "40 samples in 4 shards: ok" in capsys.readouterr().out

    overwrite_member(out / "00002.tar", "000000023.jpg", b"\0" * 64)
    with open(out / "00003.tar", "r+b") as f:
        f.truncate(3000)
    result = verify_shards(str(out))
    assert not result["ok"]
    problems = "\n".join(result["problems"])
    assert "00002.tar: sample 000000023: image does not decode" in problems
    assert "00003.tar: unreadable tar" in problems
    assert not any(p.startswith(("00000.tar", "00001.tar")) for p in result["problems"])
    assert cli_main(["shards", "verify", str(out), "--workers", "2"]) == 1


def test_verify_reports_a_shard_cut_at_a_member_boundary(tmp_path, dataset_csv):
    """Python's tarfile reads such a shard as a shorter archive; sizes.json and the missing end marker tell."""
    import tarfile

    out = tmp_path / "out"
    convert(dataset_csv, out)
    with tarfile.open(out / "00001.tar") as tar:
        members = tar.getmembers()
    cut = members[3].offset  # the first byte of the second sample's header: three whole members kept
    with open(out / "00001.tar", "r+b") as f:
        f.truncate(cut)
    result = verify_shards(str(out))
    assert not result["ok"]
    assert result["problems"] == [
        f"00001.tar: cut short (no end-of-archive marker after its last member, at byte {cut})",
        "00001.tar: 1 samples, sizes.json says 10",
    ]

    (out / "sizes.json").write_text(json.dumps({**json.loads((out / "sizes.json").read_text()), "00001.tar": 1}))
    assert verify_shards(str(out))["problems"] == [  # sizes.json fixed to match: the tar's own end still tells
        f"00001.tar: cut short (no end-of-archive marker after its last member, at byte {cut})"
    ]


def test_tar_headers_are_those_python_tarfile_writes(tmp_path):
    """acc_clip writes shard members itself (faster than tarfile); the archive must be byte for byte
    what tarfile writes for the same members with the same fixed metadata."""
    from acc_clip.prep.shards.tar import finish_tar, write_member

    members = [
        ("000000000.jpg", bytes(range(256)) * 41),
        ("000000000.txt", "a café".encode()),
        ("000000001.json", b"{}"),
        ("000000002.txt", b""),
        ("000000003.txt", b"x" * 512),
    ]
    ours, theirs = tmp_path / "ours.tar", tmp_path / "theirs.tar"
    with open(ours, "wb") as tar:
        for name, data in members:
            write_member(tar, name, data)
        finish_tar(tar)
    with tarfile.open(theirs, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data),
                0,
                0o644,
                0,
                0,
                "",
                "",
            )
            tar.addfile(info, io.BytesIO(data))
    assert ours.read_bytes() == theirs.read_bytes()
    with tarfile.open(ours) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == members


def test_copy_mode_reads_the_size_pil_reads(tmp_path):
    """Copy mode takes width and height from the JPEG's start-of-frame, without PIL: the same as
    PIL's for baseline, progressive, grey, CMYK JPEGs, and one with an EXIF thumbnail of another size."""
    from PIL import Image

    from acc_clip.prep.shards.convert import prepare_image

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (123, 217, 3), dtype=np.uint8))
    variants = {"baseline": {}, "progressive": {"progressive": True}, "grey": {"mode": "L"}, "cmyk": {"mode": "CMYK"}}
    for name, options in variants.items():
        mode = options.pop("mode", "RGB")
        path = tmp_path / f"{name}.jpg"
        picture.convert(mode).save(path, "JPEG", **options)
        stored, width, height, *_ = prepare_image(str(path), None, 90)
        assert (width, height) == Image.open(path).size == (217, 123), name
        assert stored == path.read_bytes()
    thumbnail = io.BytesIO()
    picture.resize((40, 30)).save(thumbnail, "JPEG")
    main = (tmp_path / "baseline.jpg").read_bytes()
    exif = b"Exif\0\0" + thumbnail.getvalue()
    (tmp_path / "exif.jpg").write_bytes(main[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + main[2:])
    assert prepare_image(str(tmp_path / "exif.jpg"), None, 90)[1:3] == (217, 123)


def test_oversized_images_and_members_are_refused(tmp_path, images):
    """Copy mode reads sizes from the header, so it applies PIL's decompression-bomb limit itself;
    a member too large for a ustar header is an error, not a corrupt archive."""
    from acc_clip.prep.shards.convert import BadImage, prepare_image
    from acc_clip.prep.shards.tar import ustar_header

    good = Path(images[0]).read_bytes()
    at = good.find(b"\xff\xc0")
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(good[: at + 5] + (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big") + good[at + 9 :])
    with pytest.raises(BadImage, match="PIL's limit") as refused:
        prepare_image(str(huge), None, 90)
    assert refused.value.reason == "corrupt_image"
    assert len(ustar_header("000000000.jpg", 8**11 - 1)) == 512
    with pytest.raises(ValueError, match="does not fit a ustar header"):
        ustar_header("000000000.jpg", 8**11)

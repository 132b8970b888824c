"""`acc-clip shards --part I/N`: N conversion processes make together the shard set one run makes, the last
to finish merges sizes.json, and `shards verify` checks the whole set (every part, every shard)."""

from __future__ import annotations

import json
import multiprocessing
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from acc_clip.cli import main as cli_main
from acc_clip.errors import AccClipError
from acc_clip.prep.shards import convert as converter
from acc_clip.prep.shards.verify import verify_shards

PER_SHARD = 7  # 40 rows -> 6 shards, the last of 5


@pytest.fixture
def rows_csv(tmp_path):
    """40 rows of small random JPEGs, two of them a missing image (skipped): shard counts are not all PER_SHARD."""
    rng = np.random.default_rng(0)
    lines = ["filepath,title"]
    for i in range(40):
        path = tmp_path / f"im{i:03d}.jpg"
        if i not in (3, 30):
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path, quality=90)
        lines.append(f"{path},caption number {i}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "train.csv")


def convert(csv_path, out_dir, **kwargs):
    return converter.convert_csv_to_shards(
        csv_path, str(out_dir), samples_per_shard=PER_SHARD, workers=1, progress=False, **kwargs
    )


def samples_of(tar_path) -> list[tuple[str, bytes]]:
    """(member name, bytes) of every member in order: keys, captions, image bytes, json."""
    with tarfile.open(tar_path) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar]  # type: ignore[union-attr]


def shard_names(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tar"))


def test_two_parts_make_the_shard_set_one_run_makes(tmp_path, rows_csv, capsys):
    whole = tmp_path / "whole"
    convert(rows_csv, whole)
    parts = tmp_path / "parts"
    first = convert(rows_csv, parts, part=(0, 2))
    assert (first["shards"], first["sizes_written"]) == (3, False)
    assert not (parts / "sizes.json").exists()  # part 1 has not finished
    command = ["shards", "--csv", rows_csv, "--out", str(parts), "--samples-per-shard", str(PER_SHARD)]
    assert cli_main([*command, "--part", "1/2", "--workers", "1", "--no-progress"]) == 0
    assert "part 1/2" in capsys.readouterr().out
    assert shard_names(parts) == shard_names(whole) == [f"{i:05d}.tar" for i in range(6)]
    for name in shard_names(whole):
        assert samples_of(parts / name) == samples_of(whole / name), name
    sizes = json.loads((parts / "sizes.json").read_text())
    assert sizes == json.loads((whole / "sizes.json").read_text())
    assert sum(sizes.values()) == 38
    assert verify_shards(str(parts))["ok"]


def test_parts_finishing_together_merge_sizes_json_once_right(tmp_path, rows_csv):
    """Four parts in four processes at once, into one new folder: one shard set, one sizes.json."""
    whole = tmp_path / "whole"
    convert(rows_csv, whole)
    parts = tmp_path / "parts"
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=convert, args=(rows_csv, parts), kwargs={"part": (i, 4)}) for i in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    assert json.loads((parts / "sizes.json").read_text()) == json.loads((whole / "sizes.json").read_text())
    assert not [name for name in os.listdir(parts) if name.endswith(".tmp") or name.count(".") > 1]
    assert verify_shards(str(parts))["ok"]


def test_verify_finds_a_missing_part(tmp_path, rows_csv):
    parts = tmp_path / "parts"
    convert(rows_csv, parts, part=(0, 2))
    result = verify_shards(str(parts))
    assert not result["ok"]
    assert "part 1/2: not finished (no _part_1_of_2.json)" in result["problems"]
    assert "00003.tar: missing (3 of the 6 shards of this conversion)" in result["problems"]
    # A record whose counts are not its shards' (a shard replaced after its part finished) is found too.
    convert(rows_csv, parts, part=(1, 2))
    assert verify_shards(str(parts))["ok"]
    record = json.loads((parts / "_part_1_of_2.json").read_text())
    record["shards"]["00004.tar"] += 1
    (parts / "_part_1_of_2.json").write_text(json.dumps(record))
    assert verify_shards(str(parts))["problems"] == ["_part_1_of_2.json: says 00004.tar holds 7 samples, it holds 6"]


def test_parts_need_samples_per_shard_and_a_valid_part(tmp_path, rows_csv):
    with pytest.raises(AccClipError, match="--part needs --samples-per-shard"):
        converter.convert_csv_to_shards(rows_csv, str(tmp_path / "out"), part=(0, 2), progress=False)
    for text in ("2/2", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(AccClipError, match="expected I/N with 0 <= I < N"):
            converter.parse_part(text)
    assert not (tmp_path / "out").exists()

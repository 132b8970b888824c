"""Shard counts without sizes.json (acc_clip.data.shard_counts): the header count equals what webdataset
itself yields on odd tars, img2dataset's stats are used, and the cache never serves a changed shard."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from webdataset.tariterators import tarfile_samples

from acc_clip.data import shard_counts
from acc_clip.data.shard_counts import count_and_cache, count_tar_headers
from acc_clip.data.shard_counts import shard_counts as counts_of
from acc_clip.errors import DataError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def webdataset_count(path: Path) -> int:
    return sum(1 for _ in tarfile_samples([{"url": str(path)}], handler=wds.ignore_and_continue))


def add(tar: tarfile.TarFile, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def odd_tar(path: Path, tar_format: int) -> Path:
    """Keys in sub-folders, long names (pax or GNU), members without a key, webdataset's meta names,
    a folder and a link member, a key repeated after another, sizes that are and are not whole blocks."""
    long_dir = "d" * 120
    with tarfile.open(path, "w", format=tar_format) as tar:
        add(tar, "a/0001.jpg", b"i" * 700)
        add(tar, "a/0001.txt", b"cat")
        add(tar, "b/0001.jpg", b"j" * 512)  # same base name, other folder: another sample
        add(tar, f"{long_dir}/0002.jpg", b"k" * 1000)
        add(tar, f"{long_dir}/0002.cls", b"1")
        add(tar, f"{'e' * 120}/0002.cls", b"1")  # differs in the long folder only: another sample
        add(tar, "nokey", b"?")  # no dot: webdataset skips it
        add(tar, ".hidden.txt", b"?")  # no key before the dot
        add(tar, "__meta__", b"m")
        add(tar, "__skip__/x.txt", b"m")
        add(tar, "folder", kind=tarfile.DIRTYPE)
        add(tar, "0003.jpg", b"l" * 3)
        add(tar, "link.jpg", kind=tarfile.SYMTYPE)
        add(tar, "0003.txt", b"dog")
        add(tar, "0004.jpg", b"m" * 1024)
        add(tar, "0003.json", b"{}")  # key 0003 again after 0004: webdataset starts a new sample
        add(tar, "ünïcode.jpg", b"u" * 10)
    return path


FORMATS = [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]


@pytest.mark.parametrize("tar_format", FORMATS)
def test_header_count_equals_webdataset_on_odd_tars(tmp_path, tar_format):
    path = odd_tar(tmp_path / "odd.tar", tar_format)
    assert webdataset_count(path) == 8
    assert count_tar_headers(str(path)) == 8
    with open(path, "rb") as file:  # ustar's prefix or pax's path hold the long folder; GNU's goes to tarfile
        fast = shard_counts._count_plain_headers(file, path.stat().st_size)
    assert fast == (None if tar_format == tarfile.GNU_FORMAT else 8)


def test_shard_writer_tars_take_the_fast_path(tmp_path):
    shards = write_shards(tmp_path / "set", [6])
    with open(shards[0], "rb") as file:
        assert shard_counts._count_plain_headers(file, os.path.getsize(shards[0])) == 6


@pytest.mark.parametrize("tar_format", FORMATS)
def test_header_count_equals_webdataset_on_a_tar_cut_anywhere(tmp_path, tar_format):
    whole = odd_tar(tmp_path / "odd.tar", tar_format).read_bytes()
    cut = tmp_path / "cut.tar"
    for end in sorted({*range(0, len(whole), 256), *range(1, len(whole), 509)}):
        cut.write_bytes(whole[:end])
        expected = webdataset_count(cut)
        if end >= 512:  # less than one header is no tar: the count falls back to webdataset's reading
            assert count_tar_headers(str(cut)) == expected, f"cut at byte {end}"
        assert shard_counts.count_shard(str(cut)) == expected, f"cut at byte {end}"


def test_a_compressed_tar_is_read_through_webdataset(tmp_path):
    path = tmp_path / "set.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for key in range(3):
            add(tar, f"{key}.txt", b"t")
    assert count_tar_headers(str(path)) is None
    assert shard_counts.count_shard(str(path)) == 3


def write_shards(folder: Path, counts: list[int]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    pattern = str(folder / "%05d.tar")
    with wds.ShardWriter(pattern, maxcount=max(counts)) as sink:
        for key in range(sum(counts)):
            sink.write({"__key__": f"{key:06d}", "jpg": b"j" * 100, "txt": f"caption {key}".encode()})
    return [pattern % i for i in range(len(counts))]


def test_counts_of_a_shard_writer_set_are_cached_and_a_changed_shard_counted_again(tmp_path):
    shards = write_shards(tmp_path / "set", [5, 5, 2])
    assert counts_of(shards) == [5, 5, 2]
    cache_files = os.listdir(shard_counts.cache_folder())
    assert len(cache_files) == 1
    # The cache is used: a count planted there is what comes back while the shard is unchanged...
    cache_path = os.path.join(shard_counts.cache_folder(), cache_files[0])
    document = json.loads(Path(cache_path).read_text())
    document["shards"][os.path.abspath(shards[0])]["samples"] = 99
    Path(cache_path).write_text(json.dumps(document))
    assert counts_of(shards) == [99, 5, 2]
    # ...and never once the shard changed (here: rewritten with another count).
    with wds.TarWriter(shards[0]) as sink:
        for key in range(3):
            sink.write({"__key__": f"k{key}", "txt": b"t"})
    assert counts_of(shards) == [3, 5, 2]


def test_img2dataset_stats_are_used_without_opening_the_tar(tmp_path):
    shards = write_shards(tmp_path / "set", [4, 4])
    for number, successes in enumerate([7, 1]):  # not what the tars hold: proves where the count came from
        stats = {"count": 10, "successes": successes, "failed_to_download": 3, "failed_to_resize": 0, "duration": 1.0}
        Path(shards[number][: -len(".tar")] + "_stats.json").write_text(json.dumps(stats))
    assert counts_of(shards) == [7, 1]
    assert not os.path.exists(shard_counts.cache_folder())  # nothing was counted


def test_acc_clip_stats_are_not_taken_for_img2dataset_counts(tmp_path):
    shards = write_shards(tmp_path / "set", [4])
    Path(shards[0][: -len(".tar")] + "_stats.json").write_text(json.dumps({"shard": "00000.tar", "count": 9}))
    assert counts_of(shards) == [4]


def test_sizes_json_comes_first_and_a_damaged_one_is_an_error(tmp_path):
    shards = write_shards(tmp_path / "set", [4, 4])
    (tmp_path / "set" / "sizes.json").write_text(json.dumps({"00000.tar": 2, "00001.tar": 3}))
    assert counts_of(shards) == [2, 3]
    (tmp_path / "set" / "sizes.json").write_text("{not json")
    with pytest.raises(DataError, match=r"sizes\.json: not a readable sizes\.json"):
        counts_of(shards)


def test_remote_shards_have_counts_only_once_indexed(tmp_path):
    shards = write_shards(tmp_path / "set", [3, 2])
    remote = [f"pipe:cat {shard}" for shard in shards]
    assert counts_of(remote) is None
    assert count_and_cache(remote) == dict(zip(remote, [3, 2]))
    assert counts_of(remote) == [3, 2]
    assert counts_of(remote[:1] + ["pipe:cat other.tar"]) is None

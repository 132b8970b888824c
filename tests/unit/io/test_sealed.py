"""Sealed folders (acc_clip/io/sealed.py): `seal` writes the manifest of every file with its size and
SHA-256, `read_sealed` gives it back after checking every file, and names what is wrong otherwise: a flipped
byte, a missing or cut file, a missing or damaged manifest, an interrupted save."""

from __future__ import annotations

import json

import pytest

from acc_clip.errors import CheckpointError
from acc_clip.io.files import file_sha256
from acc_clip.io.sealed import MANIFEST, folder_bytes, list_files, read_sealed, seal

SOURCE = "--resume"


@pytest.fixture
def sealed(tmp_path):
    """A sealed folder of two files, one in a sub-folder (as a sharded checkpoint's shards lie)."""
    folder = tmp_path / "step_00000004"
    (folder / "shards").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(200)))
    (folder / "shards" / "__0_0.distcp").write_bytes(b"shard" * 10)
    seal(str(folder), {"format_version": 1, "global_step": 4})
    return folder


def test_seal_then_read_sealed_gives_the_record_and_every_file(sealed):
    manifest = read_sealed(str(sealed), SOURCE)
    assert manifest["format_version"] == 1 and manifest["global_step"] == 4
    assert manifest["files"] == {"model.safetensors": 200, "shards/__0_0.distcp": 50}
    assert manifest["sha256"] == {name: file_sha256(str(sealed / name)) for name in manifest["files"]}
    assert json.loads((sealed / MANIFEST).read_text()) == manifest
    # the manifest itself is not among the files it lists
    assert set(list_files(str(sealed))) == {"model.safetensors", "shards/__0_0.distcp", MANIFEST}
    assert folder_bytes(str(sealed)) == 250 + (sealed / MANIFEST).stat().st_size


def test_a_flipped_byte_is_named(sealed):
    data = bytearray((sealed / "model.safetensors").read_bytes())
    data[100] ^= 0x01  # same size: only the hash can tell
    (sealed / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        read_sealed(str(sealed), SOURCE)
    assert str(error.value) == (
        f"{SOURCE} {sealed}: damaged checkpoint, model.safetensors differs from what was saved (SHA-256 mismatch)"
    )


def test_a_missing_file_is_named(sealed):
    (sealed / "shards" / "__0_0.distcp").unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"^{SOURCE} .*step_00000004: damaged checkpoint, "
        r"shards/__0_0\.distcp is missing$",
    ):
        read_sealed(str(sealed), SOURCE)


def test_a_cut_file_is_named_with_both_sizes(sealed):
    with open(sealed / "model.safetensors", "r+b") as file:
        file.truncate(120)
    with pytest.raises(
        CheckpointError,
        match=r"damaged checkpoint, model\.safetensors has 120 bytes, the manifest "
        r"says 200$",
    ):
        read_sealed(str(sealed), SOURCE)


def test_a_missing_folder_or_a_file_is_named(tmp_path, sealed):
    with pytest.raises(CheckpointError, match=rf"^--checkpoint {tmp_path / 'nowhere'}: no such file or folder$"):
        read_sealed(str(tmp_path / "nowhere"), "--checkpoint")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a checkpoint folder$"):
        read_sealed(str(sealed / "model.safetensors"), SOURCE)


def test_a_folder_without_a_manifest_is_not_read_and_points_at_those_inside(tmp_path, sealed):
    """A run folder holds checkpoints under checkpoints/: the line names the newest one."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    sealed.rename(run / "checkpoints" / sealed.name)
    with pytest.raises(CheckpointError) as error:
        read_sealed(str(run), SOURCE)
    assert str(error.value) == (
        f"{SOURCE} {run}: not an acc_clip checkpoint (no {MANIFEST}); it holds checkpoints, "
        f"e.g. {run / 'checkpoints' / sealed.name}"
    )
    partial = tmp_path / ".tmp-step_00000008"
    partial.mkdir()
    with pytest.raises(CheckpointError, match=rf"an interrupted save \(no {MANIFEST}\), not a checkpoint$"):
        read_sealed(str(partial), SOURCE)


@pytest.mark.parametrize(
    "content", ["{not json", '{"files": {}}', "[1, 2]", '{"files": {"model.safetensors": 200}, "sha256": [1]}']
)
def test_a_damaged_manifest_is_named(sealed, content):
    (sealed / MANIFEST).write_text(content)
    with pytest.raises(CheckpointError, match=rf"^{SOURCE} .*step_00000004: {MANIFEST} is damaged"):
        read_sealed(str(sealed), SOURCE)


def test_a_manifest_from_before_hashes_is_checked_by_size(sealed):
    """Older manifests hold no "sha256": sizes are checked, a same-size change goes unseen."""
    manifest = json.loads((sealed / MANIFEST).read_text())
    del manifest["sha256"]
    (sealed / MANIFEST).write_text(json.dumps(manifest))
    (sealed / "model.safetensors").write_bytes(bytes(200))
    assert read_sealed(str(sealed), SOURCE)["global_step"] == 4
    (sealed / "model.safetensors").write_bytes(bytes(199))
    with pytest.raises(CheckpointError, match="has 199 bytes, the manifest says 200"):
        read_sealed(str(sealed), SOURCE)

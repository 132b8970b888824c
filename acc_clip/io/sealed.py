"""Sealed folders: a folder whose manifest (`complete.json`), written last, lists every file under it
with its size and SHA-256. A folder without the manifest is never read as complete, and one whose files
differ from it (a cut copy, a flipped bit) is refused by name. Checkpoints are sealed folders
(checkpoint/manifest.py adds what a checkpoint records); reading weights from one (model/weights.py)
needs only the seal.

Manifests written before hashes were recorded (no "sha256") are checked by size only."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from acc_clip.errors import CheckpointError
from acc_clip.io.files import file_sha256

MANIFEST = "complete.json"


def list_files(folder: str) -> dict[str, int]:
    """Every file under `folder` by its relative path ('/'-separated), with its size: the manifest's
    `files`. A sharded checkpoint's shards lie in sub-folders (pytorch_model_fsdp_0/__0_0.distcp, ...)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return dict(sorted(files.items()))


def folder_bytes(folder: str) -> int:
    return sum(list_files(folder).values())


def seal(folder: str, record: dict[str, Any], known: dict[str, tuple[int, str]] | None = None) -> None:
    """Write the manifest: `record` plus every file with its size and hash; `known` gives {file: (size, hash)}
    already computed (by the processes that wrote them), the others are hashed here. Call it once the files
    are complete; the caller flushes and renames the folder into place."""
    known = known or {}
    files = list_files(folder)
    hashes = {}
    for name, size in files.items():
        size_and_hash = known.get(name)
        if size_and_hash is not None and size_and_hash[0] == size:
            hashes[name] = size_and_hash[1]
        else:
            hashes[name] = file_sha256(os.path.join(folder, name))
    manifest = {**record, "files": files, "sha256": hashes}
    with open(os.path.join(folder, MANIFEST), "w") as file:
        json.dump(manifest, file, indent=1)


def sealed_inside(path: str) -> list[str]:
    """Sealed folders one or two levels inside `path` (a run folder holds them under checkpoints/), by name."""
    found = []
    for pattern in ("*", os.path.join("*", "*")):
        found += [os.path.dirname(m) for m in glob.glob(os.path.join(path, pattern, MANIFEST))]
    return sorted(found, key=os.path.basename)


def read_record(path: str, source: str) -> dict[str, Any]:
    """A sealed folder's manifest as it was written, without checking the files against it (read_sealed does):
    for what it says about the folder, before the files are read and checked."""
    return _load(path, os.path.join(path, MANIFEST), source)


def read_sealed(path: str, source: str) -> dict[str, Any]:
    """The manifest of a sealed folder, after checking every file it lists (size and hash); else one line
    naming `source` and `path` and what is wrong."""
    if not os.path.exists(path):
        raise CheckpointError(f"{source} {path}: no such file or folder")
    if not os.path.isdir(path):
        raise CheckpointError(f"{source} {path}: not a checkpoint folder")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        if os.path.basename(os.path.normpath(path)).startswith(".tmp-"):
            raise CheckpointError(f"{source} {path}: an interrupted save (no {MANIFEST}), not a checkpoint")
        inside = sealed_inside(path)
        hint = f"; it holds checkpoints, e.g. {inside[-1]}" if inside else ""
        raise CheckpointError(f"{source} {path}: not an acc_clip checkpoint (no {MANIFEST}){hint}")
    manifest = _load(path, manifest_path, source)
    for name, size in manifest["files"].items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{source} {path}: damaged checkpoint, {name} is missing")
        if os.path.getsize(file_path) != size:
            raise CheckpointError(
                f"{source} {path}: damaged checkpoint, {name} has {os.path.getsize(file_path)} "
                f"bytes, the manifest says {size}"
            )
    check_hashes(path, manifest.get("sha256", {}), source)
    return manifest


def _load(path: str, manifest_path: str, source: str) -> dict[str, Any]:
    try:
        with open(manifest_path, encoding="utf-8") as file:
            manifest = json.load(file)
        if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) and manifest["files"]):
            raise TypeError
    except (ValueError, TypeError):  # ValueError: not JSON, not UTF-8
        raise CheckpointError(f"{source} {path}: {MANIFEST} is damaged") from None
    except OSError as error:
        raise CheckpointError(f"{source} {path}: cannot read {MANIFEST} ({error.strerror or error})") from None
    return manifest


def check_hashes(path: str, hashes: dict | None, source: str) -> None:
    """Refuse, naming the file, a folder whose content is not what was sealed: sizes catch a cut file,
    only a hash catches a bit flipped in place (a weight of 3.0 read back as 5.9e-39)."""
    if not isinstance(hashes, dict):
        raise CheckpointError(f"{source} {path}: {MANIFEST} is damaged (sha256 is not a mapping)")
    for name, expected in sorted(hashes.items()):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{source} {path}: damaged checkpoint, {name} is missing")
        try:
            actual = file_sha256(os.path.join(path, name))
        except OSError as error:
            raise CheckpointError(f"{source} {path}: cannot read {name} ({error.strerror or error})") from None
        if actual != expected:
            raise CheckpointError(
                f"{source} {path}: damaged checkpoint, {name} differs from what was saved (SHA-256 mismatch)"
            )

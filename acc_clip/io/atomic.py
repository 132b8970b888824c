"""Writes that never leave half a file: the one atomic writer, the flushes a commit needs, and the one
line a failed save becomes.

`write_atomically(path, content)` writes to `path + ".tmp"` in the same folder, flushes it to disk and
renames it over `path`, so `path` holds its old content or all of the new one. A write that fails (a
full disk, a folder that cannot be written) removes the temporary file and is one line; whatever `path`
held before is kept."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from acc_clip.errors import ResourceError, UsageError, describe_error

Content = str | bytes | Callable[[str], None]  # text, bytes, or a function that writes the file at a path
TEMPORARY_SUFFIX = ".tmp"
# How a full disk shows up in the words of Python, torch ("PytorchStreamWriter failed writing file") and
# safetensors ("IoError ... StorageFull").
DISK_FULL_SIGNS = ("No space left", "StorageFull", "file write failed", "Disk quota exceeded")


def write_atomically(path: str, content: Content, *, needed_bytes: int = 0) -> None:
    """Replace `path` with `content` all at once (see the module docstring). `needed_bytes`: about how much
    the write needs, for the message when the disk is full (the size of text or bytes is known)."""
    partial = path + TEMPORARY_SUFFIX
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # a path given wrong, not a machine that failed
        raise UsageError(f"cannot write {path}: no folder {folder}")
    try:
        if callable(content):
            content(partial)
        else:
            with open(partial, "w" if isinstance(content, str) else "wb") as file:
                file.write(content)
        fsync_entry(partial)
        os.replace(partial, path)  # same folder, so a rename
    except Exception as error:  # torch reports a full disk as RuntimeError "[enforce fail at inline_container.cc...]"
        remove_path(partial)
        size = needed_bytes or (len(content) if not callable(content) else 0)
        raise ResourceError(
            save_failure(path, os.path.dirname(os.path.abspath(path)), describe_error(error), size)
        ) from None


def save_failure(what: str, directory: str, failure: str, needed_bytes: int) -> str:
    """One line for a save that failed. A full disk hides behind the writers' own words: say it is the disk,
    how much the save needs and how much is free (measured after the partial save was removed)."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:  # the folder itself is gone or unreadable: the failure says enough
        free = needed_bytes
    if free < needed_bytes or any(sign in failure for sign in DISK_FULL_SIGNS):
        failure = (
            f"no space left on the disk of {directory} (the save needs about {needed_bytes / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB are free)"
        )
    return f"{what} could not be saved: {failure}; the partial save was removed, what was saved before is kept"


def fsync_entry(path: str) -> None:
    """Flush a file's data, or a folder's own entry (the names in it, so renames survive a power loss)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_folder(path: str, *, files: bool = True) -> None:
    """Every file's data first (unless `files` is False: flushed already), then the folder entry, so a power
    loss cannot leave a renamed but empty folder. Sub-folders (a sharded checkpoint's) in turn."""
    for name in os.listdir(path):
        child = os.path.join(path, name)
        if os.path.isdir(child):
            fsync_folder(child, files=files)
        elif files:
            fsync_entry(child)
    fsync_entry(path)


def remove_path(path: str) -> None:
    """Remove a file or a folder tree, if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)

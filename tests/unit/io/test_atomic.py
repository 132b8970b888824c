"""The one atomic writer (acc_clip/io/atomic.py): text, bytes or a function that writes the file; a write
that fails keeps what the path held, removes its `.tmp` and is one line; a full disk is named as such."""

from __future__ import annotations

import os
import shutil

import pytest

from acc_clip.errors import ResourceError, UsageError
from acc_clip.io import atomic
from acc_clip.io.atomic import DISK_FULL_SIGNS, fsync_folder, remove_path, save_failure, write_atomically


def test_text_bytes_and_a_callable_are_written_whole(tmp_path):
    write_atomically(str(tmp_path / "a.txt"), "text\n")
    write_atomically(str(tmp_path / "b.bin"), b"\x00\xffbytes")

    def writer(partial: str) -> None:
        assert partial == str(tmp_path / "c.pt") + ".tmp"  # the temporary file sits beside the target
        with open(partial, "w") as file:
            file.write("from a function")

    write_atomically(str(tmp_path / "c.pt"), writer)
    assert (tmp_path / "a.txt").read_text() == "text\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xffbytes"
    assert (tmp_path / "c.pt").read_text() == "from a function"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "c.pt"]


def test_a_replacement_replaces_the_old_content(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    write_atomically(str(path), "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]


def test_a_write_that_fails_midway_keeps_the_old_content_and_removes_the_tmp(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def half_then_fail(partial: str) -> None:
        with open(partial, "w") as file:
            file.write("half a")
        raise OSError(5, "Input/output error")

    with pytest.raises(ResourceError) as error:
        write_atomically(str(path), half_then_fail)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no f.txt.tmp left behind
    message = str(error.value)
    assert message.startswith(f"{path} could not be saved: OSError: [Errno 5] Input/output error")
    assert message.endswith("the partial save was removed, what was saved before is kept") and "\n" not in message


def test_a_rename_that_fails_keeps_the_old_content_and_removes_the_tmp(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")
    seen = []

    def failing_replace(source, target):
        with open(source) as file:
            seen.append(file.read())  # the new content was complete before the rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(ResourceError, match=f"^{path} could not be saved: no space left on the disk of {tmp_path} "):
        write_atomically(str(path), "new content")
    monkeypatch.undo()
    assert seen == ["new content"] and path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_a_new_file_that_fails_leaves_nothing(tmp_path):
    def fails(partial: str) -> None:
        with open(partial, "w") as file:
            file.write("half")
        raise OSError(5, "Input/output error")

    with pytest.raises(ResourceError):
        write_atomically(str(tmp_path / "f.txt"), fails)
    assert os.listdir(tmp_path) == []


def test_a_path_in_a_folder_that_is_not_there_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"cannot write .*f\.txt: no folder .*missing_folder$"):
        write_atomically(str(tmp_path / "missing_folder" / "f.txt"), "x")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "failure",
    [
        "OSError: [Errno 28] No space left on device",
        "RuntimeError: [enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/3: "
        "file write failed",
        "SafetensorError: Error while serializing: IoError(Os { code: 28, kind: StorageFull })",
        "OSError: [Errno 122] Disk quota exceeded",
    ],
)
def test_save_failure_names_the_disk_when_the_writer_says_it_is_full(tmp_path, failure):
    line = save_failure("checkpoint step_00000010", str(tmp_path), failure, 2_500_000)
    assert any(sign in failure for sign in DISK_FULL_SIGNS)
    assert line.startswith(
        f"checkpoint step_00000010 could not be saved: no space left on the disk of {tmp_path} "
        "(the save needs about 2.5 MB, "
    )
    assert " MB are free); the partial save was removed, what was saved before is kept" in line


def test_save_failure_names_the_disk_when_the_save_needs_more_than_is_free(tmp_path):
    """A writer's words may not say it (an exception type of its own): the free space does."""
    free = shutil.disk_usage(tmp_path).free
    line = save_failure("weights", str(tmp_path), "WeirdError: write error", free + 10**9)
    assert f"no space left on the disk of {tmp_path}" in line and "WeirdError" not in line


def test_save_failure_keeps_the_writer_s_words_for_any_other_failure(tmp_path):
    assert (
        save_failure("x.pt", str(tmp_path), "PermissionError: [Errno 13] Permission denied", 10)
        == "x.pt could not be saved: PermissionError: [Errno 13] Permission denied; the partial save was removed, "
        "what was saved before is kept"
    )
    # A folder that is gone: the failure says enough (no disk usage to measure).
    gone = save_failure("x.pt", str(tmp_path / "gone"), "FileNotFoundError: x", 10)
    assert gone.startswith("x.pt could not be saved: FileNotFoundError: x")


def test_remove_path_and_fsync_folder(tmp_path):
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_text("x")
    (tmp_path / "file").write_text("y")
    fsync_folder(str(tmp_path / "tree"))
    remove_path(str(tmp_path / "tree"))
    remove_path(str(tmp_path / "file"))
    remove_path(str(tmp_path / "never_there"))
    assert os.listdir(tmp_path) == []

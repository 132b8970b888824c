"""The run folder's wandb id (acc_clip/runtime/run_dir.py): made once per run folder, read back on every
resume, written atomically, refused in one line when it is not an id."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from acc_clip.errors import AccClipError
from acc_clip.runtime import run_dir as run_dir_module
from acc_clip.runtime.run_dir import WANDB_ID, WANDB_ID_FILE, wandb_run_id


def test_the_first_start_makes_an_id_and_every_later_start_reads_it(tmp_path):
    first = wandb_run_id(str(tmp_path))
    assert WANDB_ID.fullmatch(first) and (tmp_path / WANDB_ID_FILE).read_text() == first + "\n"
    assert wandb_run_id(str(tmp_path)) == wandb_run_id(str(tmp_path)) == first


def test_a_new_run_folder_gets_a_new_id(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert wandb_run_id(str(tmp_path / "a")) != wandb_run_id(str(tmp_path / "b"))


def test_an_id_written_by_hand_continues_that_wandb_run(tmp_path):
    (tmp_path / WANDB_ID_FILE).write_text("open-clip_run.7\n")
    assert wandb_run_id(str(tmp_path)) == "open-clip_run.7"


@pytest.mark.parametrize("content", ["", "\n", "a/b", "x?y", "two words"])
def test_a_file_that_holds_no_id_is_named_in_one_line(tmp_path, content):
    (tmp_path / WANDB_ID_FILE).write_text(content)
    with pytest.raises(AccClipError, match=f"^{tmp_path / WANDB_ID_FILE} holds .*, not a wandb run id") as raised:
        wandb_run_id(str(tmp_path))
    assert "\n" not in str(raised.value)


def test_the_id_file_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """Written to a temporary file and renamed: a failure before the rename leaves neither file."""

    def failing_rename(source, target):
        assert Path(source).read_text().strip(), "the temporary file holds the id before the rename"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_dir_module.os, "replace", failing_rename)
    # One line naming the file and the disk (io/atomic.save_failure), no longer "cannot write PATH: No space ...".
    with pytest.raises(
        AccClipError,
        match=rf"^{re.escape(str(tmp_path / WANDB_ID_FILE))} could not be saved: no space "
        rf"left on the disk of {re.escape(str(tmp_path))} \(",
    ) as raised:
        wandb_run_id(str(tmp_path))
    assert "\n" not in str(raised.value)
    assert os.listdir(tmp_path) == []

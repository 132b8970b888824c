"""How a step save commits (acc_clip/checkpoint/folders.py): commit_folder's two renames around the
"between_renames" fault point, and restore_moved_aside putting back what a kill there left aside. The
kill is recorded, not sent (os.kill replaced), so the folder's state at that moment can be looked at."""

from __future__ import annotations

import dataclasses
import os

from acc_clip.checkpoint import folders
from acc_clip.checkpoint.folders import OLD_PREFIX, Progress, commit_folder, restore_moved_aside, step_name
from acc_clip.io.sealed import seal
from acc_clip.runtime import faults
from acc_clip.runtime.faults import KILL_AT_ENV, kill_at


def sealed_step(directory, name: str, content: bytes) -> str:
    folder = directory / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(content)
    seal(str(folder), {"format_version": folders.FORMAT_VERSION, "progress": vars(Progress(global_step=3))})
    return str(folder)


def test_a_new_step_is_renamed_into_place(tmp_path):
    partial = sealed_step(tmp_path, ".tmp-" + step_name(3), b"new")
    commit_folder(partial, str(tmp_path / step_name(3)), 3)
    assert os.listdir(tmp_path) == ["step_00000003"]


def test_replacing_a_step_moves_the_old_aside_and_the_kill_point_lies_between_the_renames(tmp_path, monkeypatch):
    at_kill = []  # the names in the folder each time the fault point would kill the process
    monkeypatch.setattr(faults.os, "kill", lambda pid, signum: at_kill.append(sorted(os.listdir(tmp_path))))
    sealed_step(tmp_path, step_name(3), b"old")
    partial = sealed_step(tmp_path, ".tmp-" + step_name(3), b"new")
    monkeypatch.setenv(KILL_AT_ENV, kill_at("between_renames", 3)[KILL_AT_ENV])
    commit_folder(partial, str(tmp_path / step_name(3)), 3)
    # At the kill: the old copy aside, the new one not yet named; neither name holds half a checkpoint.
    assert at_kill == [[f"{OLD_PREFIX}step_00000003", ".tmp-step_00000003"]]
    assert os.listdir(tmp_path) == ["step_00000003"]
    assert (tmp_path / step_name(3) / "model.safetensors").read_bytes() == b"new"


def test_restore_moved_aside_puts_back_what_a_kill_between_the_renames_left(tmp_path):
    sealed_step(tmp_path, OLD_PREFIX + step_name(3), b"old")  # the only committed copy of step 3
    sealed_step(tmp_path, OLD_PREFIX + step_name(5), b"old5")
    sealed_step(tmp_path, step_name(5), b"new5")  # the kill came after the second rename: left to the clean-up
    (tmp_path / (OLD_PREFIX + step_name(7))).mkdir()  # no manifest: not a checkpoint
    assert restore_moved_aside(str(tmp_path)) == ["step_00000003"]
    assert (tmp_path / step_name(3) / "model.safetensors").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == sorted(
        [step_name(3), step_name(5), OLD_PREFIX + step_name(5), OLD_PREFIX + step_name(7)]
    )


def test_a_copy_of_the_progress_keeps_its_position_while_training_goes_on():
    """An asynchronous save writes its manifest from a copy (dataclasses.replace) made at the save, while the loop
    advances the progress: the copy's segments must not move with it."""
    progress = Progress()
    progress.enter_layout({"batch_size": 8, "world_size": 2})
    progress.advance(1, 16, micro_batches=2)
    saved = dataclasses.replace(progress)
    progress.advance(2, 16, micro_batches=2)
    progress.enter_layout({"batch_size": 4, "world_size": 4})
    assert saved.segments == [{"layout": {"batch_size": 8, "world_size": 2}, "batches": 2}]
    assert progress.segments[0]["batches"] == 4 and len(progress.segments) == 2
    progress.finish_epoch(0)
    assert (progress.epoch, progress.step_in_epoch, progress.segments) == (1, 0, [])

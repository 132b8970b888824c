"""How a step checkpoint's files are written (acc_clip/checkpoint/writer.py): the same files Accelerate's own
save_state writes, from a copy that later steps cannot change; who hashes which file; and the manager's
asynchronous save: training goes on, the folder is committed only once written, a failure is one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from acc_clip.checkpoint.folders import TMP_PREFIX, Progress, complete_checkpoints
from acc_clip.checkpoint.writer import BackgroundFiles, owner, write_in_step
from acc_clip.errors import ResourceError
from acc_clip.io.files import file_sha256
from acc_clip.io.sealed import MANIFEST, read_sealed
from helpers import make_manager_parts, train_a_step


@pytest.fixture
def manager_parts(tmp_path):
    yield make_manager_parts(tmp_path / "run")
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_files_are_those_accelerates_save_state_writes(manager_parts, tmp_path):
    accelerator, model, optimizer, manager = manager_parts
    manager()  # registers the manager's save hook (plain weight names), as in a run
    train_a_step(model, optimizer)
    rng = torch.get_rng_state()
    accelerator.save_state(str(tmp_path / "accelerate"))
    torch.set_rng_state(rng)
    ours = str(tmp_path / "ours")
    BackgroundFiles(write_in_step(accelerator, model, optimizer, ours), ours, 0, 1, background=False).result()
    theirs = tmp_path / "accelerate"
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    assert file_sha256(f"{ours}/model.safetensors") == file_sha256(str(theirs / "model.safetensors"))
    for name in ("optimizer.bin", "random_states_0.pkl"):
        mine, accelerates = (torch.load(p, weights_only=False) for p in (f"{ours}/{name}", theirs / name))
        assert repr(mine) == repr(accelerates), name  # tensors, RNG states, step: every value printed equal


def test_the_copy_is_taken_in_the_step_and_later_steps_do_not_change_it(manager_parts, tmp_path):
    accelerator, model, optimizer, _ = manager_parts
    train_a_step(model, optimizer)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    folder = str(tmp_path / "save")
    snapshot = write_in_step(accelerator, model, optimizer, folder)
    train_a_step(model, optimizer)  # the in-place update a background write races with
    BackgroundFiles(snapshot, folder, 0, 1, background=True).result()
    from safetensors.torch import load_file

    written = load_file(f"{folder}/model.safetensors")
    assert all(torch.equal(written[key], value) for key, value in before.items())
    assert not all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


@pytest.mark.parametrize(
    "name, rank",
    [
        ("model.safetensors", 0),
        ("optimizer.bin", 0),
        ("random_states_3.pkl", 3),
        ("pytorch_model_fsdp_0/__5_0.distcp", 5),
        ("pytorch_model_fsdp_0/.metadata", 0),
        ("optimizer_0/__12_0.distcp", 12),
    ],
)
def test_each_file_is_hashed_by_the_process_that_wrote_it(name, rank):
    assert owner(name) == rank


def test_an_asynchronous_save_is_committed_once_written_and_resumes_exactly(manager_parts):
    _accelerator, model, optimizer, manager = manager_parts
    saver = manager(async_save=True)
    train_a_step(model, optimizer)
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    final = saver.save(model, optimizer, Progress(epoch=0, step_in_epoch=4, global_step=4, samples_seen=64))
    train_a_step(model, optimizer)  # training goes on while the files are written
    while Path(saver.directory, TMP_PREFIX + "step_00000004").exists() and not os.path.exists(final):
        saver.poll()
    assert complete_checkpoints(saver.directory) == [final]
    manifest = read_sealed(final, "test")  # every file hashed, and the hashes hold
    assert set(manifest["sha256"]) == {"model.safetensors", "optimizer.bin", "random_states_0.pkl"}
    assert json.loads(Path(final, MANIFEST).read_text())["progress"]["global_step"] == 4
    manager(resume="latest").resume(model, optimizer, 10)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())


def test_a_failed_background_write_is_one_line_and_keeps_what_was_saved(manager_parts, monkeypatch):
    _accelerator, model, optimizer, manager = manager_parts
    saver = manager(async_save=True)
    first = saver.save(model, optimizer, Progress(global_step=1))
    saver.complete()

    def full_disk(self, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("acc_clip.checkpoint.writer.Snapshot.write", full_disk)
    saver.save(model, optimizer, Progress(global_step=2))  # the step goes on; the failure comes at the commit
    with pytest.raises(ResourceError, match="checkpoint step_00000002 could not be saved: no space left on the disk"):
        saver.complete()
    assert complete_checkpoints(saver.directory) == [first]
    assert not [name for name in os.listdir(saver.directory) if name.startswith(TMP_PREFIX)]

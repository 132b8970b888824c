"""The CheckpointManager in the test process, on a tiny model (helpers.make_manager_parts): step
checkpoints restore weights, optimizer, random streams and progress; keep-K pruning and the epoch files
(open_clip's epoch_N.pt, --save-most-recent, --delete-previous-checkpoint); nothing non-finite is saved;
--resume latest falls back past damaged checkpoints; a full disk during a save is one line and keeps
what was saved before; bad --resume input is one line; the fp16 grad scaler's state goes through a step
checkpoint and an epoch file; a resume with other data settings warns; a start puts back a checkpoint
that a kill between the two renames of a commit left moved aside. Then the remote copy (RemoteSync):
what it copies, fetches and prunes, and never of another run.

The trainer's side of these (real runs, kills, exit statuses) is in tests/integration/test_checkpoint.py
and test_resume*.py."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from acc_clip.checkpoint.folders import OLD_PREFIX, SCALER_FILE, TMP_PREFIX, Progress, complete_checkpoints
from acc_clip.checkpoint.manager import rewind_jsonl, save_torch
from acc_clip.checkpoint.remote_sync import RemoteSync
from acc_clip.errors import CheckpointError, DivergedError, ResourceError, UsageError
from acc_clip.io.files import file_sha256
from acc_clip.io.sealed import MANIFEST
from acc_clip.runtime import parallel
from helpers import TinyNet, fill_disk, flip_a_bit, make_manager_parts, small_disk, train_a_step


@pytest.fixture
def manager_parts(tmp_path):
    """(accelerator, model, optimizer, manager(**settings)) on tmp_path/run: see helpers.make_manager_parts."""
    yield make_manager_parts(tmp_path / "run")
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def scaled_manager_parts(tmp_path):
    """manager_parts with a real grad scaler in Accelerate's place (see helpers.make_manager_parts)."""
    yield make_manager_parts(tmp_path / "run", grad_scaler=True)
    AcceleratorState._reset_state(reset_partial_state=True)


# saves and resumes ---------------------------------------------------------------------------------


def test_save_and_resume_restore_weights_optimizer_rng_and_progress(manager_parts):
    _accelerator, model, optimizer, manager = manager_parts
    saver = manager()
    train_a_step(model, optimizer)
    saved = saver.save(model, optimizer, Progress(epoch=1, step_in_epoch=3, global_step=13, samples_seen=208))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    next_draw = torch.rand(3)

    train_a_step(model, optimizer)  # move everything on, then go back
    resumed = manager(resume="latest").resume(model, optimizer, 10)
    assert resumed == Progress(epoch=1, step_in_epoch=3, global_step=13, samples_seen=208)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moment)
    assert torch.equal(torch.rand(3), next_draw)  # the RNG continues where the save left it
    manifest = json.loads(Path(saved, MANIFEST).read_text())
    assert manifest["data"]["next_micro_batch"] == 3 and manifest["files"]["model.safetensors"] > 0


def test_keep_checkpoints_keeps_the_newest_and_a_crashed_partial_is_removed(manager_parts, tmp_path):
    _accelerator, model, optimizer, manager = manager_parts
    saver = manager(keep_checkpoints=2)
    for step in (1, 2, 3):
        saver.save(model, optimizer, Progress(global_step=step))
    folder = Path(saver.directory)
    assert [p.name for p in sorted(folder.iterdir())] == ["step_00000002", "step_00000003"]
    (folder / f"{TMP_PREFIX}step_00000004").mkdir()
    manager(keep_checkpoints=2)  # a new start cleans up
    assert not (folder / f"{TMP_PREFIX}step_00000004").exists()

    # a second save of the same step (epoch end after a step save) replaces the first
    saver.save(model, optimizer, Progress(epoch=1, global_step=3))
    assert [os.path.basename(c) for c in complete_checkpoints(saver.directory)] == ["step_00000002", "step_00000003"]
    assert json.loads((folder / "step_00000003" / MANIFEST).read_text())["progress"]["epoch"] == 1
    assert not [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_epoch_saves_follow_save_frequency_most_recent_and_delete_previous(manager_parts):
    _accelerator, model, optimizer, manager = manager_parts
    saver = manager(
        epochs=5, save_frequency=2, save_most_recent=True, delete_previous_checkpoint=True, keep_checkpoints=0
    )
    folder = Path(saver.directory)

    def epoch_files() -> dict[str, int]:
        return {p.name: torch.load(p, weights_only=True)["epoch"] for p in sorted(folder.glob("epoch_*.pt"))}

    saver.end_of_epoch(model, optimizer, Progress(epoch=1, global_step=10))
    assert epoch_files() == {"epoch_latest.pt": 1}  # not due, but the most recent is kept
    saver.end_of_epoch(model, optimizer, Progress(epoch=2, global_step=20))
    assert epoch_files() == {"epoch_2.pt": 2, "epoch_latest.pt": 2}
    saver.end_of_epoch(model, optimizer, Progress(epoch=3, global_step=30))
    assert epoch_files() == {"epoch_2.pt": 2, "epoch_latest.pt": 3}  # nothing deleted before a new one exists
    saver.end_of_epoch(model, optimizer, Progress(epoch=5, global_step=50))  # the last epoch is always saved
    assert epoch_files() == {"epoch_5.pt": 5, "epoch_latest.pt": 5}
    assert [os.path.basename(c) for c in complete_checkpoints(saver.directory)] == [
        "step_00000010",
        "step_00000020",
        "step_00000030",
        "step_00000050",
    ]


def test_fsdp_checkpoint_sharded_makes_the_step_checkpoint_the_epoch_save(manager_parts, monkeypatch, caplog):
    """--fsdp-checkpoint sharded: under FSDP the epoch's end writes no gathered epoch_N.pt, only its (sharded)
    step checkpoint (FSDP stood in for here; the real one: tests/integration/test_fsdp_flags.py); without
    FSDP the flag is announced and epoch_N.pt written as ever."""
    _accelerator, model, optimizer, manager = manager_parts
    with caplog.at_level(logging.WARNING):
        saver = manager(epochs=2, fsdp_checkpoint="sharded")
    assert "--fsdp-checkpoint sharded has no effect without FSDP" in caplog.text
    saver.end_of_epoch(model, optimizer, Progress(epoch=1, global_step=10))
    assert os.path.exists(os.path.join(saver.directory, "epoch_1.pt"))
    monkeypatch.setattr(parallel, "is_fsdp", lambda accelerator: True)
    saver = manager(epochs=2, fsdp_checkpoint="sharded", save_most_recent=True)
    saver.end_of_epoch(model, optimizer, Progress(epoch=2, global_step=20))
    assert not os.path.exists(os.path.join(saver.directory, "epoch_2.pt"))
    assert not os.path.exists(os.path.join(saver.directory, "epoch_latest.pt"))
    assert [os.path.basename(c) for c in complete_checkpoints(saver.directory)][-1] == "step_00000020"


def test_non_finite_weights_are_never_saved(manager_parts):
    _accelerator, model, optimizer, manager = manager_parts
    saver = manager()
    with torch.no_grad():
        parallel.unwrap(model).layer.weight[0, 0] = float("inf")
    with pytest.raises(DivergedError, match="not finite after step 7"):
        saver.save(model, optimizer, Progress(global_step=7))
    assert complete_checkpoints(saver.directory) == []


def test_rewind_drops_the_records_made_after_the_resumed_checkpoint_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5)) + '{"step": 5, "lo')
    rewind_jsonl(str(path), 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_resume_latest_falls_back_to_the_newest_checkpoint_that_passes(manager_parts, caplog):
    _accelerator, model, optimizer, manager = manager_parts
    saver = manager()
    train_a_step(model, optimizer)
    saver.save(model, optimizer, Progress(global_step=1))
    weights_at_1 = {k: v.clone() for k, v in model.state_dict().items()}
    for step in (2, 3):
        train_a_step(model, optimizer)
        saver.save(model, optimizer, Progress(global_step=step))
    folder = Path(saver.directory)
    flip_a_bit(folder / "step_00000003" / "model.safetensors", offset_from_end=4)
    (folder / "step_00000002" / "optimizer.bin").write_bytes(
        b"x" * (folder / "step_00000002" / "optimizer.bin").stat().st_size
    )
    with caplog.at_level("WARNING"):
        resumed = manager(resume="latest").resume(model, optimizer, 10)
    assert resumed.global_step == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights_at_1.items())
    said = caplog.text
    assert "step_00000003: damaged checkpoint, model.safetensors differs" in said
    assert "step_00000002: damaged checkpoint, optimizer.bin differs" in said
    assert "resuming from " in said and "step_00000001, the newest checkpoint that passes" in said
    # kept for inspection, out of the step_ names: --keep-checkpoints would count them among the newest
    assert sorted(p.name for p in folder.iterdir()) == [
        "damaged-step_00000002",
        "damaged-step_00000003",
        "step_00000001",
    ]
    saver = manager(keep_checkpoints=1)
    saver.save(model, optimizer, Progress(global_step=2))
    assert [os.path.basename(c) for c in complete_checkpoints(saver.directory)] == ["step_00000002"]

    flip_a_bit(folder / "step_00000002" / "model.safetensors", offset_from_end=4)
    with pytest.raises(
        CheckpointError,
        match=r"none of the 1 checkpoint\(s\) in .* passes its manifest check "
        r"\(the newest, step_00000002",
    ):
        manager(resume="latest").resume(model, optimizer, 10)
    assert (folder / "step_00000002").is_dir()  # nothing renamed when there is nothing to resume from instead


@pytest.mark.parametrize("damage", [b"\xff\xfe not utf-8", b'{"files": [], "progress": {}}', b'{"files": {"a": 1}}'])
def test_a_damaged_manifest_is_named_and_skipped_never_a_traceback(manager_parts, damage):
    _accelerator, model, optimizer, manager = manager_parts
    saver = manager()
    saver.save(model, optimizer, Progress(global_step=1))
    (Path(saver.save(model, optimizer, Progress(global_step=2))) / MANIFEST).write_bytes(damage)
    assert manager(resume="latest").resume(model, optimizer, 10).global_step == 1


def test_a_random_state_file_that_cannot_be_read_is_an_error_not_a_log_line(manager_parts):
    """Accelerate logs "Could not load random states" at INFO and goes on; the resume would not be exact."""
    _accelerator, model, optimizer, manager = manager_parts
    saver = manager()
    saved = Path(saver.save(model, optimizer, Progress(global_step=4)))
    (saved / "random_states_0.pkl").write_bytes(b"not a pickle at all")
    manifest = json.loads((saved / MANIFEST).read_text())  # made to pass the manifest: only the load fails
    manifest["files"]["random_states_0.pkl"] = (saved / "random_states_0.pkl").stat().st_size
    manifest["sha256"]["random_states_0.pkl"] = file_sha256(str(saved / "random_states_0.pkl"))
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError,
        match=r"step_00000004: cannot read random_states_0\.pkl \(\w+\); the run's "
        "random streams could not be restored exactly$",
    ):
        manager(resume="latest").resume(model, optimizer, 10)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoint_before(manager_parts, tmp_path):
    _accelerator, model, optimizer, manager = manager_parts
    with small_disk(tmp_path / "run", "1m") as run:
        saver = manager()
        train_a_step(model, optimizer)
        saver.save(model, optimizer, Progress(global_step=1))
        weights_at_1 = {k: v.clone() for k, v in model.state_dict().items()}
        filler = fill_disk(run)
        train_a_step(model, optimizer)
        with pytest.raises(ResourceError) as raised:
            saver.save(model, optimizer, Progress(global_step=2))
        said = str(raised.value)
        assert "\n" not in said and said.startswith(
            "checkpoint step_00000002 could not be saved: no space left on "
            f"the disk of {run / 'checkpoints'} (the save needs about "
        )
        assert said.endswith("MB are free); the partial save was removed, what was saved before is kept"), said
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]

        with pytest.raises(
            ResourceError,
            match=r"epoch_1\.pt could not be saved: no space left on the disk of .*"
            r"the partial save was removed",
        ):
            save_torch({"weights": torch.zeros(10_000)}, str(run / "checkpoints" / "epoch_1.pt"))
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]

        filler.unlink()
        assert manager(resume="latest").resume(model, optimizer, 10).global_step == 1
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights_at_1.items())


def test_bad_resume_input_in_this_process(manager_parts, tmp_path):
    _accelerator, model, optimizer, manager = manager_parts
    with pytest.raises(CheckpointError, match=r"^--resume .*nope: no such file or folder$"):
        manager(resume=str(tmp_path / "nope")).resume(model, optimizer, 10)
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointError, match=r"notes: not an acc_clip checkpoint \(no complete.json\)$"):
        manager(resume=str(tmp_path / "notes")).resume(model, optimizer, 10)
    (tmp_path / "notes.txt").write_text("not torch")
    with pytest.raises(CheckpointError, match="not an open_clip checkpoint torch can read"):
        manager(resume=str(tmp_path / "notes.txt")).resume(model, optimizer, 10)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 1, "state_dict": TinyNet(outputs=5).state_dict()}, other)
    with pytest.raises(CheckpointError, match=r"weights of another architecture \('layer.weight' has shape \(5, 4\)"):
        manager(resume=str(other)).resume(model, optimizer, 10)


# the fp16 grad scaler, changed settings, a commit killed between its renames ---------------------


def scaled_step(accelerator, model, optimizer, overflow: bool = False) -> None:
    loss = model(torch.randn(2, 4)).sum()
    accelerator.backward(loss * float("inf") if overflow else loss)  # inf: the scaler skips the step, backs off
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture
def scaler_moved_on(scaled_manager_parts):
    """A scaler whose state differs from a fresh one's in scale and growth tracker: 1024 backed off
    to 512 by an overflow, then 2 of the 3 good steps it needs to grow again."""
    accelerator, model, optimizer, _manager = scaled_manager_parts
    scaled_step(accelerator, model, optimizer, overflow=True)
    scaled_step(accelerator, model, optimizer)
    scaled_step(accelerator, model, optimizer)
    state = accelerator.scaler.state_dict()
    assert (state["scale"], state["_growth_tracker"]) == (512.0, 2)
    return state


def test_the_grad_scaler_state_round_trips_through_a_step_checkpoint(scaled_manager_parts, scaler_moved_on):
    accelerator, model, optimizer, manager = scaled_manager_parts
    saved = manager().save(model, optimizer, Progress(epoch=0, step_in_epoch=3, global_step=3, samples_seen=6))
    assert SCALER_FILE in json.loads(Path(saved, MANIFEST).read_text())["files"]
    scaled_step(accelerator, model, optimizer)  # the third good step: the scale grows, the tracker restarts
    assert (accelerator.scaler.get_scale(), accelerator.scaler.state_dict()["_growth_tracker"]) == (1024.0, 0)

    manager(resume="latest").resume(model, optimizer, 10)
    assert accelerator.scaler.state_dict() == scaler_moved_on  # scale 512, growth tracker 2
    scaled_step(accelerator, model, optimizer)  # and it goes on from there: the third good step again
    assert accelerator.scaler.get_scale() == 1024.0


def test_the_grad_scaler_state_round_trips_through_an_open_clip_epoch_file(scaled_manager_parts, scaler_moved_on):
    accelerator, model, optimizer, manager = scaled_manager_parts
    manager(epochs=1).end_of_epoch(model, optimizer, Progress(epoch=1, global_step=10, samples_seen=20))
    epoch_file = Path(manager().directory) / "epoch_1.pt"
    assert torch.load(epoch_file, weights_only=True)["scaler"] == scaler_moved_on
    scaled_step(accelerator, model, optimizer)
    assert accelerator.scaler.get_scale() == 1024.0

    manager(resume=str(epoch_file)).resume(model, optimizer, 10)
    assert accelerator.scaler.state_dict() == scaler_moved_on


SAVED = {"batch_size": 16, "seed": 0, "accum_freq": 1}  # 160 rows: 10 steps per epoch
CONSEQUENCE = "the rest of epoch 0 would train some samples twice and others never"


def csv_like(settings: dict) -> dict:
    """The settings with what a CSV source records: its order (the rows) and its layout (one process here)."""
    layout = {"batch_size": settings["batch_size"], "world_size": 1}
    return {**settings, "order": {"source": "csv", "samples": 160}, "layout": layout}


def resampled_like(settings: dict) -> dict:
    """The settings with what resampled shards record: not elastic, the layout in the order too."""
    layout = {"batch_size": settings["batch_size"], "world_size": 1, "workers": 2}
    return {**settings, "order": {"source": "webdataset", **layout}, "layout": layout, "elastic": False}


@pytest.mark.parametrize(
    "like, changed, named",
    [
        (csv_like, {}, None),
        (csv_like, {"seed": 1}, "seed 0 -> 1"),
        (csv_like, {"batch_size": 8}, None),  # the position is kept in samples: the rest of the epoch once
        (csv_like, {"accum_freq": 2}, None),
        (csv_like, {"seed": 3, "batch_size": 32, "accum_freq": 5}, "seed 0 -> 3"),
        (resampled_like, {}, None),
        (resampled_like, {"batch_size": 8}, "steps_per_epoch 10 -> 20, order.batch_size 16 -> 8"),
        (resampled_like, {"accum_freq": 2}, "accum_freq 1 -> 2, steps_per_epoch 10 -> 5"),
    ],
    ids=["unchanged", "seed", "batch_size", "accum_freq", "all", "resampled", "resampled-batch", "resampled-accum"],
)
def test_a_resume_mid_epoch_with_other_order_settings_is_refused_naming_them(
    scaled_manager_parts, caplog, like, changed, named
):
    _accelerator, model, optimizer, manager = scaled_manager_parts
    saved = manager(**like(SAVED)).save(
        model, optimizer, Progress(epoch=0, step_in_epoch=1, global_step=1, samples_seen=16)
    )
    settings = like({**SAVED, **changed})
    steps = 160 // (settings["batch_size"] * settings["accum_freq"])
    if named is None:
        with caplog.at_level(logging.WARNING, logger="acc_clip"):
            manager(resume="latest", **settings).resume(model, optimizer, steps)
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        return
    with pytest.raises(UsageError) as error:
        manager(resume="latest", **settings).resume(model, optimizer, steps)
    assert str(error.value) == (
        f"--resume {saved}: {named} since the save: {CONSEQUENCE}; resume with the settings and data it was saved "
        "with, or pass --resume-changed-data to go on anyway"
    )
    with caplog.at_level(logging.WARNING, logger="acc_clip"):
        manager(resume="latest", resume_changed_data=True, **settings).resume(model, optimizer, steps)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"--resume {saved}: {named} since the save (--resume-changed-data): {CONSEQUENCE}"]


def test_a_resume_on_another_layout_says_so_and_keeps_the_segments(scaled_manager_parts, caplog):
    _accelerator, model, optimizer, manager = scaled_manager_parts
    progress = Progress(epoch=0, step_in_epoch=3, global_step=3, samples_seen=48)
    progress.segments = [{"layout": {"batch_size": 16, "world_size": 1}, "batches": 3}]
    manager(**csv_like(SAVED)).save(model, optimizer, progress)
    with caplog.at_level(logging.INFO, logger="acc_clip"):
        resumed = manager(resume="latest", **csv_like({**SAVED, "batch_size": 8})).resume(model, optimizer, 20)
    assert resumed == progress
    assert any("the layout changed since the save (batch_size 16 -> 8)" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_from_before_layouts_were_recorded_resumes_as_one_segment_of_its_layout(scaled_manager_parts):
    """Its progress has no segments and its order holds the layout (a CSV's global micro-batch; shards' processes,
    batch and workers, and an epoch length rounded down to the global batch)."""
    _accelerator, model, optimizer, manager = scaled_manager_parts
    old_order = {"source": "webdataset", "samples": 144, "batch_size": 16, "world_size": 1, "workers": 2}
    shards = {"order": {"source": "webdataset", "samples": 150}, "layout": {"batch_size": 16, "world_size": 1}}
    saved = manager(**{**SAVED, **shards, "accum_freq": 2}).save(
        model, optimizer, Progress(epoch=0, step_in_epoch=2, global_step=2, samples_seen=64)
    )
    manifest_path = Path(saved) / "complete.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["progress"]["segments"], manifest["data"]["layout"]  # as checkpoints wrote them before
    manifest["data"]["order"] = old_order
    manifest_path.write_text(json.dumps(manifest))
    now = {"order": {"source": "webdataset", "samples": 150}, "layout": {"batch_size": 8, "world_size": 1}}
    resumed = manager(resume="latest", **{**SAVED, **now}).resume(model, optimizer, 18)
    assert resumed.segments == [{"layout": {"batch_size": 16, "world_size": 1}, "batches": 4}]
    manifest["data"]["order"] = {**old_order, "samples": 128}  # another epoch length
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"order.samples 128 -> 150 since the save"):
        manager(resume="latest", **{**SAVED, **now}).resume(model, optimizer, 18)


def test_a_checkpoint_from_before_the_order_was_recorded_is_checked_on_what_it_recorded(scaled_manager_parts):
    _accelerator, model, optimizer, manager = scaled_manager_parts
    saved = manager(**csv_like(SAVED)).save(
        model, optimizer, Progress(epoch=0, step_in_epoch=1, global_step=1, samples_seen=16)
    )
    manifest_path = Path(saved) / "complete.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["data"]["order"]  # as checkpoints wrote it before
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"global_micro_batch 16 -> 8, steps_per_epoch 10 -> 20 since the save"):
        manager(resume="latest", **csv_like({**SAVED, "batch_size": 8})).resume(model, optimizer, 20)
    manager(resume="latest", **csv_like(SAVED)).resume(model, optimizer, 10)  # the same settings go on


def test_a_resume_at_an_epoch_end_follows_the_new_settings(scaled_manager_parts, caplog):
    _accelerator, model, optimizer, manager = scaled_manager_parts
    manager(**csv_like(SAVED)).save(model, optimizer, Progress(epoch=0, step_in_epoch=10, global_step=10))
    with caplog.at_level(logging.INFO, logger="acc_clip"):
        manager(resume="latest", **csv_like({**SAVED, "seed": 5})).resume(model, optimizer, 10)
    assert any(
        "seed 0 -> 5 since the save; the next epochs follow the new settings" in r.getMessage() for r in caplog.records
    )


def test_a_start_puts_back_a_checkpoint_moved_aside_by_a_commit_killed_between_its_renames(scaled_manager_parts):
    """The states a kill inside commit_folder can leave, next to complete checkpoints: step 6 moved
    aside and its replacement not yet renamed (restored); step 3 moved aside after its replacement was
    renamed in (the old copy is stale: removed); an old copy without its manifest (removed)."""
    _accelerator, model, optimizer, manager = scaled_manager_parts
    saver = manager()
    for step in (3, 6):
        saver.save(model, optimizer, Progress(epoch=0, step_in_epoch=step, global_step=step, samples_seen=2 * step))
    folder = Path(saver.directory)
    os.replace(folder / "step_00000006", folder / f"{OLD_PREFIX}step_00000006")
    shutil.copytree(folder / f"{OLD_PREFIX}step_00000006", folder / f"{TMP_PREFIX}step_00000006")
    shutil.copytree(folder / "step_00000003", folder / f"{OLD_PREFIX}step_00000003")
    (folder / f"{OLD_PREFIX}step_00000009").mkdir()

    manager()  # a new start
    assert sorted(os.listdir(folder)) == ["step_00000003", "step_00000006"]
    assert manager(resume="latest").resume(model, optimizer, 10) == Progress(
        epoch=0, step_in_epoch=6, global_step=6, samples_seen=12
    )


# the remote copy ---------------------------------------------------------------------------------


def fake_checkpoint(folder: Path, payload: bytes = b"weights", run_id: str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / MANIFEST).write_text(json.dumps({} if run_id is None else {"run_id": run_id}))
    return folder


def local_run_with_sync(tmp_path: Path, name: str = "local", **settings) -> tuple[Path, RemoteSync]:
    run = tmp_path / name / "run"
    run.mkdir(parents=True)
    return run, RemoteSync(str(run), f"file://{tmp_path / 'remote'}", "fsspec", 60, **settings)


def test_remote_sync_copies_complete_checkpoints_manifest_last_and_never_partial_ones(tmp_path):
    run, sync = local_run_with_sync(tmp_path, prune=True)
    fake_checkpoint(run / "checkpoints" / "step_00000004", run_id=sync.run_id)
    partial = run / "checkpoints" / f"{TMP_PREFIX}step_00000008"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    order = []
    put_file = sync.fs.put_file
    sync.fs.put_file = lambda local, remote: (order.append(os.path.basename(local)), put_file(local, remote))
    assert sync.sync_once() == 4  # metrics.jsonl, run_id, and the checkpoint's two files
    assert order.index(MANIFEST) > order.index("model.safetensors")
    remote = tmp_path / "remote" / "run"
    assert (remote / "checkpoints" / "step_00000004" / MANIFEST).is_file()
    assert not (remote / "checkpoints" / partial.name).exists()
    assert sync.sync_once() == 0  # nothing changed, nothing copied

    # keep-K pruning locally is mirrored; newer remote checkpoints, and any another run saved, are left alone
    fake_checkpoint(run / "checkpoints" / "step_00000012", run_id=sync.run_id)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    fake_checkpoint(remote / "checkpoints" / "step_00000099", run_id=sync.run_id)
    fake_checkpoint(remote / "checkpoints" / "step_00000002", run_id="another-run")
    sync.sync_once()
    assert sorted(p.name for p in (remote / "checkpoints").glob("step_*")) == [
        "step_00000002",
        "step_00000012",
        "step_00000099",
    ]


def test_an_interrupted_remote_copy_is_not_fetched(tmp_path):
    run, sync = local_run_with_sync(tmp_path)
    remote = tmp_path / "remote" / "run" / "checkpoints"
    fake_checkpoint(remote / "step_00000004", b"complete", run_id=sync.run_id)
    (remote / "step_00000008").mkdir()  # the copy died before its manifest
    (remote / "step_00000008" / "model.safetensors").write_bytes(b"half")
    fetched = sync.fetch_newest_checkpoint()
    assert fetched == str(run / "checkpoints" / "step_00000004")
    assert (run / "checkpoints" / "step_00000004" / "model.safetensors").read_bytes() == b"complete"
    assert sync.fetch_newest_checkpoint() is None  # the local one is as new as any remote one


def test_remote_checkpoints_from_before_run_ids_belong_to_the_run_that_claims_their_folder(tmp_path):
    remote = tmp_path / "remote" / "run" / "checkpoints"
    fake_checkpoint(remote / "step_00000004", b"older acc_clip")  # no run_id anywhere
    run, sync = local_run_with_sync(tmp_path)
    sync.claim(may_adopt=True)
    assert sync.fetch_newest_checkpoint() == str(run / "checkpoints" / "step_00000004")


def test_a_sharded_checkpoint_goes_to_the_remote_and_back_with_its_sub_folders(tmp_path):
    run, sync = local_run_with_sync(tmp_path)
    folder = fake_checkpoint(run / "checkpoints" / "step_00000004", run_id=sync.run_id)
    (folder / "pytorch_model_fsdp_0").mkdir()
    (folder / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard 0")
    sync.sync_once()
    remote = tmp_path / "remote" / "run" / "checkpoints" / "step_00000004"
    assert (remote / "pytorch_model_fsdp_0" / "__0_0.distcp").read_bytes() == b"shard 0"

    _elsewhere, fetcher = local_run_with_sync(tmp_path, "machine_b")
    fetcher.claim(may_adopt=True)
    fetched = Path(fetcher.fetch_newest_checkpoint())
    assert (fetched / "pytorch_model_fsdp_0" / "__0_0.distcp").read_bytes() == b"shard 0"
    assert (fetched / MANIFEST).is_file()


def test_one_run_never_overwrites_prunes_or_fetches_another_runs_remote_files(tmp_path, caplog):
    first, sync = local_run_with_sync(tmp_path, "machine_a", prune=True)
    sync.claim(may_adopt=False)
    (first / "metrics.jsonl").write_text('{"step": 0, "run": "a"}\n')
    sync.sync_once()
    remote = tmp_path / "remote" / "run"
    assert (remote / "run_id").read_text().strip() == sync.run_id

    # the same --name on another machine (or a repeated command): refused before anything is copied
    _second, other = local_run_with_sync(tmp_path, "machine_b")
    with pytest.raises(
        UsageError,
        match=rf"^--remote-sync: {re.escape(str(remote))} holds another run's copy "
        rf"\(run id {sync.run_id}; this run's is {other.run_id}, in ",
    ):
        other.claim(may_adopt=False)
    assert (remote / "metrics.jsonl").read_text() == '{"step": 0, "run": "a"}\n'

    # a checkpoint of another run in the remote folder is neither fetched nor pruned
    fake_checkpoint(remote / "checkpoints" / "step_00000008", b"other run", run_id="another-run")
    fake_checkpoint(remote / "checkpoints" / "step_00000004", b"ours", run_id=sync.run_id)
    sync.stop()  # machine_a's run ended: a live owner is never adopted (test_remote_sync.py)
    third, fetcher = local_run_with_sync(tmp_path, "machine_c")
    with caplog.at_level("WARNING"):
        fetcher.claim(may_adopt=True)  # a machine that lost the folder continues the remote run
        assert fetcher.run_id == sync.run_id and (third / "run_id").read_text().strip() == sync.run_id
        assert fetcher.fetch_newest_checkpoint() == str(third / "checkpoints" / "step_00000004")
    assert "1 checkpoint(s) in" in caplog.text and "not fetched: step_00000008" in caplog.text

    # once another run claims the folder, this one stops copying instead of overwriting its files
    (remote / "run_id").write_text("another-run\n")
    (first / "metrics.jsonl").write_text('{"step": 0, "run": "a"}\n{"step": 1, "run": "a"}\n')
    with caplog.at_level("WARNING"):
        assert sync.sync_once() == 0
    assert "now belongs to run another-run" in caplog.text
    assert (remote / "metrics.jsonl").read_text() == '{"step": 0, "run": "a"}\n'


def test_remote_sync_protocol_errors_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="needs an s3:// URL"):
        RemoteSync(str(tmp_path), f"file://{tmp_path}", "s3", 60)


def test_an_epoch_files_optimizer_state_keeps_this_runs_group_settings():
    """torch's load_state_dict takes the saved groups' lr_scale and weight_decay: an epoch file resumed under
    another --wd or layer decay would train with the old ones, and param_groups.json would say otherwise."""
    from acc_clip.checkpoint.manager import load_optimizer_state

    weights = [torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))]

    def optimizer(scale: float, decay: float) -> torch.optim.Optimizer:
        groups = [
            {"params": [weights[0]], "lr_scale": scale, "weight_decay": decay},
            {"params": [weights[1]], "lr_scale": 1.0, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=0.1)

    saved = optimizer(0.75, 0.2)
    weights[0].grad, weights[1].grad = torch.ones(2, 2), torch.ones(2)
    saved.step()
    resumed = optimizer(0.5, 0.1)
    load_optimizer_state(resumed, saved.state_dict())
    assert [(g["lr_scale"], g["weight_decay"]) for g in resumed.param_groups] == [(0.5, 0.1), (1.0, 0.0)]
    assert torch.equal(resumed.state[weights[0]]["exp_avg"], saved.state[weights[0]]["exp_avg"])  # moments loaded

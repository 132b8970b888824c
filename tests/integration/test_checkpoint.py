"""Checkpoints a trainer wrote: the open_clip export (loaded by open_clip's own loader), open_clip epoch
files as a starting point, the remote copy and the way back (never while its owner's heartbeat is fresh),
and the one-line errors (each kind with its exit status) for bad --resume input, a full disk and a
non-finite loss.

One trained run (2 epochs of 10 steps on 160 rows of the fixture CSV, epoch saves, a file://
remote copy) is shared by the tests that need real checkpoints. The CheckpointManager and RemoteSync
in the test process are tested in tests/unit/checkpoint/test_manager.py and test_remote_sync.py.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from acc_clip.checkpoint import export
from acc_clip.checkpoint.folders import TMP_PREFIX, read_manifest
from acc_clip.errors import AccClipError, CheckpointError, DivergedError, ResourceError, UsageError
from acc_clip.io.sealed import MANIFEST, folder_bytes
from acc_clip.runtime.faults import kill_at
from background_trainer import two_processes
from helpers import (
    REPO,
    SMALL_CSV_ROWS,
    TINY_RN,
    TINY_VIT,
    flip_a_bit,
    read_metrics,
    run_trainer,
    small_disk,
    tiny_train_args,
)

ROWS = SMALL_CSV_ROWS
STEPS_PER_EPOCH = ROWS // 16

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # reproducible losses, and kind to the shared CPU


@pytest.fixture(scope="module")
def trained(small_csv, tmp_path_factory) -> dict:
    """Run R: 2 epochs, epoch_N.pt every epoch, copied to a file:// remote every second."""
    root = tmp_path_factory.mktemp("trained")
    remote = f"file://{root / 'remote'}"
    args = tiny_train_args(
        small_csv,
        root / "logs",
        "R",
        "--save-frequency",
        "1",
        "--remote-sync",
        remote,
        "--remote-sync-protocol",
        "fsspec",
        "--remote-sync-frequency",
        "1",
    )
    run_trainer(args)
    return {"run": root / "logs" / "R", "remote": remote, "remote_run": root / "remote" / "R", "csv": small_csv}


def step_folder(run: Path, global_step: int) -> Path:
    return run / "checkpoints" / f"step_{global_step:08d}"


# the open_clip export -----------------------------------------------------------------------------


def open_clip_features(model_name: str, pretrained: str) -> tuple[torch.Tensor, torch.Tensor]:
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    return features(model, open_clip.get_tokenizer(model_name))


def features(model: torch.nn.Module, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    texts = tokenizer(["a red circle", "a blue square on green", "two yellow triangles", "a purple star"])
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


@pytest.fixture(scope="module")
def tiny_rn_registered(tmp_path_factory) -> str:
    """open_clip ignores `pretrained` for local-dir: names, so register the tiny config under a name."""
    import open_clip

    config = json.loads((REPO / "configs" / "models" / "tiny-rn" / "open_clip_config.json").read_text())
    path = tmp_path_factory.mktemp("configs") / "acc_clip_test_tiny_rn.json"
    path.write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(path)
    return path.stem


def test_exported_epoch_and_step_checkpoints_load_in_open_clip_with_the_trained_features(
    trained, tiny_rn_registered, tmp_path
):
    import open_clip
    from safetensors.torch import load_file

    run = trained["run"]
    epoch_file = run / "checkpoints" / "epoch_2.pt"
    saved = torch.load(epoch_file, map_location="cpu", weights_only=True)
    assert set(saved) == {"epoch", "name", "state_dict", "optimizer"}  # fp32: no grad scaler
    assert saved["epoch"] == 2 and saved["name"] == "R"

    # The trained model: the weights the last step checkpoint restores into a fresh model.
    trained_model, _, _ = open_clip.create_model_and_transforms(TINY_RN)
    trained_model.load_state_dict(load_file(step_folder(run, 2 * STEPS_PER_EPOCH) / "model.safetensors"))
    want_image, want_text = features(trained_model, open_clip.get_tokenizer(TINY_RN))

    got_image, got_text = open_clip_features(tiny_rn_registered, str(epoch_file))
    assert torch.allclose(got_image, want_image, rtol=0, atol=1e-5)
    assert torch.allclose(got_text, want_text, rtol=0, atol=1e-5)

    exported = tmp_path / "model.pt"
    assert export.main([str(step_folder(run, 2 * STEPS_PER_EPOCH)), "--out", str(exported)]) == 0
    assert torch.load(exported, map_location="cpu", weights_only=True)["epoch"] == 2
    got_image, got_text = open_clip_features(tiny_rn_registered, str(exported))
    assert torch.allclose(got_image, want_image, rtol=0, atol=1e-5)
    assert torch.allclose(got_text, want_text, rtol=0, atol=1e-5)

    # Not vacuous: the epoch-1 weights, and the untrained ones, give other features.
    earlier_image, _ = open_clip_features(tiny_rn_registered, str(run / "checkpoints" / "epoch_1.pt"))
    untrained_image, _ = features(open_clip.create_model_and_transforms(TINY_RN)[0], open_clip.get_tokenizer(TINY_RN))
    assert (earlier_image - want_image).abs().max() > 1e-3
    assert (untrained_image - want_image).abs().max() > 1e-3


def test_local_dir_export_loads_in_open_clip_with_the_trained_features(trained, tmp_path):
    """`acc-clip export --format local-dir`: the folder open_clip's hub loader reads
    (open_clip_config.json, open_clip_model.safetensors) gives the checkpoint's features."""
    import open_clip
    from safetensors.torch import load_file

    step = step_folder(trained["run"], 2 * STEPS_PER_EPOCH)
    trained_model, _, _ = open_clip.create_model_and_transforms(TINY_RN)
    trained_model.load_state_dict(load_file(step / "model.safetensors"))
    want_image, want_text = features(trained_model, open_clip.get_tokenizer(TINY_RN))

    out = tmp_path / "hub"
    assert export.main([str(step), "--format", "local-dir", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    model, _, _preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    got_image, got_text = features(model, open_clip.get_tokenizer(f"local-dir:{out}"))
    assert torch.allclose(got_image, want_image, rtol=0, atol=1e-5)
    assert torch.allclose(got_text, want_text, rtol=0, atol=1e-5)
    untrained_image, _ = features(open_clip.create_model_and_transforms(TINY_RN)[0], open_clip.get_tokenizer(TINY_RN))
    assert (untrained_image - want_image).abs().max() > 1e-3
    with pytest.raises(AccClipError, match="exists; give a new folder"):  # never over an existing folder
        export.main([str(step), "--format", "local-dir", "--out", str(out)])


def test_export_of_a_checkpoint_with_a_damaged_optimizer_file_is_one_line(trained, tmp_path):
    step = step_folder(trained["run"], STEPS_PER_EPOCH)
    damaged = tmp_path / "damaged"
    shutil.copytree(step, damaged)
    size = (damaged / "optimizer.bin").stat().st_size  # the same size: the manifest's size check passes
    (damaged / "optimizer.bin").write_bytes(b"\x80\x02not a torch file".ljust(size, b"\0"))
    with pytest.raises(AccClipError, match=r"optimizer\.bin differs from what was saved \(SHA-256 mismatch\)"):
        export.export_checkpoint(str(damaged), str(tmp_path / "model.pt"))
    # a checkpoint from before hashes were recorded: the loader itself still refuses in one line
    manifest = json.loads((damaged / MANIFEST).read_text())
    del manifest["sha256"]
    (damaged / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AccClipError, match=r"optimizer\.bin: cannot be read \(.*\); the checkpoint is damaged"):
        export.export_checkpoint(str(damaged), str(tmp_path / "model.pt"))
    assert not (tmp_path / "model.pt").exists()


def test_one_flipped_bit_in_the_weights_is_refused_by_export_evaluation_and_resume(trained, tmp_path):
    damaged = tmp_path / "step_00000010"
    shutil.copytree(step_folder(trained["run"], STEPS_PER_EPOCH), damaged)
    flip_a_bit(damaged / "model.safetensors")
    says = r"step_00000010: damaged checkpoint, model\.safetensors differs from what was saved \(SHA-256 mismatch\)$"
    with pytest.raises(AccClipError, match=says):
        export.export_checkpoint(str(damaged), str(tmp_path / "model.pt"))
    with pytest.raises(AccClipError, match=says):
        export.main([str(damaged), "--format", "local-dir", "--out", str(tmp_path / "dir")])
    with pytest.raises(AccClipError, match=says):
        read_manifest(str(damaged))  # what evaluation and --resume PATH read first
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "dir").exists()


def test_an_open_clip_epoch_file_is_a_starting_point(trained, tmp_path):
    """From epoch_1.pt (weights and optimizer), epoch 2 repeats run R's steps: same step numbers,
    learning rates and losses."""
    epoch_file = trained["run"] / "checkpoints" / "epoch_1.pt"
    args = tiny_train_args(trained["csv"], tmp_path, "S", "--resume", str(epoch_file))
    result = run_trainer(args)
    assert "started from open_clip checkpoint" in result.stdout
    got, want = read_metrics(tmp_path / "S"), read_metrics(trained["run"])[STEPS_PER_EPOCH:]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want)) <= 1e-6


# the remote copy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_a_second_run_with_the_same_name_and_remote_is_refused_in_one_line(trained, tmp_path, processes):
    """With 2 processes the refusal comes on the main process alone and the run still ends with it, within
    the timeout. (On one machine torchrun would also end the other process; the agreement in
    CheckpointManager is what ends it on other machines, which this test cannot show.)"""
    args = tiny_train_args(
        trained["csv"], tmp_path, "R", "--remote-sync", trained["remote"], "--remote-sync-protocol", "fsspec"
    )
    result = run_trainer(args, check=False, launcher=two_processes() if processes == 2 else None, timeout=240)
    said = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and said, result.stderr[-3000:]
    assert " holds another run's copy (run id " in said[0], result.stderr[-3000:]
    if processes == 1:
        assert result.returncode == UsageError.exit_status and len(result.stderr.strip().splitlines()) == 1, (
            result.stderr[-3000:]
        )


def test_the_run_is_copied_to_the_remote_and_resume_latest_fetches_it_back(trained, tmp_path):
    remote_run = trained["remote_run"]
    assert (remote_run / "metrics.jsonl").read_text() == (trained["run"] / "metrics.jsonl").read_text()
    assert (remote_run / "checkpoints" / "epoch_2.pt").is_file()
    assert [p.name for p in sorted((remote_run / "checkpoints").glob("step_*"))] == [
        p.name for p in sorted((trained["run"] / "checkpoints").glob("step_*"))
    ]
    assert not list(remote_run.rglob(f"{TMP_PREFIX}*"))

    # A machine without the local run folder: --resume latest takes the newest checkpoint (and
    # metrics.jsonl) from the remote and trains a third epoch; the exit copies it back.
    args = tiny_train_args(
        trained["csv"],
        tmp_path,
        "R",
        "--epochs",
        "3",
        "--resume",
        "latest",
        "--remote-sync",
        trained["remote"],
        "--remote-sync-protocol",
        "fsspec",
        "--remote-sync-frequency",
        "60",
    )
    result = run_trainer(args)
    assert "fetched step_00000020" in result.stdout
    assert "resumed from" in result.stdout and "global step 20" in result.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "R")] == list(range(3 * STEPS_PER_EPOCH))
    assert (remote_run / "checkpoints" / f"step_{3 * STEPS_PER_EPOCH:08d}" / MANIFEST).is_file()


def test_a_killed_runs_remote_copy_is_adopted_only_once_its_heartbeat_is_stale(trained, tmp_path):
    """Machine A's run is SIGKILLed; machine B's `--resume latest` is refused while A's heartbeat is fresh
    (A might still run), and adopts the run with `--remote-stale-after 1` a second later, ending as run R.
    A first ends normally after step 6 (its exit copies step 6 and marks its heartbeat stopped), then
    resumes and is killed saving step 9: the remote copy holds step 6 whatever the copy's timing."""
    remote = f"file://{tmp_path / 'remote'}"
    sync = ["--remote-sync", remote, "--remote-sync-protocol", "fsspec", "--remote-sync-frequency", "60"]
    args = tiny_train_args(trained["csv"], tmp_path / "machine_a", "K", "--save-every-n-steps", "3", *sync)
    run_trainer([*args, "--max-steps", "6"])
    killed = run_trainer([*args, "--resume", "latest"], check=False, env=kill_at("before_commit", 9))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    heartbeat = json.loads((tmp_path / "remote" / "K" / "heartbeat.json").read_text())
    assert heartbeat["stopped"] is False  # what a SIGKILL leaves: a heartbeat that goes stale

    elsewhere = tiny_train_args(trained["csv"], tmp_path / "machine_b", "K", "--save-every-n-steps", "3", *sync)
    refused = run_trainer([*elsewhere, "--resume", "latest"], check=False)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == UsageError.exit_status and len(lines) == 1, refused.stderr[-3000:]
    owner = (tmp_path / "remote" / "K" / "run_id").read_text().strip()
    assert re.match(
        rf"error: --resume latest: .*K belongs to run {owner}, which may still run on "
        rf"{re.escape(socket.gethostname())} \(pid \d+\): its heartbeat is \d+ s old, fresher than "
        r"--remote-stale-after 900 s; stop that run first or wait for it to end",
        lines[0],
    ), lines[0]

    time.sleep(max(0.0, heartbeat["time"] + 1.5 - time.time()))
    adopted = run_trainer([*elsewhere, "--resume", "latest", "--remote-stale-after", "1"])
    assert re.search(r"its heartbeat from \S+ \(pid \d+\) is \d+ s old, stale", adopted.stdout), adopted.stdout[-3000:]
    assert "fetched step_00000006" in adopted.stdout
    got, want = read_metrics(tmp_path / "machine_b" / "K"), read_metrics(trained["run"])
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(2 * STEPS_PER_EPOCH))
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want)) <= 1e-6
    assert json.loads((tmp_path / "remote" / "K" / "heartbeat.json").read_text())["stopped"] is True


# bad input ---------------------------------------------------------------------------------------


def test_resume_of_another_architecture_gives_one_line_and_the_checkpoint_exit_status(trained, tmp_path):
    step10 = step_folder(trained["run"], STEPS_PER_EPOCH)
    args = tiny_train_args(trained["csv"], tmp_path, "V", "--resume", str(step10), "--model", TINY_VIT)
    result = run_trainer(args, check=False)
    assert result.returncode == CheckpointError.exit_status, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: --resume {step10}: weights of another architecture ("), lines[0]


def test_resume_rejects_damaged_and_interrupted_folders_and_points_into_run_folders(trained, tmp_path):
    damaged = tmp_path / "step_00000010"
    shutil.copytree(step_folder(trained["run"], STEPS_PER_EPOCH), damaged)
    with open(damaged / "optimizer.bin", "r+b") as file:
        file.truncate(100)
    with pytest.raises(AccClipError, match=r"damaged checkpoint, optimizer.bin has 100 bytes"):
        read_manifest(str(damaged))
    interrupted = tmp_path / f"{TMP_PREFIX}step_00000012"
    interrupted.mkdir()
    with pytest.raises(AccClipError, match="an interrupted save"):
        read_manifest(str(interrupted))
    with pytest.raises(AccClipError, match=r"it holds checkpoints, e.g. .*step_00000020"):
        read_manifest(str(trained["run"]))


def test_a_trainer_that_fills_the_disk_stops_with_one_line_and_resumes_from_the_save_before(trained, tmp_path):
    """A real full disk (a tmpfs with room for one and a half checkpoints of run R's model)."""
    checkpoint_bytes = folder_bytes(str(step_folder(trained["run"], STEPS_PER_EPOCH)))
    with small_disk(tmp_path / "disk", f"{int(checkpoint_bytes * 1.5) + 2_000_000}") as disk:
        args = tiny_train_args(trained["csv"], disk, "F", "--save-every-n-steps", "3")
        result = run_trainer(args, check=False)
        assert result.returncode == ResourceError.exit_status, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "error: checkpoint step_00000006 could not be saved: no space left on the disk of "
        ), result.stderr[-3000:]
        assert "the partial save was removed, what was saved before is kept" in lines[0]
        checkpoints = disk / "F" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003"]
        read_manifest(str(checkpoints / "step_00000003"))  # whole, hashes and all
        assert len(read_metrics(disk / "F")) == 6  # the steps trained before the failed save are recorded


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing_after_it(small_csv, tmp_path):
    # lr 1e30 makes step 1's loss NaN. Its loss is not logged by itself (log every 10 steps), so
    # it is the flush before the save due after step 2 that must catch it.
    args = tiny_train_args(
        small_csv,
        tmp_path,
        "N",
        "--lr",
        "1e30",
        "--warmup",
        "1",
        "--log-every-n-steps",
        "10",
        "--save-every-n-steps",
        "1",
    )
    result = run_trainer(args, check=False)
    assert result.returncode == DivergedError.exit_status, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the loss is nan at step 1 "), result.stderr[-3000:]
    checkpoints = tmp_path / "N" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_00000001"]  # the last one before the NaN

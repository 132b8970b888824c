"""Checkpoints: the folder format and its atomic save, pruning, the open_clip export (loaded by
open_clip's own loader), open_clip epoch files as a starting point, the remote copy and the way
back, and the one-line errors for bad --resume input and for a non-finite loss.

One trained run (2 epochs of 10 steps on 160 rows of the fixture CSV, epoch saves, a file://
remote copy) is shared by the tests that need real checkpoints; the rest work in this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from background_trainer import two_processes
from conftest import (SMALL_CSV_ROWS, REPO, TINY_RN, TINY_VIT, fill_disk, read_metrics, run_trainer, small_disk,
                      tiny_train_args)

from acc_clip.checkpoint import export, manager
from acc_clip.checkpoint import format as format_module
from acc_clip.io.files import file_sha256
from acc_clip.checkpoint.format import MANIFEST, TMP_PREFIX, Progress, complete_checkpoints, read_manifest
from acc_clip.checkpoint.manager import CheckpointManager
from acc_clip.runtime import parallel, signals
from acc_clip.config import TrainConfig
from acc_clip.errors import AccClipError
from acc_clip.checkpoint.remote_sync import RemoteSync

ROWS = SMALL_CSV_ROWS
STEPS_PER_EPOCH = ROWS // 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # reproducible losses, and kind to the shared CPU
        yield


@pytest.fixture(scope="module")
def trained(small_csv, tmp_path_factory) -> dict:
    """Run R: 2 epochs, epoch_N.pt every epoch, copied to a file:// remote every second."""
    root = tmp_path_factory.mktemp("trained")
    remote = f"file://{root / 'remote'}"
    args = tiny_train_args(small_csv, root / "logs", "R", "--save-frequency", "1", "--remote-sync", remote,
                           "--remote-sync-protocol", "fsspec", "--remote-sync-frequency", "1")
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


def test_exported_epoch_and_step_checkpoints_load_in_open_clip_with_the_trained_features(trained, tiny_rn_registered,
                                                                                          tmp_path):
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
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
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


def flip_a_bit(path: Path, offset_from_end: int = 16) -> None:
    """One bit of a tensor's bytes (the end of a safetensors file is tensor data), size unchanged."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


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
    args = tiny_train_args(trained["csv"], tmp_path, "R", "--remote-sync", trained["remote"],
                           "--remote-sync-protocol", "fsspec")
    result = run_trainer(args, check=False, launcher=two_processes() if processes == 2 else None, timeout=240)
    said = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and said, result.stderr[-3000:]
    assert " holds another run's copy (run id " in said[0], result.stderr[-3000:]
    if processes == 1:
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]


def test_the_run_is_copied_to_the_remote_and_resume_latest_fetches_it_back(trained, tmp_path):
    remote_run = trained["remote_run"]
    assert (remote_run / "metrics.jsonl").read_text() == (trained["run"] / "metrics.jsonl").read_text()
    assert (remote_run / "checkpoints" / "epoch_2.pt").is_file()
    assert [p.name for p in sorted((remote_run / "checkpoints").glob("step_*"))] == \
        [p.name for p in sorted((trained["run"] / "checkpoints").glob("step_*"))]
    assert not list(remote_run.rglob(f"{TMP_PREFIX}*"))

    # A machine without the local run folder: --resume latest takes the newest checkpoint (and
    # metrics.jsonl) from the remote and trains a third epoch; the exit copies it back.
    args = tiny_train_args(trained["csv"], tmp_path, "R", "--epochs", "3", "--resume", "latest", "--remote-sync",
                           trained["remote"], "--remote-sync-protocol", "fsspec", "--remote-sync-frequency", "60")
    result = run_trainer(args)
    assert "fetched step_00000020" in result.stdout
    assert "resumed from" in result.stdout and "global step 20" in result.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "R")] == list(range(3 * STEPS_PER_EPOCH))
    assert (remote_run / "checkpoints" / f"step_{3 * STEPS_PER_EPOCH:08d}" / MANIFEST).is_file()


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
    assert sorted(p.name for p in (remote / "checkpoints").glob("step_*")) == \
        ["step_00000002", "step_00000012", "step_00000099"]


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

    elsewhere, fetcher = local_run_with_sync(tmp_path, "machine_b")
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
    second, other = local_run_with_sync(tmp_path, "machine_b")
    with pytest.raises(AccClipError, match=rf"^--remote-sync: {re.escape(str(remote))} holds another run's copy "
                                           rf"\(run id {sync.run_id}; this run's is {other.run_id}, in "):
        other.claim(may_adopt=False)
    assert (remote / "metrics.jsonl").read_text() == '{"step": 0, "run": "a"}\n'

    # a checkpoint of another run in the remote folder is neither fetched nor pruned
    fake_checkpoint(remote / "checkpoints" / "step_00000008", b"other run", run_id="another-run")
    fake_checkpoint(remote / "checkpoints" / "step_00000004", b"ours", run_id=sync.run_id)
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
    with pytest.raises(AccClipError, match="needs an s3:// URL"):
        RemoteSync(str(tmp_path), f"file://{tmp_path}", "s3", 60)


# bad input ---------------------------------------------------------------------------------------

def test_resume_of_another_architecture_gives_one_line_and_exit_2(trained, tmp_path):
    step10 = step_folder(trained["run"], STEPS_PER_EPOCH)
    args = tiny_train_args(trained["csv"], tmp_path, "V", "--resume", str(step10), "--model", TINY_VIT)
    result = run_trainer(args, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: --resume {step10}: weights of another architecture ("), lines[0]


def test_resume_rejects_damaged_and_interrupted_folders_and_points_into_run_folders(trained, tmp_path):
    damaged = tmp_path / "step_00000010"
    shutil.copytree(step_folder(trained["run"], STEPS_PER_EPOCH), damaged)
    with open(damaged / "optimizer.bin", "r+b") as file:
        file.truncate(100)
    with pytest.raises(AccClipError, match="damaged checkpoint, optimizer.bin has 100 bytes"):
        read_manifest(str(damaged))
    interrupted = tmp_path / f"{TMP_PREFIX}step_00000012"
    interrupted.mkdir()
    with pytest.raises(AccClipError, match="an interrupted save"):
        read_manifest(str(interrupted))
    with pytest.raises(AccClipError, match="it holds checkpoints, e.g. .*step_00000020"):
        read_manifest(str(trained["run"]))


def test_a_trainer_that_fills_the_disk_stops_with_one_line_and_resumes_from_the_save_before(trained, tmp_path):
    """A real full disk (a tmpfs with room for one and a half checkpoints of run R's model)."""
    checkpoint_bytes = format_module.folder_bytes(str(step_folder(trained["run"], STEPS_PER_EPOCH)))
    with small_disk(tmp_path / "disk", f"{int(checkpoint_bytes * 1.5) + 2_000_000}") as disk:
        args = tiny_train_args(trained["csv"], disk, "F", "--save-every-n-steps", "3")
        result = run_trainer(args, check=False)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "error: checkpoint step_00000006 could not be saved: no space left on the disk of "), result.stderr[-3000:]
        assert "the partial save was removed, what was saved before is kept" in lines[0]
        checkpoints = disk / "F" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003"]
        read_manifest(str(checkpoints / "step_00000003"))  # whole, hashes and all
        assert len(read_metrics(disk / "F")) == 6  # the steps trained before the failed save are recorded


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing_after_it(small_csv, tmp_path):
    # lr 1e30 makes step 1's loss NaN. Its loss is not logged by itself (log every 10 steps), so
    # it is the flush before the save due after step 2 that must catch it.
    args = tiny_train_args(small_csv, tmp_path, "N", "--lr", "1e30", "--warmup", "1", "--log-every-n-steps", "10",
                           "--save-every-n-steps", "1")
    result = run_trainer(args, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the loss is nan at step 1 "), result.stderr[-3000:]
    checkpoints = tmp_path / "N" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_00000001"]  # the last one before the NaN


# the manager in this process ---------------------------------------------------------------------

class TinyNet(torch.nn.Module):
    def __init__(self, outputs: int = 3):
        super().__init__()
        self.layer = torch.nn.Linear(4, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.fixture
def manager_parts(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)

    def manager(**settings) -> CheckpointManager:
        config = TrainConfig(train_data="unused.csv", model="tiny-net", name="unit", **settings)
        saver = CheckpointManager(str(tmp_path / "run"), config, accelerator)
        saver.steps_per_epoch = 10
        return saver

    return accelerator, model, optimizer, manager


def train_a_step(model, optimizer) -> None:
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_and_resume_restore_weights_optimizer_rng_and_progress(manager_parts):
    accelerator, model, optimizer, manager = manager_parts
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
    accelerator, model, optimizer, manager = manager_parts
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
    accelerator, model, optimizer, manager = manager_parts
    saver = manager(epochs=5, save_frequency=2, save_most_recent=True, delete_previous_checkpoint=True)
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
    assert [os.path.basename(c) for c in complete_checkpoints(saver.directory)] == \
        ["step_00000010", "step_00000020", "step_00000030", "step_00000050"]


def test_non_finite_weights_are_never_saved(manager_parts):
    accelerator, model, optimizer, manager = manager_parts
    saver = manager()
    with torch.no_grad():
        parallel.unwrap(model).layer.weight[0, 0] = float("inf")
    with pytest.raises(AccClipError, match="not finite after step 7"):
        saver.save(model, optimizer, Progress(global_step=7))
    assert complete_checkpoints(saver.directory) == []


def test_stop_signal_sets_a_flag_instead_of_killing():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = signals.StopSignal.install()
        assert not stop.agreed(None)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.agreed(None) and stop.signal_name == "SIGTERM"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class WorkerPids(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> int:
        return os.getpid()


def test_data_workers_survive_a_sigterm_sent_to_the_whole_process_group():
    loader = torch.utils.data.DataLoader(WorkerPids(), batch_size=1, num_workers=1, prefetch_factor=1,
                                         worker_init_fn=signals.ignore_stop_signals)
    batches = iter(loader)
    worker = int(next(batches))
    os.kill(worker, signal.SIGTERM)  # what a scheduler's group signal does to the worker
    os.kill(worker, signal.SIGINT)
    assert [int(pid) for pid in batches] == [worker] * 5  # without the init function: "worker ... killed"


def test_rewind_drops_the_records_made_after_the_resumed_checkpoint_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5)) + '{"step": 5, "lo')
    manager.rewind_jsonl(str(path), 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_resume_latest_falls_back_to_the_newest_checkpoint_that_passes(manager_parts, caplog):
    accelerator, model, optimizer, manager = manager_parts
    saver = manager()
    train_a_step(model, optimizer)
    saver.save(model, optimizer, Progress(global_step=1))
    weights_at_1 = {k: v.clone() for k, v in model.state_dict().items()}
    for step in (2, 3):
        train_a_step(model, optimizer)
        saver.save(model, optimizer, Progress(global_step=step))
    folder = Path(saver.directory)
    flip_a_bit(folder / "step_00000003" / "model.safetensors", offset_from_end=4)
    (folder / "step_00000002" / "optimizer.bin").write_bytes(b"x" * (folder / "step_00000002" / "optimizer.bin")
                                                            .stat().st_size)
    with caplog.at_level("WARNING"):
        resumed = manager(resume="latest").resume(model, optimizer, 10)
    assert resumed.global_step == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights_at_1.items())
    said = caplog.text
    assert "step_00000003: damaged checkpoint, model.safetensors differs" in said
    assert "step_00000002: damaged checkpoint, optimizer.bin differs" in said
    assert "resuming from " in said and "step_00000001, the newest checkpoint that passes" in said
    # kept for inspection, out of the step_ names: --keep-checkpoints would count them among the newest
    assert sorted(p.name for p in folder.iterdir()) == ["damaged-step_00000002", "damaged-step_00000003",
                                                        "step_00000001"]
    saver = manager(keep_checkpoints=1)
    saver.save(model, optimizer, Progress(global_step=2))
    assert [os.path.basename(c) for c in complete_checkpoints(saver.directory)] == ["step_00000002"]

    flip_a_bit(folder / "step_00000002" / "model.safetensors", offset_from_end=4)
    with pytest.raises(AccClipError, match=r"none of the 1 checkpoint\(s\) in .* passes its manifest check "
                                           r"\(the newest, step_00000002"):
        manager(resume="latest").resume(model, optimizer, 10)
    assert (folder / "step_00000002").is_dir()  # nothing renamed when there is nothing to resume from instead


@pytest.mark.parametrize("damage", [b"\xff\xfe not utf-8", b'{"files": [], "progress": {}}', b'{"files": {"a": 1}}'])
def test_a_damaged_manifest_is_named_and_skipped_never_a_traceback(manager_parts, damage):
    accelerator, model, optimizer, manager = manager_parts
    saver = manager()
    saver.save(model, optimizer, Progress(global_step=1))
    (Path(saver.save(model, optimizer, Progress(global_step=2))) / MANIFEST).write_bytes(damage)
    assert manager(resume="latest").resume(model, optimizer, 10).global_step == 1


def test_a_random_state_file_that_cannot_be_read_is_an_error_not_a_log_line(manager_parts):
    """Accelerate logs "Could not load random states" at INFO and goes on; the resume would not be exact."""
    accelerator, model, optimizer, manager = manager_parts
    saver = manager()
    saved = Path(saver.save(model, optimizer, Progress(global_step=4)))
    (saved / "random_states_0.pkl").write_bytes(b"not a pickle at all")
    manifest = json.loads((saved / MANIFEST).read_text())  # made to pass the manifest: only the load fails
    manifest["files"]["random_states_0.pkl"] = (saved / "random_states_0.pkl").stat().st_size
    manifest["sha256"]["random_states_0.pkl"] = file_sha256(str(saved / "random_states_0.pkl"))
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AccClipError, match=r"step_00000004: cannot read random_states_0\.pkl \(\w+\); the run's "
                                           "random streams could not be restored exactly$"):
        manager(resume="latest").resume(model, optimizer, 10)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoint_before(manager_parts, tmp_path):
    accelerator, model, optimizer, manager = manager_parts
    with small_disk(tmp_path / "run", "1m") as run:
        saver = manager()
        train_a_step(model, optimizer)
        saver.save(model, optimizer, Progress(global_step=1))
        weights_at_1 = {k: v.clone() for k, v in model.state_dict().items()}
        filler = fill_disk(run)
        train_a_step(model, optimizer)
        with pytest.raises(AccClipError) as raised:
            saver.save(model, optimizer, Progress(global_step=2))
        said = str(raised.value)
        assert "\n" not in said and said.startswith("checkpoint step_00000002 could not be saved: no space left on "
                                                     f"the disk of {run / 'checkpoints'} (the save needs about ")
        assert said.endswith("MB are free); the partial save was removed, what was saved before is kept"), said
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]

        with pytest.raises(AccClipError, match=r"epoch_1\.pt could not be saved: no space left on the disk of .*"
                                               r"the partial save was removed"):
            format_module.atomic_torch_save({"weights": torch.zeros(10_000)}, str(run / "checkpoints" / "epoch_1.pt"))
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]

        filler.unlink()
        assert manager(resume="latest").resume(model, optimizer, 10).global_step == 1
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights_at_1.items())


def test_bad_resume_input_in_this_process(manager_parts, tmp_path):
    accelerator, model, optimizer, manager = manager_parts
    with pytest.raises(AccClipError, match=r"^--resume .*nope: no such file or folder$"):
        manager(resume=str(tmp_path / "nope")).resume(model, optimizer, 10)
    (tmp_path / "notes").mkdir()
    with pytest.raises(AccClipError, match=r"notes: not an acc_clip checkpoint \(no complete.json\)$"):
        manager(resume=str(tmp_path / "notes")).resume(model, optimizer, 10)
    (tmp_path / "notes.txt").write_text("not torch")
    with pytest.raises(AccClipError, match="not an open_clip checkpoint torch can read"):
        manager(resume=str(tmp_path / "notes.txt")).resume(model, optimizer, 10)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 1, "state_dict": TinyNet(outputs=5).state_dict()}, other)
    with pytest.raises(AccClipError, match=r"weights of another architecture \('layer.weight' has shape \(5, 4\)"):
        manager(resume=str(other)).resume(model, optimizer, 10)

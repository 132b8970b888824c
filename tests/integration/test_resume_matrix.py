"""Resume with accumulation, from shards, with several processes, across a kill between the two
renames of a commit; the fp16 grad scaler's state; the warning when resume settings changed.

The matrix: `--accum-freq 2` x {CSV, shards} x {1 process, 2 processes under `accelerate launch
--config_file launch/cpu_2proc.yaml`}. In each cell a run is stopped mid-epoch with SIGTERM and
resumed with `--resume latest`; it must make exactly the per-step losses of the same run left alone
(max |difference| 0: the CPU, one thread per process), train on the same samples at every step and
process, and see each sample of an epoch exactly once (the opt-in record ACC_CLIP_DEBUG_SAMPLES=1).
Two cells go on after the SIGTERM:
- CSV, 1 process: the resume is killed between the two renames of the epoch-end commit that replaces
  step_6 (ACC_CLIP_TEST_KILL_BETWEEN_RENAMES, acc_clip/checkpoint/debug.py); the next start must put
  the complete step_6 that was moved aside back and resume from it.
- shards, 1 process: the resume is killed with SIGKILL in epoch 1, after the step-9 checkpoint.
Each cell has one uninterrupted reference run, started in the background while the cell's stopped
and resumed runs go on. 48 rows, 6 steps of 8 samples per epoch (batch 4 x 2 micro-batches, or
2 x 2 micro-batches x 2 processes), 2 epochs, no loader workers; step checkpoints only where a
cell needs one (each costs a 55 MB write) besides those of SIGTERM and of the last epoch's end.

In this process, on the CheckpointManager: the grad scaler's state (scale, growth tracker) goes
through a step checkpoint and an open_clip epoch file and back; a resume whose seed, batch size or
--accum-freq differ from the save's names them in a warning; a start after a kill between the
renames puts the checkpoint that was moved aside back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from background_trainer import Trainer, metric_rows, newest_checkpoint, saved_at_or_after, wait_until
from conftest import read_metrics, tiny_train_args

from acc_clip.checkpoint.debug import KILL_BETWEEN_RENAMES_ENV, SAMPLES_ENV
from acc_clip.checkpoint.format import MANIFEST, SCALER_FILE, TMP_PREFIX, Progress
from acc_clip.checkpoint.manager import CheckpointManager
from acc_clip.config import TrainConfig
from acc_clip.runtime.run_dir import LOG_FILE, SAMPLES_FILE
from acc_clip.runtime.signals import PREEMPTED_EXIT_CODE
from acc_clip.prep.shards.convert import convert_csv_to_shards

ROWS = 48
ACCUM = 2
STEPS_PER_EPOCH = 6
EPOCHS = 2
KILL_AFTER = STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2  # shards, 1 process: the step saved before the kill -9


@dataclass(frozen=True)
class Cell:
    data: str  # "csv" or "shards"
    processes: int

    def __str__(self) -> str:
        return f"{self.data}-{self.processes}proc"

    @property
    def batch(self) -> int:  # per process
        return ROWS // (STEPS_PER_EPOCH * ACCUM * self.processes)


CSV_1, SHARDS_1, CSV_2, SHARDS_2 = Cell("csv", 1), Cell("shards", 1), Cell("csv", 2), Cell("shards", 2)


@pytest.fixture(scope="module", autouse=True)
def reproducible_env():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # one thread per process: the same sums in every run
        patch.setenv(SAMPLES_ENV, "1")
        yield


@pytest.fixture(scope="module")
def train_data(small_csv, tmp_path_factory) -> dict[str, str]:
    """The first 48 rows of the fixture CSV, and the same rows as 4 shards of 12 (one shard list per
    process and loader, each holding exactly its batches)."""
    root = tmp_path_factory.mktemp("matrix")
    lines = small_csv.read_text().splitlines(keepends=True)
    (root / "train48.csv").write_text("".join(lines[:ROWS + 1]))
    convert_csv_to_shards(str(root / "train48.csv"), str(root / "shards"), samples_per_shard=ROWS // 4, workers=1,
                          progress=False)
    return {"csv": str(root / "train48.csv"), "shards": str(root / "shards" / "{00000..00003}.tar")}


def cell_args(cell: Cell, train_data: dict[str, str], logs: Path, name: str) -> list[str]:
    args = tiny_train_args(Path(train_data[cell.data]), logs, name, "--batch-size", str(cell.batch), "--accum-freq",
                           str(ACCUM), "--epochs", str(EPOCHS), "--workers", "0")
    if cell == CSV_1:  # a step save at each epoch's end, then the epoch-end save replacing it
        args += ["--save-every-n-steps", str(STEPS_PER_EPOCH), "--save-frequency", "1"]
    if cell == SHARDS_1:
        args += ["--save-every-n-steps", str(KILL_AFTER)]
    if cell.data == "shards":
        at = args.index("--csv-separator")
        args = args[:at] + args[at + 2:]
    return args


def start(cell: Cell, args: list[str], log_file: Path, env: dict[str, str] | None = None) -> Trainer:
    return Trainer(args, log_file, processes=cell.processes, env=env)


def resume_lines(trainer: Trainer) -> list[str]:
    """What a start said about its checkpoints: restored, removed, resumed from."""
    return [line.split(" | ")[-1] for line in trainer.log_file.read_text().splitlines()
            if any(word in line for word in ("restored ", "removing ", "resumed from ", "--resume latest:"))]


def assert_same_training(resumed: Path, reference: Path) -> None:
    """Each epoch saw every row once; every process trained on the reference's samples at every step;
    every step once, with the reference's loss to the last bit, its learning rate and sample count."""
    records = [json.loads(line) for line in (resumed / SAMPLES_FILE).read_text().splitlines()]
    by_step = {(r["step"], r["rank"]): r for r in records}
    assert len(by_step) == len(records), "a step of a process was recorded twice"
    for epoch in range(EPOCHS):
        seen = Counter(i for r in records if r["epoch"] == epoch for i in r["indices"])
        twice, skipped = sorted(i for i, n in seen.items() if n > 1), sorted(set(range(ROWS)) - set(seen))
        assert not twice, f"epoch {epoch}: samples seen twice: {twice}"
        assert not skipped, f"epoch {epoch}: samples skipped: {skipped}"
    reference_records = [json.loads(line) for line in (reference / SAMPLES_FILE).read_text().splitlines()]
    assert {key: r["indices"] for key, r in by_step.items()} == \
        {(r["step"], r["rank"]): r["indices"] for r in reference_records}  # the same samples, in the same order

    got, want = read_metrics(resumed), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(EPOCHS * STEPS_PER_EPOCH))  # each step once, none missing
    assert [r["step"] for r in want] == [r["step"] for r in got]
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(got, want)]
    assert max(differences) == 0, f"resumed losses differ from the uninterrupted run's: {differences}"
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    assert [r["samples_seen"] for r in got] == [r["samples_seen"] for r in want]


@pytest.mark.parametrize("cell", [CSV_1, SHARDS_1, CSV_2, SHARDS_2], ids=str)
def test_an_accumulated_run_stopped_mid_epoch_resumes_exactly(cell, train_data, tmp_path):
    args = cell_args(cell, train_data, tmp_path, "B")
    run_dir, checkpoints = tmp_path / "B", tmp_path / "B" / "checkpoints"
    started = [start(cell, cell_args(cell, train_data, tmp_path, "A"), tmp_path / "A.log")]  # reference
    try:
        # 1. SIGTERM in epoch 0 (to the launcher with 2 processes: torchrun passes it on to the ranks):
        # the step finishes on every process, a checkpoint is saved, the exit code says "preempted".
        started.append(start(cell, args, tmp_path / "B1.log"))
        wait_until(lambda: metric_rows(run_dir) >= 1, started[-1])
        started[-1].process.send_signal(signal.SIGTERM)
        code = started[-1].wait(timeout=120)
        if cell.processes == 1:
            assert code == PREEMPTED_EXIT_CODE, started[-1].tail()
        resume_from, progress = newest_checkpoint(run_dir)
        assert progress["epoch"] == 0 and 0 < progress["step_in_epoch"] < STEPS_PER_EPOCH, progress  # mid-epoch
        assert f"stopping on SIGTERM after step {progress['global_step']}" in (run_dir / LOG_FILE).read_text()
        if cell.processes == 2:
            assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in resume_from.iterdir()}

        if cell == CSV_1:
            # 2. Resume; the epoch-end save of step 6 replaces the step save of step 6 and is killed
            # after moving that one aside, before renaming itself into place.
            step6 = checkpoints / f"step_{STEPS_PER_EPOCH:08d}"
            started.append(start(cell, [*args, "--resume", "latest"], tmp_path / "B2.log",
                                   env={KILL_BETWEEN_RENAMES_ENV: str(STEPS_PER_EPOCH)}))
            assert started[-1].wait() == -signal.SIGKILL, started[-1].tail()
            assert f"resumed from {resume_from}:" in started[-1].log_file.read_text(), resume_lines(started[-1])
            moved_aside = checkpoints / f"{TMP_PREFIX}old-{step6.name}"
            assert (moved_aside / MANIFEST).is_file() and not step6.exists(), sorted(os.listdir(checkpoints))
            assert (checkpoints / "epoch_1.pt").is_file()  # exported before the step save
            # The next start must put it back, complete, and go on from the end of epoch 0.
            resume_from, expected = step6, f"epoch 0, step {STEPS_PER_EPOCH} of the epoch"
        elif cell == SHARDS_1:
            # 2. Resume, then kill -9 in epoch 1 once the step-9 checkpoint is complete.
            started.append(start(cell, [*args, "--resume", "latest"], tmp_path / "B2.log"))
            wait_until(lambda: saved_at_or_after(run_dir, KILL_AFTER), started[-1])
            started[-1].process.kill()
            assert started[-1].wait() == -signal.SIGKILL, started[-1].tail()
            assert f"resumed from {resume_from}:" in started[-1].log_file.read_text(), resume_lines(started[-1])
            resume_from, progress = newest_checkpoint(run_dir)
            assert progress["epoch"] == 1 and 0 < progress["step_in_epoch"] < STEPS_PER_EPOCH, progress
            expected = f"epoch 1, step {progress['step_in_epoch']} of the epoch"
        else:
            expected = f"epoch 0, step {progress['step_in_epoch']} of the epoch"

        # 3. Resume to the end: the same training as the reference, step for step.
        started.append(start(cell, [*args, "--resume", "latest"], tmp_path / "B3.log"))
        assert started[-1].wait() == 0, started[-1].tail()
        assert f"resumed from {resume_from}: {expected}" in started[-1].log_file.read_text(), resume_lines(started[-1])
        assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(TMP_PREFIX)]  # cleaned up
        assert started[0].wait() == 0, started[0].tail()
        assert_same_training(run_dir, tmp_path / "A")
    finally:
        for trainer in started:
            trainer.stop()


# the manager in this process ----------------------------------------------------------------------

class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.fixture
def manager_parts(tmp_path):
    """A real CPU Accelerator with a real grad scaler, a prepared TinyNet and AdamW, and a way to
    start a CheckpointManager on one run folder with given settings.

    The one thing that cannot exist on the CPU is Accelerate's own fp16 scaler: Accelerator builds a
    GradScaler only for fp16 on a device other than the CPU (accelerator.py, `mixed_precision == "fp16"
    and self.device.type != "cpu"`), and acc_clip plans fp16 on the CPU as bf16. So the test puts
    torch's CPU GradScaler (the same class and state_dict as on CUDA: scale, growth factor, backoff
    factor, growth interval, growth tracker) where Accelerate puts its own, `accelerator.scaler`,
    before `prepare`, as Accelerate does. Everything else is the real path: `accelerator.backward`
    scales the loss, the prepared optimizer steps and updates the scaler, and the manager saves and
    restores through Accelerate's save_state / load_state (scaler.pt) and open_clip's epoch file."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True)
    assert accelerator.scaler is None  # Accelerate makes none on the CPU, hence the one below
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    net = TinyNet()
    model, optimizer = accelerator.prepare(net, torch.optim.AdamW(net.parameters(), lr=0.1))

    def manager(**settings) -> CheckpointManager:
        config = TrainConfig(**{"train_data": "unused.csv", "model": "tiny-net", "name": "unit", "batch_size": 16,
                                "seed": 0, "accum_freq": 1, **settings})
        saver = CheckpointManager(str(tmp_path / "run"), config, accelerator)
        saver.steps_per_epoch = 10
        return saver

    yield accelerator, model, optimizer, manager
    AcceleratorState._reset_state(reset_partial_state=True)


def scaled_step(accelerator, model, optimizer, overflow: bool = False) -> None:
    loss = model(torch.randn(2, 4)).sum()
    accelerator.backward(loss * float("inf") if overflow else loss)  # inf: the scaler skips the step, backs off
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture
def scaler_moved_on(manager_parts):
    """A scaler whose state differs from a fresh one's in scale and growth tracker: 1024 backed off
    to 512 by an overflow, then 2 of the 3 good steps it needs to grow again."""
    accelerator, model, optimizer, manager = manager_parts
    scaled_step(accelerator, model, optimizer, overflow=True)
    scaled_step(accelerator, model, optimizer)
    scaled_step(accelerator, model, optimizer)
    state = accelerator.scaler.state_dict()
    assert (state["scale"], state["_growth_tracker"]) == (512.0, 2)
    return state


def test_the_grad_scaler_state_round_trips_through_a_step_checkpoint(manager_parts, scaler_moved_on):
    accelerator, model, optimizer, manager = manager_parts
    saved = manager().save(model, optimizer, Progress(epoch=0, step_in_epoch=3, global_step=3, samples_seen=6))
    assert SCALER_FILE in json.loads(Path(saved, MANIFEST).read_text())["files"]
    scaled_step(accelerator, model, optimizer)  # the third good step: the scale grows, the tracker restarts
    assert (accelerator.scaler.get_scale(), accelerator.scaler.state_dict()["_growth_tracker"]) == (1024.0, 0)

    manager(resume="latest").resume(model, optimizer, 10)
    assert accelerator.scaler.state_dict() == scaler_moved_on  # scale 512, growth tracker 2
    scaled_step(accelerator, model, optimizer)  # and it goes on from there: the third good step again
    assert accelerator.scaler.get_scale() == 1024.0


def test_the_grad_scaler_state_round_trips_through_an_open_clip_epoch_file(manager_parts, scaler_moved_on):
    accelerator, model, optimizer, manager = manager_parts
    manager(epochs=1).end_of_epoch(model, optimizer, Progress(epoch=1, global_step=10, samples_seen=20))
    epoch_file = Path(manager().directory) / "epoch_1.pt"
    assert torch.load(epoch_file, weights_only=True)["scaler"] == scaler_moved_on
    scaled_step(accelerator, model, optimizer)
    assert accelerator.scaler.get_scale() == 1024.0

    manager(resume=str(epoch_file)).resume(model, optimizer, 10)
    assert accelerator.scaler.state_dict() == scaler_moved_on


SAVED = {"batch_size": 16, "seed": 0, "accum_freq": 1}  # 160 rows: 10 steps per epoch


@pytest.mark.parametrize("changed, named", [
    ({}, None),
    ({"seed": 1}, "seed 0 -> 1"),
    ({"batch_size": 8}, "global_micro_batch 16 -> 8, steps_per_epoch 10 -> 20"),
    ({"accum_freq": 2}, "accum_freq 1 -> 2, steps_per_epoch 10 -> 5"),
    ({"seed": 3, "batch_size": 32, "accum_freq": 5},
     "seed 0 -> 3, global_micro_batch 16 -> 32, accum_freq 1 -> 5, steps_per_epoch 10 -> 1"),
], ids=["unchanged", "seed", "batch_size", "accum_freq", "all"])
def test_a_resume_with_other_data_settings_names_them_in_a_warning(manager_parts, caplog, changed, named):
    accelerator, model, optimizer, manager = manager_parts
    saved = manager(**SAVED).save(model, optimizer, Progress(epoch=0, step_in_epoch=1, global_step=1,
                                                             samples_seen=16))
    settings = {**SAVED, **changed}
    with caplog.at_level(logging.WARNING, logger="acc_clip"):
        manager(resume="latest", **settings).resume(model, optimizer,
                                                     160 // (settings["batch_size"] * settings["accum_freq"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if named is None:
        assert warnings == []
    else:
        assert warnings == [f"--resume {saved}: {named} since the save: the epoch's sample order or position "
                            "differs, so the rest of this epoch may repeat or skip samples"]


def test_a_start_puts_back_a_checkpoint_moved_aside_by_a_commit_killed_between_its_renames(manager_parts):
    """The states a kill inside commit_folder can leave, next to complete checkpoints: step 6 moved
    aside and its replacement not yet renamed (restored); step 3 moved aside after its replacement was
    renamed in (the old copy is stale: removed); an old copy without its manifest (removed)."""
    accelerator, model, optimizer, manager = manager_parts
    saver = manager()
    for step in (3, 6):
        saver.save(model, optimizer, Progress(epoch=0, step_in_epoch=step, global_step=step, samples_seen=2 * step))
    folder = Path(saver.directory)
    os.replace(folder / "step_00000006", folder / f"{TMP_PREFIX}old-step_00000006")
    shutil.copytree(folder / f"{TMP_PREFIX}old-step_00000006", folder / f"{TMP_PREFIX}step_00000006")
    shutil.copytree(folder / "step_00000003", folder / f"{TMP_PREFIX}old-step_00000003")
    (folder / f"{TMP_PREFIX}old-step_00000009").mkdir()

    manager()  # a new start
    assert sorted(os.listdir(folder)) == ["step_00000003", "step_00000006"]
    assert manager(resume="latest").resume(model, optimizer, 10) == Progress(epoch=0, step_in_epoch=6,
                                                                            global_step=6, samples_seen=12)

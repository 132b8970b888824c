"""--ema-decay through the trainer: the EMA each step checkpoint holds is the one computed by hand from the
saved weights of every step (plain SGD, timm's warm-up); a stop and `--resume latest` give it bit for bit;
2 processes under FSDP2 give one process's EMA, and a 2-process FSDP save resumes on one process; the exported
EMA loads in open_clip; evaluations carry `ema_` keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acc_clip.checkpoint.export import main as export
from acc_clip.checkpoint.folders import complete_checkpoints
from acc_clip.errors import UsageError
from acc_clip.model.ema import ema_decay
from acc_clip.model.weights import kept_tensors, step_weights
from acc_clip.runtime.faults import kill_at
from background_trainer import launch_with
from helpers import PLAIN_SGD, TINY_RN, TINY_VIT, run_trainer, tiny_train_args

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

DECAY, STEPS = 0.9, 6
# One process against two under FSDP: the weights agree within ~1e-7 after a few SGD steps (fp32 summation
# order, tests/integration/test_fsdp.py), the EMA, a weighted mean of them, as closely.
FSDP_TOLERANCE = 1e-6


def ema_args(csv: Path, logs: Path, name: str, *extra: str) -> list[str]:
    """tiny-rn (batch norm: its running statistics are averaged too), plain SGD at a small lr, a checkpoint
    after every step, all kept."""
    return tiny_train_args(
        csv,
        logs,
        name,
        *PLAIN_SGD,
        "--lr",
        "0.05",
        "--ema-decay",
        str(DECAY),
        "--save-every-n-steps",
        "1",
        "--keep-checkpoints",
        "0",
        *extra,
    )


def checkpoints(run_dir: Path) -> dict[int, Path]:
    folders = complete_checkpoints(str(run_dir / "checkpoints"))
    return {int(Path(path).name.split("_")[1]): Path(path) for path in folders}


@pytest.fixture(scope="module")
def straight(small_csv, tmp_path_factory) -> Path:
    """STEPS steps straight through, a checkpoint after each."""
    logs = tmp_path_factory.mktemp("ema")
    run_trainer(ema_args(small_csv, logs, "A", "--max-steps", str(STEPS)))
    return logs / "A"


def test_ema_is_the_recurrence_over_each_steps_saved_weights(straight):
    """e_1 = w_1, e_n = d_n e_(n-1) + (1 - d_n) w_n with timm's warm-up decay d_n, in float64 by hand from
    each step's saved weights (batch norm's running statistics included), against each step's saved EMA."""
    saved = checkpoints(straight)
    assert sorted(saved) == list(range(1, STEPS + 1))
    by_hand: dict[str, torch.Tensor] = {}
    worst = 0.0
    for step in range(1, STEPS + 1):
        weights, ema = step_weights(str(saved[step])), load_file(saved[step] / "ema.safetensors")
        assert ema.keys() == weights.keys()
        decay = ema_decay(step, DECAY, warmup=True)
        for name, weight in weights.items():
            if not weight.is_floating_point():  # batch norm's step count: copied
                assert torch.equal(ema[name], weight)
                continue
            w = weight.double()
            by_hand[name] = w if step == 1 else decay * by_hand[name] + (1 - decay) * w
            worst = max(worst, (ema[name].double() - by_hand[name]).abs().max().item())
    moved = max((w.double() - by_hand[k]).abs().max().item() for k, w in weights.items() if w.is_floating_point())
    print(f"\nEMA against the recurrence by hand, {STEPS} steps: max |diff| {worst:.3g}; EMA to weights {moved:.3g}")
    assert worst < 1e-6
    assert moved > 1e-4  # the EMA lags the weights: not a copy of them


def test_a_kill_and_resume_latest_give_the_ema_bit_for_bit(small_csv, tmp_path, straight):
    """Killed (SIGKILL) while the EMA of step 4 is being written in the background (--async-save), resumed with
    --resume latest from step 3 to step STEPS: every saved EMA equals the uninterrupted run's exactly."""
    args = ema_args(small_csv, tmp_path, "B", "--async-save", "--max-steps", str(STEPS))
    killed = run_trainer(args, check=False, env=kill_at("before_background_write", 4))
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_trainer([*args, "--resume", "latest"])
    assert "global step 3" in (resumed.stdout + resumed.stderr).split("resumed from")[-1].splitlines()[0]
    got, want = checkpoints(tmp_path / "B"), checkpoints(straight)
    assert sorted(got) == sorted(want)
    for step in got:
        a, b = load_file(got[step] / "ema.safetensors"), load_file(want[step] / "ema.safetensors")
        assert all(torch.equal(a[key], b[key]) for key in b), step
    assert json.loads((got[STEPS] / "complete.json").read_text())["ema"] == {"decay": DECAY, "warmup": True}


@pytest.mark.parametrize("form", ["local-dir", "epoch"])
def test_exported_ema_loads_in_open_clip(straight, tmp_path, form):
    """`acc-clip export --ema` in both formats: open_clip builds the model with the EMA's weights."""
    import open_clip

    step = checkpoints(straight)[STEPS]
    out = tmp_path / ("ema_dir" if form == "local-dir" else "ema.pt")
    assert export([str(step), "--out", str(out), "--format", form, "--ema"]) == 0
    if form == "local-dir":
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    else:  # open_clip ignores pretrained= beside a local-dir: model; its load_checkpoint reads the epoch file
        model, _, _ = open_clip.create_model_and_transforms(TINY_RN)
        open_clip.load_checkpoint(model, str(out))
    ema, weights = load_file(step / "ema.safetensors"), step_weights(str(step))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], ema[key]) for key in ema)
    assert any(not torch.equal(loaded[key], weights[key]) for key in weights)


def test_evaluations_carry_ema_keys(small_csv, val_csv, tmp_path):
    """--val-data with --ema-decay: each evaluation gives the metrics of the weights and, prefixed ema_, of the
    EMA; before training they are the same weights, after some steps they differ."""
    run_dir = tmp_path / "E"
    run_trainer(
        ema_args(small_csv, tmp_path, "E", "--max-steps", "4", "--val-data", str(val_csv), "--val-every-n-steps", "4")
    )
    results = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in results] == [0, 4]
    for result in results:
        plain = {k for k in result if k not in ("epoch", "step") and not k.startswith("ema_")}
        assert plain and {f"ema_{k}" for k in plain} <= result.keys()
    before, after = results
    assert before["ema_val_loss"] == before["val_loss"]
    assert after["ema_val_loss"] != after["val_loss"]


def test_resume_across_having_an_ema(small_csv, tmp_path):
    """A checkpoint without EMA resumed with --ema-decay: the EMA starts from its weights (said in one line),
    so after one more step it is d w_2 + (1 - d) w_3; that checkpoint resumed without --ema-decay: said, and
    the next checkpoint holds no EMA."""
    args = ema_args(small_csv, tmp_path, "C")
    without = [a for a in args if a not in ("--ema-decay", str(DECAY))]
    run_trainer([*without, "--max-steps", "2"])
    added = run_trainer([*args, "--max-steps", "3", "--resume", "latest"])
    assert "saved without an EMA; the EMA (--ema-decay 0.9) starts from its weights" in added.stdout
    saved = checkpoints(tmp_path / "C")
    w2, w3, ema = step_weights(str(saved[2])), step_weights(str(saved[3])), load_file(saved[3] / "ema.safetensors")
    decay = ema_decay(3, DECAY, warmup=True)
    expected = {k: decay * w2[k].double() + (1 - decay) * w3[k].double() for k in w3 if w3[k].is_floating_point()}
    assert max((ema[k].double() - v).abs().max().item() for k, v in expected.items()) < 1e-6
    dropped = run_trainer([*without, "--max-steps", "4", "--resume", "latest"])
    assert "holds an EMA of the weights (decay 0.9); this run has no --ema-decay, so it is not kept" in dropped.stdout
    assert not (checkpoints(tmp_path / "C")[4] / "ema.safetensors").exists()
    with pytest.raises(UsageError, match="holds no EMA of the weights"):
        export([str(saved[2]), "--out", str(tmp_path / "none.pt"), "--ema"])


# FSDP2 ----------------------------------------------------------------------------------------------


def fsdp_ema_args(csv: Path, logs: Path, name: str, batch: int, *extra: str) -> list[str]:
    """tiny-vit (no batch norm: one process with 16 rows is two with 8, with --gather-with-grad), 4 steps."""
    model = ["--model", TINY_VIT, "--batch-size", str(batch), "--gather-with-grad"]
    return ema_args(csv, logs, name, *model, "--max-steps", "4", *extra)


def test_ddp_two_processes_with_a_host_ema_give_one_process_ema_and_epoch_files(small_csv, tmp_path):
    """2 processes under DDP with --ema-device cpu against 1 process with twice the batch, one epoch (10 steps):
    the EMA within FSDP_TOLERANCE; each run's epoch_1.pt holds its last step checkpoint's EMA as state_dict_ema."""
    model = ["--model", TINY_VIT, "--gather-with-grad", "--epochs", "1", "--save-frequency", "1"]
    run_trainer(
        ema_args(small_csv, tmp_path, "D2", *model, "--batch-size", "8", "--ema-device", "cpu"),
        launcher=launch_with("cpu_2proc.yaml"),
    )
    run_trainer(ema_args(small_csv, tmp_path, "D1", *model, "--batch-size", "16"))
    ema = {}
    for name in ("D2", "D1"):
        last = checkpoints(tmp_path / name)[10]
        ema[name] = load_file(last / "ema.safetensors")
        epoch = torch.load(tmp_path / name / "checkpoints" / "epoch_1.pt", weights_only=True)
        assert all(torch.equal(epoch["state_dict_ema"][k], v) for k, v in ema[name].items())
    worst = max((ema["D2"][k] - v).abs().max().item() for k, v in ema["D1"].items())
    print(f"\nDDP 2 processes (EMA on the host) against 1 over 10 steps: EMA max |diff| {worst:.3g}")
    assert worst <= FSDP_TOLERANCE

    # An epoch file resumed (--resume epoch_1.pt): its state_dict_ema goes on, d e_10 + (1 - d) w_11 at step 11.
    epoch_file = tmp_path / "D1" / "checkpoints" / "epoch_1.pt"
    more = ["--epochs", "2", "--max-steps", "11", "--resume", str(epoch_file)]
    run_trainer(ema_args(small_csv, tmp_path, "D3", *model, "--batch-size", "16", *more))
    step = checkpoints(tmp_path / "D3")[11]
    weights, after = step_weights(str(step)), load_file(step / "ema.safetensors")
    decay = ema_decay(11, DECAY, warmup=True)
    expected = {k: decay * v.double() + (1 - decay) * weights[k].double() for k, v in ema["D1"].items()}
    assert max((after[k].double() - v).abs().max().item() for k, v in expected.items()) < 1e-6


def test_fsdp_two_processes_give_one_process_ema_and_reshard_to_one(small_csv, val_csv, tmp_path):
    """2 processes under FSDP2 (the EMA sharded like the weights, saved with torch.distributed.checkpoint)
    against 1 process with twice the batch: every step's EMA and weights within FSDP_TOLERANCE, evaluated every 2
    steps (the EMA's shards swapped in and out: the next steps' weights still agree) with the same ema_ metrics.
    Then the 2-process save of step 2 resumed on one process (--fsdp, a group of one: the EMA resharded): the
    same EMA at step 4, and at the epoch's end the gathered EMA in epoch_1.pt."""
    evaluated = ["--val-data", str(val_csv), "--val-every-n-steps", "2"]
    run_trainer(fsdp_ema_args(small_csv, tmp_path, "F2", 8, *evaluated), launcher=launch_with("cpu_2proc_fsdp.yaml"))
    run_trainer(fsdp_ema_args(small_csv, tmp_path, "F1", 16, *evaluated))
    results = {
        name: [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
        for name in ("F2", "F1")
    }
    assert [r["step"] for r in results["F2"]] == [r["step"] for r in results["F1"]] == [0, 2, 4]
    for a, b in zip(results["F2"], results["F1"]):
        assert a["ema_val_loss"] == pytest.approx(b["ema_val_loss"], abs=1e-5)
    step2 = results["F2"][1]
    print(f"\nFSDP2 at step 2: val_loss {step2['val_loss']:.6f}, ema_val_loss {step2['ema_val_loss']:.6f}")
    assert abs(step2["ema_val_loss"] - step2["val_loss"]) > 1e-4  # the EMA was evaluated, not the weights
    sharded, one = checkpoints(tmp_path / "F2"), checkpoints(tmp_path / "F1")
    assert sorted(sharded) == sorted(one) == [1, 2, 3, 4]
    assert {"ema/__0_0.distcp", "ema/__1_0.distcp", "ema/.metadata"} <= set(
        json.loads((sharded[4] / "complete.json").read_text())["files"]
    )
    worst = weights = 0.0
    for step in sharded:
        a, b = kept_tensors(str(sharded[step]), "ema"), load_file(one[step] / "ema.safetensors")
        assert a is not None and a.keys() == b.keys()
        worst = max(worst, max((a[k] - b[k]).abs().max().item() for k in b))
        c, d = step_weights(str(sharded[step])), step_weights(str(one[step]))
        weights = max(weights, max((c[k] - d[k]).abs().max().item() for k in d))
    print(f"\nFSDP2 2 processes against 1 over 4 steps: EMA max |diff| {worst:.3g}, weights {weights:.3g}")
    assert worst <= FSDP_TOLERANCE and weights <= FSDP_TOLERANCE

    resumed = tmp_path / "F2"  # resumed in the same run folder, from step 2, on one process
    # to the epoch's end (10 steps): its epoch_1.pt, gathered under FSDP, holds the EMA as state_dict_ema
    to_the_end = ["--max-steps", "10", "--save-frequency", "1"]
    run_trainer(fsdp_ema_args(small_csv, tmp_path, "F2", 16, "--fsdp", "--resume", str(sharded[2]), *to_the_end))
    again = kept_tensors(str(checkpoints(resumed)[4]), "ema")
    assert again is not None
    reshard = max((again[k] - v).abs().max().item() for k, v in load_file(one[4] / "ema.safetensors").items())
    print(f"2-process FSDP save resumed on 1 process: step-4 EMA against 1 process {reshard:.3g}")
    assert reshard <= FSDP_TOLERANCE
    last = kept_tensors(str(checkpoints(resumed)[10]), "ema")
    epoch = torch.load(resumed / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict_ema"]
    assert last is not None and last.keys() == epoch.keys()
    assert all(torch.equal(epoch[k], v) for k, v in last.items())

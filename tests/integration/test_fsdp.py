"""FSDP2 on two CPU processes (gloo), launched as a user would with `accelerate launch --config_file
launch/cpu_2proc_fsdp.yaml`: sharded training gives the losses and weights of DDP (launch/cpu_2proc.yaml)
and of one process with twice the batch, over 20 steps of plain SGD (lr 1, so a gradient off by any
factor shows), with --accum-freq 2 (one gradient reduce-scatter per update) and --gather-with-grad
--local-loss; tiny-rn too (against DDP only: batch norm normalises each process's rows).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acc_clip.checkpoint.folders import TMP_PREFIX, complete_checkpoints, read_manifest
from acc_clip.io.sealed import MANIFEST
from acc_clip.runtime.faults import kill_at
from background_trainer import ACCELERATE, Trainer, free_port, launch_with, metric_rows, newest_checkpoint, wait_until
from fsdp_worker import SCENARIOS, SHORT_SCENARIOS, SHORT_STEPS, STEPS
from helpers import REPO, TINY_RN, TINY_VIT, max_difference, read_metrics, tiny_train_args

# Measured on this CPU (fsdp_worker, 20 steps): FSDP and DDP agree bit for bit (0.0); against one process
# losses within 2.4e-7 and weights within 1.2e-6 (fp32 summation order). A gradient off by a factor of 2,
# or one micro-batch's gradient missing, moves weights by ~1e-2.
TOLERANCE = 1e-5
ALL = {**SCENARIOS, **SHORT_SCENARIOS}
WITH_ONE_PROCESS_REFERENCE = [name for name, (model, _, _) in ALL.items() if "tiny-rn" not in model]


def run_worker(launcher: list[str], out, train_csv) -> None:
    result = subprocess.run(
        launcher + [str(REPO / "tests" / "fsdp_worker.py"), str(out), str(train_csv)],
        timeout=600,
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def results(train_csv, tmp_path_factory) -> dict:
    """{"fsdp" | "ddp" | "one": folder of <scenario>.pt}."""
    folders = {kind: tmp_path_factory.mktemp(kind) for kind in ("fsdp", "ddp", "one")}
    run_worker(launch_with("cpu_2proc_fsdp.yaml"), folders["fsdp"], train_csv)
    run_worker(launch_with("cpu_2proc.yaml"), folders["ddp"], train_csv)
    run_worker([sys.executable], folders["one"], train_csv)
    return folders


def load(results, kind: str, scenario: str) -> dict:
    return torch.load(results[kind] / f"{scenario}.pt")


def steps_of(scenario: str) -> int:
    return STEPS if scenario in SCENARIOS else SHORT_STEPS


@pytest.mark.parametrize("scenario", ALL)
def test_fsdp_matches_ddp(results, scenario):
    fsdp, ddp = load(results, "fsdp", scenario), load(results, "ddp", scenario)
    assert (fsdp["fsdp"], fsdp["processes"], ddp["fsdp"], ddp["processes"]) == (True, 2, False, 2)
    assert len(fsdp["losses"]) == steps_of(scenario)
    print(
        f"\n{scenario}: FSDP-DDP losses {max(abs(a - b) for a, b in zip(fsdp['losses'], ddp['losses'])):.3g}, "
        f"weights {max_difference(fsdp['weights'], ddp['weights']):.3g}"
    )
    assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=TOLERANCE)
    assert max_difference(fsdp["weights"], ddp["weights"]) <= TOLERANCE


@pytest.mark.parametrize("scenario", WITH_ONE_PROCESS_REFERENCE)
def test_fsdp_matches_one_process_with_twice_the_batch(results, scenario):
    fsdp, one = load(results, "fsdp", scenario), load(results, "one", scenario)
    print(
        f"\n{scenario}: FSDP-one losses {max(abs(a - b) for a, b in zip(fsdp['losses'], one['losses'])):.3g}, "
        f"weights {max_difference(fsdp['weights'], one['weights']):.3g}"
    )
    assert fsdp["losses"] == pytest.approx(one["losses"], abs=TOLERANCE)
    assert max_difference(fsdp["weights"], one["weights"]) <= TOLERANCE


def test_full_state_dict_is_open_clips(results):
    """The gathered weights have open_clip's names and shapes: logit_scale 0-d again (held as a
    1-element vector while sharded), no wrapper prefixes."""
    import open_clip

    weights = load(results, "fsdp", "vit")["weights"]
    model = open_clip.create_model(f"local-dir:{REPO / 'configs' / 'models' / 'tiny-vit'}")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("plain, accumulated", [("vit", "vit_accum2"), ("rn", "rn_local_accum2")])
def test_accumulation_reduce_scatters_once_per_update(results, plain, accumulated):
    """FSDP2 reduce-scatters once per unit per reduction: two micro-batches per step must cost what one
    does (the first micro-batch's backward runs with set_requires_gradient_sync(False))."""
    once = load(results, "fsdp", plain)["reduce_scatters"]
    assert len(once) == STEPS and all(calls > 0 for calls in once)
    assert load(results, "fsdp", accumulated)["reduce_scatters"] == once


# the trainer: sharded step checkpoints ---------------------------------------------------------------

FSDP_ROWS, FSDP_STEPS_PER_EPOCH, FSDP_EPOCHS, FSDP_SAVE_EVERY = 160, 10, 2, 4


def fsdp_args(csv, logs, name: str, *extra: str) -> list[str]:
    """tiny-vit (no batch norm, so 1 process x 16 is 2 x 8), AdamW (its moments are sharded state), 2 x 8
    per step: 10 steps per epoch of the 160-row CSV, 2 epochs, a step checkpoint every 4 steps (all kept) and
    epoch_N.pt at each epoch's end."""
    return tiny_train_args(
        csv,
        logs,
        name,
        "--model",
        TINY_VIT,
        "--batch-size",
        "8",
        "--gather-with-grad",
        "--save-every-n-steps",
        str(FSDP_SAVE_EVERY),
        "--save-frequency",
        "1",
        "--keep-checkpoints",
        "0",  # the tests resume from the early checkpoints too
        *extra,
    )


def fsdp_trainer(args: list[str], log_file, *options: str, env=None) -> Trainer:
    return Trainer(args, log_file, processes=2, launcher=launch_with("cpu_2proc_fsdp.yaml", *options), env=env)


@pytest.fixture(scope="module")
def fsdp_reference(small_csv, tmp_path_factory):
    """Run A: FSDP on 2 processes straight through, in the background while the tests run theirs."""
    logs = tmp_path_factory.mktemp("fsdp_reference")
    trainer = fsdp_trainer(fsdp_args(small_csv, logs, "A"), logs / "A.log", env={"OMP_NUM_THREADS": "1"})

    def finished() -> Path:
        assert trainer.wait(timeout=600) == 0, trainer.tail()
        return logs / "A"

    yield finished
    trainer.stop()


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(run_dir)}


def test_sharded_checkpoint_commits_with_a_complete_manifest(fsdp_reference):
    """Each process's shards under pytorch_model_fsdp_0/ and optimizer_0/, listed with their sizes in
    complete.json (written last), and no weights file of the unsharded format."""
    step = Path(complete_checkpoints(str(fsdp_reference() / "checkpoints"))[0])
    manifest = read_manifest(str(step))
    files = manifest["files"]
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {f"{folder}/__0_0.distcp", f"{folder}/__1_0.distcp", f"{folder}/.metadata"} <= set(files)
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(files) and "model.safetensors" not in files
    assert all((step / name).stat().st_size == size for name, size in files.items())
    assert manifest["data"]["world_size"] == 2


def test_sigterm_then_kill9_while_saving_resume_exactly(small_csv, tmp_path, fsdp_reference):
    """SIGTERM in epoch 0 (to the launcher; torchrun passes it on): a sharded checkpoint of the step.
    Resume, then kill -9 on rank 0 after the shards of step 16 are written and before its manifest.
    Resume to the end: every step's loss equals the uninterrupted run's."""
    env = {"OMP_NUM_THREADS": "1"}
    args, run_dir = fsdp_args(small_csv, tmp_path, "B"), tmp_path / "B"
    trainer = fsdp_trainer(args, tmp_path / "B1.log", env=env)
    try:
        wait_until(lambda: metric_rows(run_dir) >= 2, trainer)
        trainer.process.send_signal(signal.SIGTERM)
        trainer.wait(timeout=120)
        _first, progress = newest_checkpoint(run_dir)
        assert progress["epoch"] == 0 and 0 < progress["step_in_epoch"] < FSDP_STEPS_PER_EPOCH, progress

        trainer = fsdp_trainer(
            [*args, "--resume", "latest"], tmp_path / "B2.log", env={**env, **kill_at("before_commit", 16)}
        )
        assert trainer.wait(timeout=300) != 0, trainer.tail()
        partial = run_dir / "checkpoints" / f"{TMP_PREFIX}step_00000016"
        assert (partial / "pytorch_model_fsdp_0" / ".metadata").is_file() and not (partial / MANIFEST).exists()
        second, progress = newest_checkpoint(run_dir)
        assert second.name == "step_00000012" and progress["epoch"] == 1, progress  # mid-epoch 1

        trainer = fsdp_trainer([*args, "--resume", "latest"], tmp_path / "B3.log", env=env)
        assert trainer.wait(timeout=300) == 0, trainer.tail()
    finally:
        trainer.stop()
    assert f"resumed from {second}:" in (tmp_path / "B3.log").read_text() and not partial.exists()
    got, want = losses_by_step(run_dir), losses_by_step(fsdp_reference())
    assert sorted(got) == list(range(FSDP_EPOCHS * FSDP_STEPS_PER_EPOCH)) == sorted(want)
    worst = max(abs(got[step] - want[step]) for step in got)
    print(f"\nFSDP SIGTERM + kill -9 resume: max |loss(B) - loss(A)| = {worst:.3g}")
    assert worst <= 1e-6


def test_a_two_process_sharded_checkpoint_resumes_on_one_and_on_two(small_csv, tmp_path, fsdp_reference):
    """The step-12 checkpoint of run A (2 shards), resumed under FSDP on 1 process (batch 16: the same
    global batch, so the same samples) and on 2: DCP reshards; both end with the same weights and
    losses as run A."""
    step12 = str(fsdp_reference() / "checkpoints" / "step_00000012")
    env = {"OMP_NUM_THREADS": "1"}
    one = fsdp_trainer(
        [*fsdp_args(small_csv, tmp_path, "one", "--resume", step12), "--batch-size", "16"],
        tmp_path / "one.log",
        "--num_processes",
        "1",
        env=env,
    )
    assert one.wait(timeout=300) == 0, one.tail()
    two = fsdp_trainer(fsdp_args(small_csv, tmp_path, "two", "--resume", step12), tmp_path / "two.log", env=env)
    assert two.wait(timeout=300) == 0, two.tail()
    assert "1 process(es)" in (tmp_path / "one" / "out.log").read_text()
    final = {
        run: torch.load(path / "checkpoints" / f"epoch_{FSDP_EPOCHS}.pt")["state_dict"]
        for run, path in (("one", tmp_path / "one"), ("two", tmp_path / "two"), ("A", fsdp_reference()))
    }
    print(
        f"\nFSDP reshard: weights one-two {max_difference(final['one'], final['two']):.3g}, "
        f"two-A {max_difference(final['two'], final['A']):.3g}"
    )
    assert max_difference(final["one"], final["two"]) <= TOLERANCE
    assert max_difference(final["two"], final["A"]) <= TOLERANCE
    assert_open_clip_optimizer_layout(tmp_path / "one", tmp_path / "two")
    want = losses_by_step(fsdp_reference())
    for run in ("one", "two"):
        got = losses_by_step(tmp_path / run)
        assert sorted(got) == list(range(12, FSDP_EPOCHS * FSDP_STEPS_PER_EPOCH))
        assert max(abs(got[step] - want[step]) for step in got) <= TOLERANCE


def assert_open_clip_optimizer_layout(*run_dirs: Path) -> None:
    """epoch_N.pt's optimizer state, gathered from the shards (parallel.full_optimizer_state_dict), is
    torch's layout for the plain open_clip model: one entry per parameter of acc_clip's AdamW groups, in
    their order, shaped as the parameter (logit_scale's moments 0-d again); the 1-shard and 2-shard
    runs agree."""
    import open_clip

    from acc_clip.model.optim import parameter_groups

    model = open_clip.create_model(TINY_VIT)
    shapes = [tuple(p.shape) for group in parameter_groups(model, 0.1) for p in group["params"]]
    states = [torch.load(run / "checkpoints" / f"epoch_{FSDP_EPOCHS}.pt")["optimizer"] for run in run_dirs]
    for state in states:
        assert sorted(state["state"]) == list(range(len(shapes)))
        assert [tuple(state["state"][i]["exp_avg"].shape) for i in range(len(shapes))] == shapes
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.1))
        optimizer.load_state_dict(state)  # loads as open_clip_train's resume would
    for index in states[0]["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(states[0]["state"][index][key], states[1]["state"][index][key], atol=TOLERANCE)


def test_a_sharded_step_checkpoint_loads_whole_for_export_and_evaluation(fsdp_reference, tmp_path):
    """model.weights.load_weights (evaluation) and `acc-clip export` read a sharded folder in one process: the
    same weights as the epoch_N.pt gathered at the same step, logit_scale 0-d; another architecture is
    one line."""
    import open_clip

    from acc_clip.checkpoint.export import export_checkpoint, export_local_dir
    from acc_clip.errors import AccClipError
    from acc_clip.model.weights import load_weights

    checkpoints = fsdp_reference() / "checkpoints"
    last = str(checkpoints / f"step_{FSDP_EPOCHS * FSDP_STEPS_PER_EPOCH:08d}")
    model = open_clip.create_model(TINY_VIT)
    assert load_weights(model, last, "--checkpoint") is None
    exported = torch.load(checkpoints / f"epoch_{FSDP_EPOCHS}.pt")["state_dict"]
    assert max_difference(model.state_dict(), exported) == 0 and model.logit_scale.shape == ()
    export_checkpoint(last, str(tmp_path / "exported.pt"))
    assert max_difference(torch.load(tmp_path / "exported.pt")["state_dict"], exported) == 0
    export_local_dir(last, str(tmp_path / "local"))
    assert max_difference(open_clip.create_model(f"local-dir:{tmp_path / 'local'}").state_dict(), exported) == 0
    with pytest.raises(AccClipError, match="weights of another architecture"):
        load_weights(open_clip.create_model(TINY_RN), str(checkpoints / "step_00000004"), "--checkpoint")


def test_two_machines_on_localhost_train_as_one_machine_with_two_processes(small_csv, tmp_path, fsdp_reference):
    """launch/cpu_2proc_fsdp.yaml as two machines of one process each (--num_machines 2, --machine_rank 0
    and 1, the main machine at 127.0.0.1), as launch/multi_node.yaml starts real ones: the first 4 steps
    equal the one-machine run's."""
    port = str(free_port())
    machine = [
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        port,
    ]
    args = [*fsdp_args(small_csv, tmp_path, "M"), "--max-steps", "4"]
    env = {"OMP_NUM_THREADS": "1"}
    base = [ACCELERATE, "launch", "--config_file", str(REPO / "launch" / "cpu_2proc_fsdp.yaml"), *machine]
    machines = [
        Trainer(
            args, tmp_path / f"machine{rank}.log", processes=2, env=env, launcher=[*base, "--machine_rank", str(rank)]
        )
        for rank in (0, 1)
    ]
    try:
        assert [m.wait(timeout=300) for m in machines] == [0, 0], machines[0].tail() + machines[1].tail()
    finally:
        for trainer in machines:
            trainer.stop()
    got, want = losses_by_step(tmp_path / "M"), losses_by_step(fsdp_reference())
    assert sorted(got) == [0, 1, 2, 3]
    assert max(abs(got[step] - want[step]) for step in got) <= TOLERANCE
    assert "2 process(es)" in (tmp_path / "M" / "out.log").read_text()


def test_a_sharded_checkpoint_resumed_without_the_fsdp_launch_config_is_one_line(
    small_csv, tmp_path, fsdp_reference, train_in_process
):
    step4 = fsdp_reference() / "checkpoints" / "step_00000004"
    # One process with the reference's global batch (2 x 8): the sample order would continue, the format cannot.
    args = fsdp_args(small_csv, tmp_path, "plain", "--batch-size", "16", "--resume", str(step4))
    status, errors = train_in_process(args)
    assert status == 2
    assert errors == [
        f"error: --resume {step4}: a sharded (FSDP) checkpoint; resume it with --fsdp or under an FSDP launch "
        "config (launch/fsdp.yaml), on any number of processes"
    ]

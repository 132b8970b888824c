"""`acc-clip launch` (acc_clip/runtime/launcher.py) on 1 process (launch/single_card.yaml) and 2 CPU
processes (launch/cpu_2proc.yaml): the trainer's one `error:` line and its exit status come out alone,
with no launcher traceback or report; SIGTERM mid-run makes the trainers save and the launcher exit 75.
Plain `accelerate launch` fails each of these: a traceback and status 1 on an error, a SignalException
traceback and status 1 (several processes) or death by SIGTERM (one) on a stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from acc_clip.checkpoint.folders import complete_checkpoints
from acc_clip.io.sealed import MANIFEST
from background_trainer import free_port, metric_rows
from helpers import REPO, read_metrics, tiny_train_args

CONFIGS = {1: "single_card.yaml", 2: "cpu_2proc.yaml"}
LAUNCHER_NOISE = ("Traceback", "CalledProcessError", "ChildFailedError", "SignalException")
PREEMPTED = 75


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on a small shared CPU; no torchrun notice either


def launch_train(processes: int) -> list[str]:
    """`acc-clip launch --config_file launch/X.yaml [--main_process_port P] train`, before the trainer's flags."""
    options = ["--config_file", str(REPO / "launch" / CONFIGS[processes])]
    if processes > 1:  # other test runs on this machine may hold torch's default port
        options += ["--main_process_port", str(free_port())]
    return [sys.executable, "-m", "acc_clip.cli", "launch", *options, "train"]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def assert_no_launcher_noise(*outputs: str) -> None:
    for output in outputs:
        for noise in LAUNCHER_NOISE:
            assert noise not in output, output[-3000:]


@pytest.mark.parametrize("processes", [1, 2])
def test_trainer_error_is_one_line_and_its_status(train_csv, tmp_path, processes):
    result = subprocess.run(
        launch_train(processes) + tiny_train_args(train_csv, tmp_path, "bad", "--batch-size", "0"),
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        env=environment(),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert_no_launcher_noise(result.stdout, result.stderr)
    # Each rank prints the error; torch's agent may end the second rank before it does.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= processes and set(lines) == {"error: --batch-size 0: must be at least 1"}, lines


def test_a_data_error_keeps_its_own_status(train_csv, tmp_path):
    """Not only usage errors: a missing training CSV is a data error, status 3, through the launcher."""
    args = tiny_train_args(tmp_path / "no_such.csv", tmp_path, "missing")
    result = subprocess.run(
        launch_train(1) + args, check=False, capture_output=True, text=True, timeout=180, cwd=REPO, env=environment()
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert_no_launcher_noise(result.stdout, result.stderr)
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"error: {tmp_path / 'no_such.csv'}: CSV file not found"
    ]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--config_file", "launch/no_such.yaml"], "launch/no_such.yaml"),
        (["--num_processes", "two"], "--num_processes"),
    ],
    ids=["missing-config", "bad-option"],
)
def test_launcher_error_is_one_line_status_2(train_csv, tmp_path, options, message):
    command = [sys.executable, "-m", "acc_clip.cli", "launch", *options, "train"]
    result = subprocess.run(
        command + tiny_train_args(train_csv, tmp_path, "bad"),
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=environment(),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr[-3000:]
    assert result.stdout == ""


def stop_mid_run(
    command: list[str], run_dir: Path, tmp_path: Path, *, whole_group: bool, signum: int = signal.SIGTERM
) -> tuple[int, str, str]:
    """Start `command` in a session of its own, signal it (its process group, or the launcher alone) once
    the trainer has logged two steps; (exit status, stdout, stderr). Whatever it leaves is killed."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, cwd=REPO, env=environment(), start_new_session=True
        )
    launched = psutil.Process(process.pid)
    tree = [launched]  # with the trainers, found before the signal: the workers run in sessions of their own
    try:
        deadline = time.monotonic() + 180
        while metric_rows(run_dir) < 2:
            assert process.poll() is None, f"exited {process.returncode} first:\n{err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no steps logged:\n{err.read_text()[-3000:]}"
            time.sleep(0.05)
        tree += launched.children(recursive=True)
        if whole_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        status = process.wait(timeout=120)
    finally:
        for leftover in tree:  # plain `accelerate launch` would leave a trainer running
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        process.wait(timeout=30)
    return status, out.read_text(), err.read_text()


@pytest.mark.parametrize(
    "processes, whole_group, signum",
    [(1, True, signal.SIGTERM), (2, True, signal.SIGTERM), (1, False, signal.SIGTERM), (2, False, signal.SIGUSR1)],
    ids=["1proc-group", "2proc-group", "1proc-launcher-alone", "2proc-launcher-alone-sigusr1"],
)
def test_a_stop_signal_saves_and_exits_75(train_csv, tmp_path, processes, whole_group, signum):
    """SIGTERM, or SLURM's warning SIGUSR1 (sent to srun's task, the launcher, which passes it on; without a
    handler, SIGUSR1 kills a process: status 138, not 75)."""
    run_dir = tmp_path / "run"
    command = launch_train(processes) + tiny_train_args(train_csv, tmp_path, "run", "--epochs", "20")
    status, stdout, stderr = stop_mid_run(command, run_dir, tmp_path, whole_group=whole_group, signum=signum)
    assert status == PREEMPTED, stderr[-3000:]
    assert_no_launcher_noise(stdout, stderr)
    saved = complete_checkpoints(str(run_dir / "checkpoints"))
    assert saved and (Path(saved[-1]) / MANIFEST).is_file()
    # The save was the stop's: taken after the last logged step, as no periodic saves are asked for.
    assert Path(saved[-1]).name == f"step_{len(read_metrics(run_dir)):08d}"
    # "on SIGTERM", or "on a stop signal on another process" when rank 1 got it first and voted before rank 0 did
    assert "stopping on " in (run_dir / "out.log").read_text()


def test_a_stop_during_the_start_up_exits_75_before_the_first_step(train_csv, tmp_path):
    """2 processes signalled once the run folder exists (the model, data and resume still to come): without a
    handler installed that early they die of it (status 143); here they stop before training, with 75."""
    run_dir = tmp_path / "run"
    command = launch_train(2) + tiny_train_args(train_csv, tmp_path, "run", "--epochs", "20")
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO, env=environment(), start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "out.log").exists():
            assert process.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert status == PREEMPTED, err.read_text()[-3000:]
    log = (run_dir / "out.log").read_text()
    assert "stopping on " in log and metric_rows(run_dir) <= 1, log[-3000:]

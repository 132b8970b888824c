"""The trainer end to end, as a user runs it: the seed's default command, bad input, bad images."""

import shlex
import sys

from acc_clip.errors import DataError, DivergedError, UsageError
from helpers import REPO, SEED_COMMAND, TINY_RN, read_metrics, run_trainer, tiny_train_args


def test_seed_default_command_runs_on_the_cpu(train_csv, tmp_path):
    # The vendor's command with only the data, the model, one epoch and no --device changed.
    args = shlex.split(SEED_COMMAND.replace("--device sdaa ", ""))
    replace = {"--train-data": str(train_csv), "--model": TINY_RN, "--epochs": "1", "--logs": str(tmp_path)}
    for i, token in enumerate(args):
        if token in replace:
            args[i + 1] = replace[token]
    args += ["--name", "seed", "--batch-size", "32", "--workers", "2"]  # 320 rows: batch 64 would give 5 steps
    result = run_trainer(args)
    rows = read_metrics(tmp_path / "seed")
    assert [r["step"] for r in rows] == list(range(10))
    assert "device cpu" in result.stdout and "precision amp" in result.stdout
    assert "has no effect" in result.stdout  # the coca flags are announced
    assert (tmp_path / "seed" / "checkpoints" / "epoch_1.pt").exists()


def test_loss_falls_and_metrics_have_one_record_per_step(train_csv, tmp_path):
    run_trainer(tiny_train_args(train_csv, tmp_path, "fall", "--epochs", "3", "--workers", "2"))
    rows = read_metrics(tmp_path / "fall")
    assert [r["step"] for r in rows] == list(range(60))
    assert {"epoch", "loss", "lr", "logit_scale", "samples_per_second", "data_time", "samples_seen"} <= rows[0].keys()
    first, last = sum(r["loss"] for r in rows[:10]) / 10, sum(r["loss"] for r in rows[-10:]) / 10
    assert last < first - 0.3, (first, last)
    assert rows[-1]["samples_seen"] == 60 * 16
    assert (tmp_path / "fall" / "config.yaml").exists() and (tmp_path / "fall" / "out.log").exists()


def _error_line(result, status: int):
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert result.returncode == status and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_csv_without_the_columns_lists_the_columns_found(tmp_path, train_in_process):
    path = tmp_path / "bad.csv"
    path.write_text("image,caption\na.jpg,a cat\n")
    status, errors = train_in_process(tiny_train_args(path, tmp_path, "x"))
    assert status == DataError.exit_status and len(errors) == 1 and "columns found: 'image', 'caption'" in errors[0], (
        errors
    )


def test_empty_csv(tmp_path, train_in_process):
    path = tmp_path / "empty.csv"
    path.write_text("")
    status, errors = train_in_process(tiny_train_args(path, tmp_path, "x"))
    assert status == DataError.exit_status and len(errors) == 1 and "the CSV is empty" in errors[0], errors


def test_unknown_key_on_the_command_line(train_csv, tmp_path, train_in_process):
    status, errors = train_in_process(tiny_train_args(train_csv, tmp_path, "x", "--lr-sheduler", "cosine"))
    assert status == UsageError.exit_status and len(errors) == 1 and "did you mean '--lr-scheduler'" in errors[0], (
        errors
    )


def _csv_with_bad_rows(train_csv, tmp_path, num_bad):
    rows = train_csv.read_text().splitlines()
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    bad = [f"{tmp_path}/missing_{i}.jpg,a red circle" if i % 2 else f"{corrupt},a blue square" for i in range(num_bad)]
    path = tmp_path / "with_bad.csv"
    path.write_text("\n".join(rows[:1] + bad + rows[1:]) + "\n")
    return path


def test_bad_images_are_skipped_counted_and_training_goes_on(train_csv, tmp_path):
    path = _csv_with_bad_rows(train_csv, tmp_path, 3)
    result = run_trainer(tiny_train_args(path, tmp_path, "bad", "--epochs", "1", "--max-bad-fraction", "0.05"))
    assert "3 samples skipped so far as missing or corrupt" in result.stdout
    assert "missing_1.jpg" in result.stdout + result.stderr and "corrupt.jpg" in result.stdout + result.stderr
    assert len(read_metrics(tmp_path / "bad")) == 323 // 16


def test_too_many_bad_images_stop_the_run(train_csv, tmp_path):
    path = _csv_with_bad_rows(train_csv, tmp_path, 40)
    result = run_trainer(tiny_train_args(path, tmp_path, "toobad", "--epochs", "1"), check=False)
    assert "more than --max-bad-fraction 0.01" in _error_line(result, DataError.exit_status)


def test_existing_run_is_not_overwritten(train_csv, tmp_path, train_in_process):
    run_trainer(tiny_train_args(train_csv, tmp_path, "once", "--epochs", "1", "--max-steps", "2"))
    before = {path: path.read_bytes() for path in (tmp_path / "once").rglob("*") if path.is_file()}
    status, errors = train_in_process(tiny_train_args(train_csv, tmp_path, "once", "--epochs", "1"))
    assert status == UsageError.exit_status and len(errors) == 1 and "already holds a run" in errors[0], errors
    assert {path: path.read_bytes() for path in (tmp_path / "once").rglob("*") if path.is_file()} == before


def test_cli_entry_points_agree(train_csv, tmp_path):
    import subprocess

    for name, command in [
        ("cli", [sys.executable, "-m", "acc_clip.cli", "train"]),
        (
            "launch",
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--num_processes",
                "1",
                "--cpu",
                "-m",
                "acc_clip.train",
            ],
        ),
    ]:
        args = tiny_train_args(train_csv, tmp_path, name, "--epochs", "1", "--max-steps", "3")
        result = subprocess.run(command + args, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert [r["loss"] for r in read_metrics(tmp_path / "cli")] == [r["loss"] for r in read_metrics(tmp_path / "launch")]


def test_a_nan_loss_stops_with_its_step_and_the_workers_do_not_hang(train_csv, tmp_path):
    # Loader workers ignore SIGTERM so the trainer can save on preemption; after an error they must
    # still be ended, or the interpreter's exit would wait on them forever.
    result = run_trainer(
        tiny_train_args(train_csv, tmp_path, "nan", "--workers", "2", "--lr", "1e9", "--warmup", "1"),
        check=False,
        timeout=120,
    )
    assert "the loss is nan at step 1" in _error_line(result, DivergedError.exit_status)


def test_channels_last_trains_and_checkpoints(train_csv, tmp_path):
    run_trainer(
        tiny_train_args(train_csv, tmp_path, "cl", "--channels-last", "--save-every-n-steps", "2", "--max-steps", "2")
    )
    assert (tmp_path / "cl" / "checkpoints" / "step_00000002" / "complete.json").exists()


def test_open_clip_s_logging_flags(train_csv, tmp_path):
    """--log-local: each process writes out-RANK.log (open_clip_train's name) instead of the main process's
    out.log; --copy-codebase: the package as it ran, in code/; --debug: debug-level lines."""
    result = run_trainer(
        tiny_train_args(train_csv, tmp_path, "logs", "--max-steps", "1", "--log-local", "--copy-codebase", "--debug")
    )
    run = tmp_path / "logs"
    assert (run / "out-0.log").is_file() and not (run / "out.log").exists()
    assert "Train Epoch: 0" in (run / "out-0.log").read_text()
    assert (run / "code" / "acc_clip" / "train" / "loop.py").read_text() == (
        REPO / "acc_clip" / "train" / "loop.py"
    ).read_text()
    assert "| DEBUG |" in result.stdout


def test_a_run_folder_in_use_is_refused_and_a_stale_lock_taken_over(train_csv, tmp_path, train_in_process):
    """Two runs with one --name: the second would delete the first's partial saves and append to its logs.
    A lock naming a live process refuses the second in one line; a lock left by a process that is gone
    (a kill -9) is taken over; a run that ends leaves no lock."""
    import socket
    import subprocess as sp
    import sys as system

    run = tmp_path / "shared"
    args = tiny_train_args(train_csv, tmp_path, "shared", "--max-steps", "1", "--resume", "latest")
    run.mkdir()
    live = sp.Popen([system.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "run.lock").write_text(f"{socket.gethostname()} {live.pid}")
        status, errors = train_in_process(args)
        assert status != 0 and len(errors) == 1 and f"is in use by another run (process {live.pid}" in errors[0]
        assert not (run / "metrics.jsonl").exists()  # nothing written beside the other run
    finally:
        live.kill()
        live.wait()
    (run / "run.lock").write_text(f"{socket.gethostname()} {live.pid}")  # now gone: a stale lock
    status, _ = train_in_process(args)
    assert status == 0 and len(read_metrics(run)) == 1
    assert not (run / "run.lock").exists()

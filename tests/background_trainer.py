"""A trainer running in the background as a user starts it, and what tests watch in its run folder:
for the resume tests that stop, kill and restart runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from acc_clip.checkpoint.folders import complete_checkpoints
from acc_clip.io.sealed import MANIFEST
from helpers import REPO


def _accelerate_command() -> str:
    """This Python's `accelerate` command: its console script, or, in a virtual environment that borrows
    another's packages without their scripts (a git worktree's), the same entry point written as a script
    for this Python (once, in the temporary folder)."""
    found = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if found:
        return found
    script = Path(tempfile.gettempdir()) / f"accelerate-{hashlib.sha1(sys.executable.encode()).hexdigest()[:12]}"
    if not script.exists():
        partial = script.with_name(f"{script.name}.{os.getpid()}")
        partial.write_text(
            f"#!{sys.executable}\nimport sys\nfrom accelerate.commands.accelerate_cli import main\nsys.exit(main())\n"
        )
        partial.chmod(0o755)
        os.replace(partial, script)
    return str(script)


ACCELERATE = _accelerate_command()


def free_port() -> int:
    with socket.socket() as sock:  # other test runs on this machine may hold accelerate's default port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_with(config: str, *options: str) -> list[str]:
    """`accelerate launch` with launch/CONFIG and extra launcher options (e.g. --num_processes 1)."""
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        str(REPO / "launch" / config),
        "--main_process_port",
        str(free_port()),
        *options,
    ]


def two_processes() -> list[str]:
    """`accelerate launch` with launch/cpu_2proc.yaml (`--cpu --num_processes 2` would start one)."""
    return launch_with("cpu_2proc.yaml")


class Trainer:
    """`python -m acc_clip.train ARGS` in the background, or several processes under accelerate launch."""

    def __init__(
        self,
        args: list[str],
        log_file: Path,
        *,
        processes: int = 1,
        env: dict[str, str] | None = None,
        launcher: list[str] | None = None,
    ):
        """`launcher`: another start than python or cpu_2proc.yaml's (e.g. `launch_with("cpu_2proc_fsdp.yaml")`)."""
        assert processes in (1, 2), processes
        launcher = launcher or ([sys.executable] if processes == 1 else two_processes())
        self.log_file = log_file
        with open(log_file, "w") as out:
            self.process = subprocess.Popen(
                launcher + ["-m", "acc_clip.train", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    def tail(self) -> str:
        return self.log_file.read_text()[-3000:]

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"trainer timed out after {timeout} s:\n{self.tail()}") from None

    def stop(self) -> None:
        """SIGTERM first: torchrun then takes its ranks down with it (they run in their own sessions)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def wait_until(condition: Callable[[], bool], trainer: Trainer, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if trainer.process.poll() is not None:
            raise AssertionError(
                f"trainer exited {trainer.process.returncode} before the test could stop it:\n{trainer.tail()}"
            )
        if time.monotonic() > deadline:
            trainer.stop()
            raise AssertionError(f"timed out waiting on the trainer:\n{trainer.tail()}")
        time.sleep(0.02)


def metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def newest_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    found = complete_checkpoints(str(run_dir / "checkpoints"))
    assert found, f"no complete checkpoint in {run_dir}"
    return Path(found[-1]), json.loads(Path(found[-1], MANIFEST).read_text())["progress"]


def saved_at_or_after(run_dir: Path, global_step: int) -> bool:
    found = complete_checkpoints(str(run_dir / "checkpoints"))
    return bool(found) and int(os.path.basename(found[-1]).split("_")[1]) >= global_step

"""--profile-steps A:B on the trainer: every process writes one trace of exactly steps A to B into
<run>/profile/, loadable as JSON (what TensorBoard's profiler plugin and Perfetto read), in which each
step's span holds the step's phases; and profiling changes nothing the run computes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from acc_clip.runtime.run_dir import PROFILE_DIR
from acc_clip.train.profiling import BACKWARD, DATA, FORWARD, FORWARD_NO_GRAD, LOSS, OPTIMIZER, PHASES, SAVE
from background_trainer import two_processes
from helpers import REPO, read_metrics, run_trainer, tiny_train_args

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # the same losses to the last bit in both runs
STEP = "ProfilerStep#"
# Five steps, a step checkpoint after steps 1 and 3 (metrics.jsonl's numbers): one of them in the window.
SHORT_RUN = ["--epochs", "1", "--max-steps", "5", "--save-every-n-steps", "2", "--save-every-n-minutes", "0"]


def phases_by_step(run_dir: Path, rank: int) -> dict[int, Counter]:
    """{N: how many spans of each phase lie inside the span ProfilerStep#N} from the process's one trace."""
    traces = sorted((run_dir / PROFILE_DIR).glob(f"rank{rank}.*.pt.trace.json"))
    assert len(traces) == 1, traces
    events = [e for e in json.loads(traces[0].read_text())["traceEvents"] if e.get("cat") == "user_annotation"]
    steps = {int(e["name"][len(STEP) :]): (e["ts"], e["ts"] + e["dur"]) for e in events if e["name"].startswith(STEP)}
    phases = [e for e in events if e["name"] in PHASES]
    found = {n: Counter(e["name"] for e in phases if start <= e["ts"] <= end) for n, (start, end) in steps.items()}
    assert sum(count.total() for count in found.values()) == len(phases), "a phase outside every step's span"
    return found


def test_profile_steps_2_3_writes_a_trace_of_those_steps_with_their_phases(train_csv, tmp_path):
    result = run_trainer(tiny_train_args(train_csv, tmp_path, "profiled", *SHORT_RUN, "--profile-steps", "2:3"))
    phases = phases_by_step(tmp_path / "profiled", rank=0)
    assert set(phases) == {2, 3}  # no other step
    for step in (2, 3):
        assert {DATA, FORWARD, LOSS, BACKWARD, OPTIMIZER} <= set(phases[step]), phases[step]
        assert phases[step][FORWARD] == 1 and FORWARD_NO_GRAD not in phases[step]
    assert (phases[2][SAVE], phases[3][SAVE]) == (0, 1)
    assert "profile of steps 2..3 written to" in result.stdout

    run_trainer(tiny_train_args(train_csv, tmp_path, "plain", *SHORT_RUN))
    assert not (tmp_path / "plain" / PROFILE_DIR).exists()
    losses = [[r["loss"] for r in read_metrics(tmp_path / name)] for name in ("profiled", "plain")]
    assert losses[0] == losses[1] and len(losses[0]) == 5


def test_two_processes_write_one_trace_each_with_accumulation(train_csv, tmp_path):
    args = tiny_train_args(train_csv, tmp_path, "two", "--epochs", "1", "--max-steps", "2", "--batch-size", "8")
    run_trainer([*args, "--accum-freq", "2", "--profile-steps", "1:1"], launcher=two_processes())
    for rank in (0, 1):
        phases = phases_by_step(tmp_path / "two", rank)
        assert set(phases) == {1}
        # --accum-freq 2: one pass without gradient over both micro-batches, then each with gradient.
        assert phases[1][FORWARD_NO_GRAD] == 1 and phases[1][FORWARD] == phases[1][BACKWARD] == 2, phases[1]
        assert {DATA, LOSS, OPTIMIZER} <= set(phases[1])


def test_an_error_inside_the_window_keeps_its_exit_status_and_writes_what_was_traced(tmp_path):
    """A process that exits with torch's profiler recording dies of SIGSEGV (torch 2.14): an error raised
    inside the window (a diverged loss: 6) must still end the process with its own status."""
    script = (
        "import sys\n"
        "from acc_clip.train.profiling import StepProfiler\n"
        f"profiler = StepProfiler((0, 3), {str(tmp_path)!r}, 0, 'cpu', 0)\n"
        "profiler.begin_step(0)\n"
        "profiler.begin_step(1)\n"
        "sys.exit(6)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 6, result.stderr[-2000:]
    assert len(list((tmp_path / PROFILE_DIR).glob("rank0.*.pt.trace.json"))) == 1

"""--profile-steps A:B (acc_clip/train/profiling.py): the flag's domain, the profiler's schedule over a run's
steps (resumed runs included), and the trace a StepProfiler writes around a toy loop. The trainer's own
trace, with the phases of real steps, is tests/integration/test_profiling.py's."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.profiler import ProfilerAction, record_function

from acc_clip.errors import UsageError
from acc_clip.runtime.run_dir import PROFILE_DIR
from acc_clip.train.config import parse_train_config
from acc_clip.train.profiling import (
    FORWARD,
    ProfilingOptions,
    StepProfiler,
    parse_window,
    scheduled,
    step_profiler,
)

NONE, WARMUP, RECORD, SAVE = (
    ProfilerAction.NONE,
    ProfilerAction.WARMUP,
    ProfilerAction.RECORD,
    ProfilerAction.RECORD_AND_SAVE,
)


@pytest.mark.parametrize("text, window", [("2:3", (2, 3)), ("0:0", (0, 0)), ("7:120", (7, 120))])
def test_a_window_is_two_step_numbers_from_0_in_order(text, window):
    assert parse_window(text) == window
    config, _ = parse_train_config(["--train-data", "x.csv", "--profile-steps", text])
    assert config.profiling.window == window


def test_no_window_by_default():
    config, _ = parse_train_config(["--train-data", "x.csv"])
    assert config.profiling.profile_steps is None and config.profiling.window is None


@pytest.mark.parametrize("text", ["3:2", "-1:2", "2", "2:", ":3", "1:2:3", "a:b", " 2:3", "2-3", "", "²:3"])
def test_anything_else_is_refused_in_one_line_naming_the_flag(text):
    assert parse_window(text) is None
    with pytest.raises(UsageError) as refused:
        parse_train_config(["--train-data", "x.csv", f"--profile-steps={text}"])
    message = str(refused.value)
    assert message.startswith(f"--profile-steps {text!r}: must be A:B") and "\n" not in message


def test_yaml_reads_an_unquoted_window_as_a_number_and_the_refusal_says_to_quote_it(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train_data: x.csv\nprofile_steps: 2:3\n")  # YAML 1.1: base 60, 2 * 60 + 3
    with pytest.raises(UsageError, match=r"^--profile-steps '123': must be .*quoted: '2:3'"):
        parse_train_config(["--config", str(path)])
    path.write_text("train_data: x.csv\nprofile_steps: '2:3'\n")
    assert parse_train_config(["--config", str(path)])[0].profiling.window == (2, 3)


def test_the_step_before_the_window_warms_up_and_its_last_step_saves():
    assert [scheduled(step, (2, 4)) for step in range(7)] == [NONE, WARMUP, RECORD, RECORD, SAVE, NONE, NONE]
    assert [scheduled(step, (0, 0)) for step in range(2)] == [SAVE, NONE]  # no step before: no warm-up
    assert [scheduled(step, None) for step in range(2)] == [NONE, NONE]


@pytest.mark.parametrize(
    "first_step, window",
    [(0, (2, 3)), (1, (2, 3)), (2, (2, 3)), (3, (3, 3)), (4, None)],
    ids=["fresh", "resumed-before", "resumed-at-start", "resumed-inside", "resumed-after"],
)
def test_a_resumed_run_profiles_what_is_left_of_the_window(first_step, window, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    profiler = step_profiler(ProfilingOptions("2:3"), str(tmp_path), 0, "cpu", first_step)
    assert profiler.window == window
    if window is None:
        assert "this run starts at step 4, after them: nothing is profiled" in caplog.text
    else:
        assert f"tracing steps {window[0]}..3 on every process into {tmp_path / PROFILE_DIR}" in caplog.text


def toy_run(run_dir, window, first_step: int, end: int) -> list[dict]:
    """Steps first_step..end-1 of a loop whose steps each hold one FORWARD span; the events of the
    trace written (none: [])."""
    profiler = StepProfiler(window, str(run_dir), 3, "cpu", first_step)
    for step in range(first_step, end):
        profiler.begin_step(step)
        with record_function(FORWARD):
            torch.ones(4).mul(step)
    profiler.close()
    traces = sorted((run_dir / PROFILE_DIR).glob("*"))
    assert len(traces) <= 1 and all(path.name.startswith("rank3.") for path in traces), traces
    assert all(path.name.endswith(".pt.trace.json") for path in traces)  # the name TensorBoard's plugin reads
    return json.loads(traces[0].read_text())["traceEvents"] if traces else []


def named(events: list[dict], prefix: str) -> list[str]:
    return [event["name"] for event in events if event["name"].startswith(prefix)]


def test_only_the_window_is_traced(tmp_path):
    events = toy_run(tmp_path, (2, 3), 0, 6)
    assert named(events, "ProfilerStep#") == ["ProfilerStep#2", "ProfilerStep#3"]
    assert named(events, FORWARD) == [FORWARD, FORWARD]


def test_a_run_ending_inside_the_window_writes_what_it_traced(tmp_path):
    events = toy_run(tmp_path, (2, 5), 0, 4)  # stopped, or --max-steps, after step 3
    assert named(events, "ProfilerStep#") == ["ProfilerStep#2", "ProfilerStep#3"]


def test_a_run_ending_before_the_window_writes_nothing_and_says_so(tmp_path, caplog):
    assert toy_run(tmp_path, (5, 6), 0, 3) == []
    assert "the run's last step was 2: nothing profiled" in caplog.text


def test_a_resumed_run_traces_from_its_first_step_and_torch_counts_from_there(tmp_path):
    events = toy_run(tmp_path, (2, 3), 2, 6)  # resumed at step 2: steps 2 and 3, without a warm-up step
    assert named(events, "ProfilerStep#") == ["ProfilerStep#0", "ProfilerStep#1"]  # step_profiler's line says so
    assert named(events, FORWARD) == [FORWARD, FORWARD]


def test_without_a_window_nothing_is_made(tmp_path):
    assert toy_run(tmp_path, None, 0, 3) == []
    assert not (tmp_path / PROFILE_DIR).exists()

"""Fault points: the named places where a test makes a process die as a crash would (SIGKILL), to show
that what was saved survives it. This module's only job; production code calls `fault_point(name, step)`
at each place, which costs one environment lookup and does nothing unless `ACC_CLIP_KILL_AT` names that
place and step (`kill_at` makes the variable for a test or the fault-injection script).

The places:
- "before_background_write": a step save, after the step wrote its part (the random states; under FSDP the
  shards) and before the weights and optimizer state are written from their copy in host memory, in the
  background with --async-save (checkpoint/writer.py);
- "before_commit": a step save, after Accelerate wrote the state and before the manifest and the rename
  (checkpoint/manager.py), i.e. a `kill -9` in the middle of writing a checkpoint;
- "between_renames": a save that replaces a checkpoint of its own step (an epoch's end right after a step
  save, or a replayed step), after moving the old folder aside and before renaming the new one into place
  (checkpoint/folders.commit_folder)."""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "ACC_CLIP_KILL_AT"
POINTS = ("before_background_write", "before_commit", "between_renames")


def kill_at(point: str, step: int) -> dict[str, str]:
    """The environment that kills a trainer at `point` of global step `step`."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; expected one of {POINTS}")
    return {KILL_AT_ENV: f"{point}:{step}"}


def fault_point(point: str, step: int) -> None:
    if os.environ.get(KILL_AT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)

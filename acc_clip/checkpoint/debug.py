"""Test-only hooks, read from the environment and off unless set. They live apart from the
production path so that nothing but these three lines of the manager, the commit and the loop
knows of them.

- ACC_CLIP_TEST_KILL_BEFORE_COMMIT=STEP: the save at global step STEP kills its own process with
  SIGKILL after Accelerate wrote the state and before the manifest and the rename, i.e. a
  `kill -9` in the middle of writing a checkpoint.
- ACC_CLIP_TEST_KILL_BETWEEN_RENAMES=STEP: a save at global step STEP that replaces an existing
  checkpoint of that step (an epoch's end right after a step save, or a replayed step) kills its
  own process with SIGKILL after moving the old folder aside and before renaming the new one into
  place (format.commit_folder), i.e. a `kill -9` between the two renames of a commit.
- ACC_CLIP_DEBUG_SAMPLES=1: every optimizer step appends its samples to `<run>/samples.jsonl`
  (`SampleLog`), so tests observe which samples each epoch really saw.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Optional

from acc_clip.runtime.run_dir import SAMPLES_FILE

KILL_BEFORE_COMMIT_ENV = "ACC_CLIP_TEST_KILL_BEFORE_COMMIT"
KILL_BETWEEN_RENAMES_ENV = "ACC_CLIP_TEST_KILL_BETWEEN_RENAMES"
SAMPLES_ENV = "ACC_CLIP_DEBUG_SAMPLES"


def kill_if_asked_before_commit(global_step: int) -> None:
    if os.environ.get(KILL_BEFORE_COMMIT_ENV) == str(global_step):
        os.kill(os.getpid(), signal.SIGKILL)


def kill_if_asked_between_renames(final: str) -> None:
    """`final` is the step folder being replaced; its old copy has just been moved aside."""
    step = os.environ.get(KILL_BETWEEN_RENAMES_ENV)
    if step is not None:
        from acc_clip.checkpoint.format import step_name  # format imports this module

        if os.path.basename(os.path.normpath(final)) == step_name(int(step)):
            os.kill(os.getpid(), signal.SIGKILL)


class SampleLog:
    """Opt-in debug record (ACC_CLIP_DEBUG_SAMPLES=1): one line per optimizer step and process,
    {"step", "epoch", "rank", "indices"}, in `<run>/samples.jsonl`. Resume tests read it to check that
    no sample of an epoch is seen twice or skipped. Off by default: it costs a write per step."""

    def __init__(self, path: str, rank: int):
        self.path, self.rank = path, rank

    @classmethod
    def from_env(cls, run_dir: str, rank: int) -> Optional["SampleLog"]:
        return cls(os.path.join(run_dir, SAMPLES_FILE), rank) if os.environ.get(SAMPLES_ENV) == "1" else None

    def record(self, step: int, epoch: int, micro_batches: list) -> None:
        indices = [i for batch in micro_batches for i in batch.indices.tolist()]
        line = json.dumps({"step": step, "epoch": epoch, "rank": self.rank, "indices": indices}) + "\n"
        with open(self.path, "a") as file:  # one short append per line: lines of ranks do not interleave
            file.write(line)


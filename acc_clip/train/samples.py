"""--log-samples: which samples every optimizer step trained on, one line per step and process in
`<run>/samples.jsonl`: {"step", "epoch", "rank", "indices"}, the indices being the samples' ids (a CSV
row, a shard sample's number). For debugging a loss spike (which rows made it), and for checking what
a resumed run saw: a resume drops the lines of the steps it trains again, so the file lists each step
once. Off by default; when off, nothing is recorded and nothing costs."""

from __future__ import annotations

import json
import os

from acc_clip.runtime.run_dir import SAMPLES_FILE


class SampleLog:
    def __init__(self, run_dir: str, rank: int):
        self.path, self.rank = os.path.join(run_dir, SAMPLES_FILE), rank

    def record(self, step: int, epoch: int, micro_batches: list) -> None:
        indices = [i for batch in micro_batches for i in batch.indices.tolist()]
        line = json.dumps({"step": step, "epoch": epoch, "rank": self.rank, "indices": indices}) + "\n"
        with open(self.path, "a") as file:  # one short append per line: lines of ranks do not interleave
            file.write(line)

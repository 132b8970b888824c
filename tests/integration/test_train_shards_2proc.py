"""Two trainer processes with two loader workers each, on shards: every sample is trained on exactly
once per epoch, across both processes, and both make the same number of steps.

Launched with torch's own launcher (`python -m torch.distributed.run --standalone --nproc_per_node 2`);
with `--device cpu`, Accelerate then runs 2 processes on gloo. The processes' samples are read from
the opt-in record of the trainer's --log-samples (samples.jsonl, one line per step and process).
"""

from __future__ import annotations

import sys
from collections import defaultdict

from acc_clip.prep.shards.convert import convert_csv_to_shards
from helpers import read_metrics, read_samples, run_trainer, tiny_train_args, without_csv_separator

# `--` ends torchrun's options: it would otherwise take the trainer's --logs for its --logs-specs.
TWO_PROCESSES = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node",
    "2",
    "--no-python",
    "--",
    sys.executable,
]
BATCH = 8  # per process
SAMPLES = 160  # shards 0-3 of 40
EPOCHS = 2


def test_two_processes_two_workers_see_every_sample_once_per_epoch(train_csv, tmp_path):
    shards = tmp_path / "shards"
    convert_csv_to_shards(str(train_csv), str(shards), samples_per_shard=40, workers=1, progress=False)
    args = tiny_train_args(
        shards / "{00000..00003}.tar",
        tmp_path / "logs",
        "two",
        "--batch-size",
        str(BATCH),
        "--epochs",
        str(EPOCHS),
        "--workers",
        "2",
        "--log-samples",
    )
    result = run_trainer(without_csv_separator(args), launcher=TWO_PROCESSES)
    assert "2 process(es)" in result.stdout + result.stderr

    run_dir = tmp_path / "logs" / "two"
    steps_per_epoch = SAMPLES // (BATCH * 2)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(EPOCHS * steps_per_epoch))
    records = read_samples(run_dir)
    seen: dict[tuple[int, int], list[int]] = defaultdict(list)  # (epoch, rank) -> indices in order
    steps: dict[tuple[int, int], list[int]] = defaultdict(list)
    for record in records:
        assert len(record["indices"]) == BATCH
        seen[record["epoch"], record["rank"]] += record["indices"]
        steps[record["epoch"], record["rank"]].append(record["step"])
    for epoch in range(EPOCHS):
        expected_steps = list(range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch))
        assert steps[epoch, 0] == steps[epoch, 1] == expected_steps  # same number of batches on both ranks
        assert sorted(seen[epoch, 0] + seen[epoch, 1]) == list(range(SAMPLES)), f"epoch {epoch}"
    assert seen[0, 0] != seen[1, 0]  # each epoch has its own order

"""The trainer on 2 CPU processes with bad samples on one of them: the good samples the other process holds beyond
the short one's count are carried or handed over (train/balance.py), not cut, so every good sample of each epoch
is trained exactly once, as the two processes' --log-samples records show."""

from __future__ import annotations

import math
from collections import Counter

from acc_clip.data.csv import epoch_permutation
from background_trainer import two_processes
from helpers import TINY_VIT, read_metrics, read_samples, run_trainer, tiny_train_args


def test_two_processes_train_every_good_sample_once_when_one_skips_bad_ones(train_csv, tmp_path):
    """32 rows, 2 processes x 8, 2 steps an epoch, 2 epochs. Epoch 0's first row of each of rank 0's batches
    points at a missing image: in step 0 rank 1 carries its eighth sample, in step 1 it trains it and hands rank
    0 its newest. Epoch 1 puts the two bad rows wherever its order does; an even count leaves none over."""
    rows = train_csv.read_text().splitlines()
    header, body = rows[0], rows[1:33]
    order = epoch_permutation(len(body), 0, 0).tolist()
    bad = {order[0], order[16]}  # rank r's batch i holds order[(2i + r) * 8 : (2i + r + 1) * 8]
    for row in bad:
        body[row] = f"{tmp_path}/missing_{row}.jpg,{body[row].split(',', 1)[1]}"
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join([header, *body]) + "\n")
    run_trainer(
        tiny_train_args(
            csv,
            tmp_path,
            "carry",
            *("--model", TINY_VIT, "--batch-size", "8", "--epochs", "2", "--gather-with-grad"),
            *("--log-samples", "--max-bad-fraction", "0.1"),
        ),
        launcher=two_processes(),
    )
    run = tmp_path / "carry"
    records = read_samples(run)
    for epoch in (0, 1):
        trained = Counter(i for r in records if r["epoch"] == epoch for i in r["indices"])
        assert sorted(trained) == sorted(set(range(32)) - bad), epoch  # every good sample, no bad one
        assert set(trained.values()) == {1}, epoch  # each once
        for step in {r["step"] for r in records if r["epoch"] == epoch}:  # equal batches on both processes
            assert len({len(r["indices"]) for r in records if r["step"] == step}) == 1
    epoch_0 = sorted((r["step"], r["rank"], len(r["indices"])) for r in records if r["epoch"] == 0)
    assert epoch_0 == [(0, 0, 7), (0, 1, 7), (1, 0, 8), (1, 1, 8)]
    assert all(math.isfinite(record["loss"]) for record in read_metrics(run))
    carried = "over all processes 1 carried into a later step to keep the processes' batches equal, 0 left untrained"
    line = f"epoch 0 done: 2 steps, 2 samples skipped so far as missing or corrupt on this process; {carried}"
    assert line in (run / "out.log").read_text()

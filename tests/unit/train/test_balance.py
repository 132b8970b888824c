"""train/balance.py: the plan over fake rank sizes (no processes), whole epochs of W simulated processes made of the
same pure functions the Balancer runs, and the Balancer alone and over 3 real gloo processes."""

from __future__ import annotations

import itertools
import logging
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from acc_clip.data.common import Batch
from acc_clip.errors import AccClipError
from acc_clip.train.balance import (
    Balancer,
    Transfer,
    even_split,
    incoming,
    join,
    outgoing,
    plan_balance,
    train_and_carry,
)


def _batch(indices: list[int], bad: int = 0) -> Batch:
    ids = torch.tensor(indices, dtype=torch.long)
    # image i is filled with its index, so a test sees that images, texts and indices travel together
    images = ids.view(-1, 1, 1, 1).expand(-1, 3, 2, 2).to(torch.uint8) if indices else torch.empty(0)
    return Batch(images, ids.view(-1, 1).repeat(1, 5), ids, bad)


def _check_rows_agree(batch: Batch) -> None:
    assert torch.equal(batch.images[:, 0, 0, 0].long(), batch.indices % 256)
    assert torch.equal(batch.texts[:, 0], batch.indices)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("num_micro_batches", [1, 2, 3])
def test_the_plan_over_every_small_size_vector(world_size, num_micro_batches):
    for held in itertools.product(range(7), repeat=world_size):
        plan = plan_balance(held, num_micro_batches)
        total = sum(held)
        assert plan.per_rank == total // world_size
        assert sum(plan.kept) == total and min(plan.kept) >= plan.per_rank
        assert sum(plan.kept) - plan.per_rank * world_size < world_size  # fewer than W carried in all
        assert sum(plan.micro_batch_sizes) == plan.per_rank and 0 not in plan.micro_batch_sizes
        assert max(plan.micro_batch_sizes, default=0) - min(plan.micro_batch_sizes, default=0) <= 1
        sent = [sum(t.count for t in plan.transfers if t.source == r) for r in range(world_size)]
        received = [sum(t.count for t in plan.transfers if t.target == r) for r in range(world_size)]
        assert [h - s + g for h, s, g in zip(held, sent, received)] == list(plan.kept)
        assert not any(s and g for s, g in zip(sent, received))  # a process sends or receives, never both
        assert all(t.count > 0 for t in plan.transfers)
        # as few samples travel as can: only what the receivers lack below n, or below what they keep
        assert sum(sent) == sum(max(0, k - h) for h, k in zip(held, plan.kept))
        assert sum(sent) == sum(max(0, plan.per_rank - h) for h in held)


def test_a_rank_with_every_sample_bad_is_filled_by_the_others():
    plan = plan_balance([0, 8, 8], num_micro_batches=2)
    assert plan.per_rank == 5 and plan.micro_batch_sizes == (3, 2)
    assert plan.kept == (5, 6, 5)  # the remainder stays with a process that had it to spare
    assert plan.transfers == (Transfer(1, 0, 2), Transfer(2, 0, 3))


def test_equal_sizes_need_no_transfer_and_the_split_keeps_the_micro_batches():
    plan = plan_balance([16, 16], num_micro_batches=2)
    assert (plan.per_rank, plan.micro_batch_sizes, plan.transfers, plan.kept) == (16, (8, 8), (), (16, 16))
    assert even_split(3, 4) == (1, 1, 1)


def _simulate_epoch(world_size, batch_size, accum_freq, steps, bad):
    """`steps` steps of W processes, each reading `accum_freq` micro-batches of `batch_size` rows (rank r, step s,
    micro-batch j hold consecutive rows), the rows in `bad` skipped; returns what each step trained on each rank
    and what stayed carried at the end."""
    carried = [join([]) for _ in range(world_size)]
    trained = []
    row = itertools.count()
    for _ in range(steps):
        fresh = []
        for _rank in range(world_size):
            micro_batches = []
            for _j in range(accum_freq):
                rows = [next(row) for _ in range(batch_size)]
                good = [i for i in rows if i not in bad]
                micro_batches.append(_batch(good, bad=len(rows) - len(good)))
            fresh.append(micro_batches)
        held = [join([carried[r], *fresh[r]]) for r in range(world_size)]
        plan = plan_balance([len(h.indices) for h in held], accum_freq)
        kept, mail = zip(*(outgoing(held[r], plan, r) for r in range(world_size)))
        step = []
        for r in range(world_size):
            micro_batches, carried[r] = train_and_carry(incoming(kept[r], plan, r, mail), plan)
            for batch in micro_batches:
                _check_rows_agree(batch)
            step.append(micro_batches)
        trained.append(step)
    return trained, carried


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_good_sample_is_trained_once_and_fewer_than_w_wait_at_the_end(world_size):
    batch_size, accum_freq, steps = 4, 2, 12
    rows = world_size * batch_size * accum_freq * steps
    randomly = random.Random(world_size)
    bad = set(randomly.sample(range(rows), rows // 7)) | {0, 1, 2, 3, 4, 5, 6, 7}  # rank 0's first step: all bad
    trained, carried = _simulate_epoch(world_size, batch_size, accum_freq, steps, bad)
    for step in trained:  # equal micro-batches on every process
        assert len({tuple(len(b.indices) for b in micro_batches) for micro_batches in step}) == 1
    seen = [i for step in trained for micro_batches in step for b in micro_batches for i in b.indices.tolist()]
    left = [i for batch in carried for i in batch.indices.tolist()]
    assert len(seen) == len(set(seen))  # none twice
    assert sorted(seen + left) == sorted(set(range(rows)) - bad)  # none lost but those still carried
    assert len(left) < world_size and len(left) == (-len(bad)) % world_size


def test_a_carried_sample_is_trained_in_the_next_step():
    """2 processes, 1 bad sample on rank 0: 15 good ones, 7 each, one carried (on rank 1, which had most)."""
    trained, carried = _simulate_epoch(2, 8, 1, 2, bad={0})
    first = [b.indices.tolist() for micro_batches in trained[0] for b in micro_batches]
    assert [len(indices) for indices in first] == [7, 7]
    assert first[1] == list(range(8, 15))  # rank 1 kept its first 7 and carried row 15
    second = [b.indices.tolist() for micro_batches in trained[1] for b in micro_batches]
    assert second[1][0] == 15 and [len(indices) for indices in second] == [8, 8]
    assert [len(batch.indices) for batch in carried] == [0, 1]


def test_one_process_keeps_its_batches_and_drops_empty_ones():
    balancer = Balancer(None, 0, 1)
    full, partial = _batch([0, 1, 2]), _batch([5, 6], bad=1)
    kept = balancer.balance([full, _batch([], bad=2), partial])
    assert kept[0] is full and kept[1] is partial and len(kept) == 2  # untouched, not copied
    assert balancer.end_epoch(0) == (0, 0)
    with pytest.raises(AccClipError, match="fewer usable samples in this optimizer step than processes"):
        balancer.balance([_batch([], bad=4), _batch([], bad=4)])


def _balance_on_three_processes(rank: int, store: str, out: str) -> None:
    """Rank 0 loses 3 samples of its first micro-batch in step 0 and all of them in step 1; 3 steps of 2 x 4."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3)
    logging.getLogger("acc_clip.train.balance").addHandler(logging.FileHandler(os.path.join(out, f"{rank}.log")))
    balancer, trained = Balancer(dist.group.WORLD, rank, 3), []
    for step in range(3):
        micro_batches = []
        for j in range(2):
            rows = [((step * 3 + rank) * 2 + j) * 4 + i for i in range(4)]
            lost = {0: 3, 1: 4}.get(step, 0) if rank == 0 and (j == 0 or step == 1) else 0
            micro_batches.append(_batch(rows[lost:], bad=lost))
        balanced = balancer.balance(micro_batches)
        for batch in balanced:
            _check_rows_agree(batch)
        trained.append([b.indices.tolist() for b in balanced])
        if step == 1:
            balancer.note_save(global_step=2)
    counts = balancer.end_epoch(0)
    torch.save({"trained": trained, "counts": counts}, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_three_processes_exchange_and_carry_over_gloo(tmp_path):
    mp.start_processes(
        _balance_on_three_processes, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=3, start_method="fork"
    )
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(3)]
    bad = {0, 1, 2} | {24, 25, 26, 27, 28, 29, 30, 31}
    for step in range(3):  # equal micro-batch sizes on every process, each step
        assert len({tuple(map(len, r["trained"][step])) for r in results}) == 1
    seen = [i for r in results for step in r["trained"] for batch in step for i in batch]
    assert len(seen) == len(set(seen))
    carried, untrained = results[0]["counts"]
    assert all(r["counts"] == (carried, untrained) for r in results)  # totals over the processes, on each
    # step 1: ranks 1 and 2 fill rank 0 and rank 1 carries one; step 2: rank 1 carries one again, left at the end
    assert (carried, untrained) == (2, 1) == (2, (-len(bad)) % 3)
    assert len(seen) + untrained == 72 - len(bad)
    assert set(seen) <= set(range(72)) - bad
    # step 1: rank 1 (rows 32-39) and rank 2 (40-47) keep 6 and 5, their newest go to rank 0, which lost all of its
    # own; rank 1 trains 5 and carries row 37, trains it first in step 2 and carries its newest, row 63, to the end
    assert [r["trained"][1] for r in results] == [
        [[38, 39, 45], [46, 47]],
        [[32, 33, 34], [35, 36]],
        [[40, 41, 42], [43, 44]],
    ]
    assert results[1]["trained"][2][0][0] == 37
    said = (tmp_path / "0.log").read_text()
    assert "the checkpoint of step 2 does not hold the 1 sample(s) carried into the next step (indices [37])" in said
    assert "epoch 0: 1 good sample(s) left untrained (indices [63])" in said
    assert (tmp_path / "1.log").read_text() == ""  # the main process says it, once


def test_carried_and_received_samples_join_the_fresh_ones_on_their_device():
    """Images decoded on the device (--decode-on-device) stay there: the CPU rows carried or received join them
    (the meta device stands in for an accelerator, which this machine lacks)."""
    carried, fresh = _batch([7]), _batch([1, 2])
    fresh = fresh._replace(images=fresh.images.to("meta"))
    joined = join([carried, fresh])
    assert joined.images.device.type == "meta" and joined.indices.tolist() == [7, 1, 2]
    assert join([carried, _batch([])]).images.device.type == "cpu"

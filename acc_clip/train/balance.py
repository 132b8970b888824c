"""Equal batches on every process without leaving good samples untrained: rebalance, then carry.

The loss all-gathers features, so in each micro-batch every process must hold equally many samples. A
process that skipped bad samples (missing or corrupt images, counted in `Batch.num_bad`) holds fewer. Instead
of cutting the others down to it (those samples would go untrained that epoch), `Balancer.balance` pools a
step's good samples over the W processes:

- each process holds this step's good samples behind those it carried from the step before: T over all;
- every process trains n = T // W of them this step, split evenly into the step's micro-batches;
- processes holding more than they keep hand their newest surplus to those holding fewer (`plan_balance`), as
  CPU tensors over the host (gloo) group; nothing travels when every process already holds n;
- the remainder, T - nW < W samples in all, stays where it is and is carried: put in front of its process's
  next step, so a carried sample is trained in the very next step.

Guarantee: every good sample of an epoch is trained exactly once in it, except those still carried after its
last step: fewer than W per epoch (none when the epoch's bad samples are a multiple of W), logged with their
indices and counted in the epoch's line. By induction fewer than W are carried at any time, so n never exceeds
the step's nominal size (--batch-size x --accum-freq). Samples carried when a step checkpoint is saved are not
in it: a run resumed from it leaves them untrained that epoch, and the save's log line names them.

Cost: with no bad sample anywhere and nothing carried, one all-gather of k + 1 integers per process (k the
micro-batches of a step) over the host group, the size of the former all-reduce, and the batches are returned
untouched; so step results are those of a run without this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from acc_clip.data.common import Batch
from acc_clip.errors import DataError
from acc_clip.train.profiling import DATA

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transfer:
    source: int
    target: int
    count: int


@dataclass(frozen=True)
class Plan:
    """Where a step's samples go: every process trains `per_rank`, split into `micro_batch_sizes` (none empty);
    process r holds `kept[r]` after the `transfers` and carries `kept[r] - per_rank` into the next step."""

    per_rank: int
    micro_batch_sizes: tuple[int, ...]
    transfers: tuple[Transfer, ...]
    kept: tuple[int, ...]


def even_split(total: int, parts: int) -> tuple[int, ...]:
    """`total` in `parts` sizes differing by at most one, larger first, empty ones left out."""
    sizes = (total // parts + (1 if j < total % parts else 0) for j in range(parts))
    return tuple(size for size in sizes if size > 0)


def plan_balance(held: Sequence[int], num_micro_batches: int) -> Plan:
    """The plan for processes holding `held[r]` good samples (carried ones included). The remainder
    T mod W is kept, one sample at a time, by the processes with the most to spare (the lower rank on a tie),
    so as few samples travel as can; senders and receivers are disjoint, matched in rank order."""
    world_size = len(held)
    per_rank = sum(held) // world_size
    kept = [per_rank] * world_size
    for _ in range(sum(held) - per_rank * world_size):
        spare = max(range(world_size), key=lambda r: (held[r] - kept[r], -r))
        kept[spare] += 1
    senders = [[r, held[r] - kept[r]] for r in range(world_size) if held[r] > kept[r]]
    receivers = [[r, kept[r] - held[r]] for r in range(world_size) if held[r] < kept[r]]
    transfers = []
    while receivers:
        (source, surplus), (target, deficit) = senders[0], receivers[0]
        count = min(surplus, deficit)
        transfers.append(Transfer(source, target, count))
        senders[0][1] -= count
        receivers[0][1] -= count
        senders = [s for s in senders if s[1] > 0]
        receivers = [r for r in receivers if r[1] > 0]
    return Plan(per_rank, even_split(per_rank, num_micro_batches), tuple(transfers), tuple(kept))


def empty_batch() -> Batch:
    return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 0)


def join(batches: Sequence[Batch]) -> Batch:
    """The good samples of `batches`, in order, as one batch (num_bad 0)."""
    parts = [batch for batch in batches if len(batch.indices) > 0]
    if not parts:
        return empty_batch()
    if len(parts) == 1:
        return parts[0]._replace(num_bad=0)
    # The device's, where a part is there (images decoded on it): carried and received samples come from the CPU.
    device = next((p.images.device for p in parts if p.images.device.type != "cpu"), torch.device("cpu"))
    return Batch(
        torch.cat([part.images.to(device) for part in parts]),
        torch.cat([part.texts for part in parts]),
        torch.cat([part.indices for part in parts]),
        0,
    )


def cut(batch: Batch, start: int, stop: int, *, own_copy: bool = False) -> Batch:
    """Samples start:stop of `batch`; `own_copy`: cloned on the CPU, so that pickling it (or keeping it across
    steps) does not carry the whole batch's storage along."""
    part = Batch(batch.images[start:stop], batch.texts[start:stop], batch.indices[start:stop], 0)
    if not own_copy:
        return part
    return Batch(part.images.to("cpu", copy=True), part.texts.clone(), part.indices.clone(), 0)


def outgoing(held: Batch, plan: Plan, rank: int) -> tuple[Batch, dict[int, Batch]]:
    """What `rank` keeps of `held` and what it sends to whom: its newest samples leave, so those it carried in
    stay at the front and are trained now."""
    remaining, sent = len(held.indices), {}
    for transfer in plan.transfers:
        if transfer.source == rank:
            sent[transfer.target] = cut(held, remaining - transfer.count, remaining, own_copy=True)
            remaining -= transfer.count
    return cut(held, 0, remaining), sent


def incoming(kept: Batch, plan: Plan, rank: int, mail: Sequence[dict[int, Batch]]) -> Batch:
    """`kept` followed by what the senders addressed to `rank` in `mail` (one dict per process), in rank order."""
    received = [mail[t.source][rank] for t in plan.transfers if t.target == rank]
    return join([kept, *received])


def train_and_carry(held: Batch, plan: Plan) -> tuple[list[Batch], Batch]:
    """The step's micro-batches (the first `per_rank` samples of `held`) and what is carried (the rest)."""
    micro_batches, start = [], 0
    for size in plan.micro_batch_sizes:
        micro_batches.append(cut(held, start, start + size))
        start += size
    return micro_batches, cut(held, start, len(held.indices), own_copy=True)


class Balancer:
    """One per run and process; every process calls `balance` once per step, in the same steps."""

    def __init__(self, group, rank: int, world_size: int):
        self.group, self.rank, self.world_size = group, rank, world_size  # group: device.host_process_group
        self.carried = empty_batch()
        self.carried_in_epoch = 0  # samples this process carried into a later step this epoch

    def _gathered_sizes(self, micro_batches: list[Batch]) -> torch.Tensor:
        """[W, k + 1]: every process's micro-batch sizes, then how many it carries."""
        sizes = torch.tensor([len(b.indices) for b in micro_batches] + [len(self.carried.indices)], dtype=torch.long)
        if self.group is None:
            return sizes[None]
        gathered = [torch.empty_like(sizes) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, sizes, group=self.group)
        return torch.stack(gathered)

    @record_function(DATA)  # waiting here for the other processes' sizes and samples is data time
    def balance(self, micro_batches: list[Batch]) -> list[Batch]:
        """This step's micro-batches, of equal sizes on every process, as the module docstring says."""
        sizes = self._gathered_sizes(micro_batches)
        if not sizes[:, -1].any() and (sizes == sizes[0]).all():  # the common case: nothing to move or carry
            nonempty = [batch for batch in micro_batches if len(batch.indices) > 0]
            if not nonempty:
                raise self._no_usable_sample(micro_batches)
            return nonempty
        plan = plan_balance(sizes.sum(dim=1).tolist(), len(micro_batches))
        if plan.per_rank == 0:
            raise self._no_usable_sample(micro_batches)
        kept, sent = outgoing(join([self.carried, *micro_batches]), plan, self.rank)
        mail: list = [sent]
        if plan.transfers:
            mail = [None] * self.world_size
            torch.distributed.all_gather_object(mail, sent, group=self.group)
        balanced, self.carried = train_and_carry(incoming(kept, plan, self.rank, mail), plan)
        self.carried_in_epoch += len(self.carried.indices)
        log.debug(
            "processes held %s good samples: %d trained on each, transfers %s, %d carried here",
            sizes.sum(dim=1).tolist(),
            plan.per_rank,
            [(t.source, t.target, t.count) for t in plan.transfers],
            len(self.carried.indices),
        )
        return balanced

    def _no_usable_sample(self, micro_batches: list[Batch]) -> DataError:
        read = sum(len(batch.indices) + batch.num_bad for batch in micro_batches)
        return DataError(
            f"fewer usable samples in this optimizer step than processes ({read} read here): nearly every sample "
            "was missing or corrupt; see the warnings above"
        )

    def _gathered_carry(self) -> list[int]:
        """The indices every process carries, in rank order (a collective)."""
        mine = self.carried.indices.tolist()
        if self.group is None:
            return mine
        everyone: list = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, mine, group=self.group)
        return [index for indices in everyone for index in indices]

    def note_save(self, global_step: int) -> None:
        """A step checkpoint is being saved: name the samples carried, which it does not hold. Every process
        calls it (a collective); the main process says it."""
        carried = self._gathered_carry()
        if carried and self.rank == 0:
            log.warning(
                "the checkpoint of step %d does not hold the %d sample(s) carried into the next step (indices %s): "
                "a run resumed from it leaves them untrained this epoch",
                global_step,
                len(carried),
                carried,
            )

    def end_epoch(self, epoch: int) -> tuple[int, int]:
        """After the epoch's last step, on every process (a collective): over all processes, how many samples were
        carried into a later step this epoch and how many were left untrained because they were still carried
        (named by the main process in a warning); then the carry and the count start afresh."""
        untrained = self._gathered_carry()
        carried = self.carried_in_epoch
        if self.group is not None:
            total = torch.tensor([carried])
            torch.distributed.all_reduce(total, group=self.group)
            carried = int(total)
        if untrained and self.rank == 0:
            log.warning(
                "epoch %d: %d good sample(s) left untrained (indices %s): after the bad samples were skipped, fewer "
                "than one per process remained for equal batches",
                epoch,
                len(untrained),
                untrained,
            )
        self.carried, self.carried_in_epoch = empty_batch(), 0
        return carried, len(untrained)

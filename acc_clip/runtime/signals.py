"""Preemption: SIGTERM / SIGINT end a run after its current step and a save, on every rank at the
same step; loader workers ignore them so that the main process can finish first."""

from __future__ import annotations

import signal

import torch

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on SIGTERM/SIGINT after saving; rerun with --resume latest


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves and exits with
    PREEMPTED_EXIT_CODE. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @classmethod
    def install(cls) -> StopSignal:
        stop = cls()

        def handler(signum, frame):
            if stop.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            stop.signal_name = signal.Signals(signum).name

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handler)
        return stop

    def agreed(self, host_group=None) -> bool:
        """Whether any process was asked to stop. A scheduler signals the ranks at slightly
        different times; all must stop after the same step or the save's collectives would hang.
        The vote goes over a CPU process group (None with one process), so the device is not
        synchronised. Every rank must call this once per step."""
        if host_group is None:
            return self.requested
        vote = torch.tensor([int(self.requested)], dtype=torch.int32)
        torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX, group=host_group)
        if vote.item() and not self.requested:
            self.signal_name = "a stop signal on another process"
        return bool(vote.item())


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`. Schedulers often signal the whole process group (SLURM's
    scancel, Ctrl-C in a terminal); torch's workers die of SIGTERM, and the main process then fails
    with "DataLoader worker ... is killed by signal" instead of finishing its step and saving.
    Workers ignore both signals: the main process shuts them down, and they exit if it dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

"""Preemption signals (acc_clip/runtime/signals.py): SIGTERM / SIGINT set a flag the loop reads after
its step, instead of killing the process; loader workers ignore them, so a signal sent to the whole
process group (a scheduler's) leaves them running for the main process to finish its step and save.
The trainer's side (a SIGTERM mid-epoch, exit status 75, the exact resume) is tested in
tests/integration/test_resume*.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from acc_clip.runtime import signals


def test_stop_signal_sets_a_flag_instead_of_killing():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = signals.StopSignal.install()
        assert not stop.agreed(None)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.agreed(None) and stop.signal_name == "SIGTERM"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_the_stop_signals_are_the_ones_named():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        stop = signals.StopSignal.install(signals.parse_stop_signals("usr2, SIGUSR1"))
        assert signal.getsignal(signal.SIGTERM) == previous[signal.SIGTERM]  # not named: left alone
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize("text", ["SIGKILL", "", "SIGTERM,SIGFOO", "SIGSTOP"])
def test_a_signal_that_cannot_stop_a_run_is_named(text):
    with pytest.raises(ValueError, match="expected names among SIGTERM, SIGINT, SIGUSR1, SIGUSR2"):
        signals.parse_stop_signals(text)


class WorkerPids(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> int:
        return os.getpid()


def test_data_workers_survive_a_sigterm_sent_to_the_whole_process_group():
    loader = torch.utils.data.DataLoader(
        WorkerPids(), batch_size=1, num_workers=1, prefetch_factor=1, worker_init_fn=signals.ignore_stop_signals
    )
    batches = iter(loader)
    worker = int(next(batches))
    os.kill(worker, signal.SIGTERM)  # what a scheduler's group signal does to the worker
    os.kill(worker, signal.SIGINT)
    os.kill(worker, signal.SIGUSR1)  # SLURM's warning, to every process of the job step
    assert [int(pid) for pid in batches] == [worker] * 5  # without the init function: "worker ... killed"

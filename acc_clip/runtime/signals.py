"""Preemption: the stop signals (`--stop-signals`, by default SIGTERM, SIGINT and SIGUSR1, SLURM's
usual warning before a time limit: `--signal=USR1@120`) end a run after its current step and a save,
on every rank at the same step; loader workers ignore them so that the main process can finish first."""

from __future__ import annotations

import signal

from acc_clip.runtime.device import host_vote

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on a stop signal after saving; rerun with --resume latest
# The signals a run may be told to stop on. Their default action kills a process, so loader workers ignore
# all of them (a scheduler signals whole process groups), whichever the run stops on.
STOPPABLE = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
DEFAULT_STOP_SIGNALS = "SIGTERM,SIGINT,SIGUSR1"


def parse_stop_signals(text: str) -> tuple[signal.Signals, ...]:
    """'SIGTERM,usr1' -> (SIGTERM, SIGUSR1); ValueError naming a signal outside STOPPABLE."""
    names = [name.strip().upper() for name in text.split(",") if name.strip()]
    names = [name if name.startswith("SIG") else "SIG" + name for name in names]
    unknown = [name for name in names if name not in STOPPABLE]
    if unknown or not names:
        raise ValueError(f"{', '.join(unknown) or 'no signal'}: expected names among {', '.join(STOPPABLE)}")
    return tuple(dict.fromkeys(signal.Signals[name] for name in names))


def are_stop_signals(text: str) -> bool:
    try:
        parse_stop_signals(text)
    except ValueError:
        return False
    return True


class StopSignal:
    """A stop signal sets a flag; the loop finishes its step, saves and exits with
    PREEMPTED_EXIT_CODE. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @classmethod
    def install(cls, signums: tuple[signal.Signals, ...] = parse_stop_signals(DEFAULT_STOP_SIGNALS)) -> StopSignal:
        stop = cls()

        def handler(signum, frame):
            if stop.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            stop.signal_name = signal.Signals(signum).name

        for signum in signums:
            signal.signal(signum, handler)
        return stop

    def agreed(self, host_group=None) -> bool:
        """Whether any process was asked to stop. A scheduler signals the ranks at slightly
        different times; all must stop after the same step or the save's collectives would hang.
        The vote goes over a CPU process group (None with one process), so the device is not
        synchronised. Every rank must call this once per step."""
        stopping = host_vote(self.requested, host_group)
        if stopping and not self.requested:
            self.signal_name = "a stop signal on another process"
        return stopping


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`. Schedulers often signal the whole process group (SLURM's
    scancel, Ctrl-C in a terminal); torch's workers die of SIGTERM, and the main process then fails
    with "DataLoader worker ... is killed by signal" instead of finishing its step and saving.
    Workers ignore every signal a run may stop on: the main process shuts them down, and they exit if it dies."""
    for name in STOPPABLE:
        signal.signal(signal.Signals[name], signal.SIG_IGN)

"""`acc-clip launch [accelerate launch options] COMMAND [ARGS...]`: Accelerate's launcher, run through its
own API (accelerate.commands.launch), with the trainer's exit status and nothing else on the way out.
COMMAND is `train` or `eval` (`-m acc_clip.train` / `-m acc_clip.eval`), or `-m MODULE`.

What plain `accelerate launch` does, observed with accelerate 1.15 / torch 2.14 on 1 and 2 CPU processes:
- One process (simple_launcher): the trainer runs in the launcher's process group and Accelerate waits on
  it with Python's default signal handling. A non-zero status becomes a CalledProcessError traceback and
  exit 1. SIGTERM to the group kills the launcher at once (status 143) while the orphaned trainer saves
  and exits 75 unseen; SIGTERM to the launcher alone kills it and leaves the trainer training.
- Several (torch elastic's agent, inside the launcher process): workers start in sessions of their own,
  so a signal to the launcher's group reaches the agent only. Its handler raises SignalException out of
  the monitor loop; the agent sends that signal to each worker, waits for them up to shutdown_timeout
  (30 s) before SIGKILL, reaps them, drops their statuses and re-raises: the workers saved and exited 75,
  Accelerate prints the SignalException traceback and exits 1. When a worker fails, the agent SIGTERMs
  the others and raises ChildFailedError listing every non-zero status, its own kills included (a rank
  still shutting down after printing the same error showed -15), printed as a report after a traceback.

Accelerate 1.16's one-process launcher also takes SIGTERM over while it waits (exit 143, the trainer killed
5 s later): `run_one_process` runs the command it prepares instead.

Here: torch's handler is kept off SIGTERM/SIGINT (torchrun's --signals_to_handle, through its PET_
variable), so the agent never tears the workers down on a signal; this launcher's handler passes the
stop on to its children (the trainer or the workers) and Accelerate's launcher keeps waiting for them.
The agent still treats the first rank to exit 75 as failed and SIGTERMs the rest; a rank already past
its save and in interpreter shutdown (Python's handlers gone) then dies of it: observed {1: 75, 0: -15}
with a complete checkpoint, hence STATUS_ORDER below. The status comes from the CalledProcessError (one
process) or the ChildFailedError's ranks (several); torch elastic's log lines are muted, and nothing
else is printed but at most one line naming the rank when ranks failed differently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

import psutil

from acc_clip.errors import UsageError, describe_error
from acc_clip.runtime.signals import PREEMPTED_EXIT_CODE, STOPPABLE

COMMANDS = {"train": "acc_clip.train", "eval": "acc_clip.eval"}
USAGE = "usage: acc-clip launch [accelerate launch options] {train,eval,-m MODULE} [ARGS...]"
# Which rank's status the launcher reports (lowest first): a rank's own failure, then a stop after saving,
# then what torch's agent leaves on the ranks it tears down once one rank has exited non-zero: SIGTERM
# (a rank already finishing, its Python handlers gone, dies of it) and, after its grace period, SIGKILL.
STATUS_ORDER = {PREEMPTED_EXIT_CODE: 1, -signal.SIGKILL: 2, -signal.SIGTERM: 3, -signal.SIGINT: 3}
TEARDOWN_STATUSES = {-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT}


class StoppedBeforeStart(BaseException):
    """A stop signal came when no trainer was running yet: nothing to save, the launch is abandoned.
    A BaseException, as KeyboardInterrupt is, so that no `except Exception` in torch's agent keeps it."""


def parse_launch_args(argv: list[str]):
    """Accelerate's own launch parser (options, config file, the command and its arguments), with its
    usage-and-exit on a bad option turned into one UsageError line."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    parser.prog = "acc-clip launch"

    def one_line_error(message: str):
        raise UsageError(message.replace("training_script, training_script_args", "COMMAND"))

    parser.error = one_line_error  # argparse routes every parse failure through the instance's error()
    args = parser.parse_args(argv)
    if not args.module:  # `-m MODULE` passes through as in accelerate launch; a bare word is one of ours
        if args.training_script not in COMMANDS:
            raise UsageError(f"unknown command {args.training_script!r}: expected train, eval or -m MODULE")
        args.module, args.training_script = True, COMMANDS[args.training_script]
    # --quiet makes Accelerate exit 1 instead of raising with the status; nothing is printed here anyway.
    args.quiet = False
    return args


class StopForwarder:
    """A stop signal on the launcher (SIGTERM, SIGINT, SIGUSR1, SIGUSR2: runtime/signals.STOPPABLE): passed
    on to its children, the trainers, which finish their step, save and exit 75 (runtime/signals.py);
    Accelerate's launcher goes on waiting for them. A signal goes on as itself, so a trainer treats it as its
    --stop-signals say.

    The first signal goes on as SIGTERM even when it was SIGINT: a Ctrl-C or a group signal also reaches a
    single trainer directly (same process group), and two SIGINTs would make it stop without saving. A
    SIGINT after a first stop goes on as SIGINT, so a second Ctrl-C still interrupts at once, as without
    the launcher."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.launch_over = False

    def install(self) -> None:
        for name in STOPPABLE:
            signal.signal(signal.Signals[name], self.handle)

    def handle(self, signum: int, frame) -> None:
        forward = signal.SIGTERM if signum == signal.SIGINT and self.received is None else signal.Signals(signum)
        self.received = signum
        # Workers run in sessions of their own (torch elastic), so a group signal never reached them:
        # the launcher's direct children are exactly the trainers, under both of Accelerate's launchers.
        children = psutil.Process().children()
        if not children and not self.launch_over:
            # None started yet (or, for the few ms between the last reap and launch_command's return,
            # all gone): unwind the launch; torch's agent closes whatever it had begun.
            raise StoppedBeforeStart
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):  # exited meanwhile: its status still reaches Accelerate
                child.send_signal(forward)


def keep_torch_off_stop_signals() -> None:
    """torch elastic's agent (several processes) turns SIGTERM/SIGINT into SignalException, kills the
    workers after a grace period and loses their statuses; without the stop signals in its list the agent keeps
    monitoring, and the workers' own exits (75) come back in its ChildFailedError. SIGHUP/SIGQUIT stay
    torch's. The list is torchrun's --signals_to_handle, which Accelerate does not pass on: its default is
    read from PET_SIGNALS_TO_HANDLE (torch sets TORCHELASTIC_SIGNALS_TO_HANDLE from it, over any value)."""
    wanted = os.environ.get("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT").split(",")
    kept = [name.strip() for name in wanted if name.strip() not in (*STOPPABLE, "")]
    os.environ["PET_SIGNALS_TO_HANDLE"] = ",".join(kept or ["SIGQUIT"])


def mute_torch_elastic_logs() -> None:
    """The agent logs each closing signal and a 'failed (exitcode ...)' line: the report this launcher
    replaces. Its loggers set their own levels, so they are cut off at their common parent instead;
    LOGLEVEL (torch elastic's own switch) leaves them on for debugging."""
    if "LOGLEVEL" in os.environ:
        return
    elastic = logging.getLogger("torch.distributed.elastic")
    elastic.addHandler(logging.NullHandler())  # else logging's last resort would print them to stderr
    elastic.propagate = False


def shell_status(returncode: int) -> int:
    """Popen's -N (killed by signal N) as a shell reports it, 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_status(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit {returncode}"


def status_of_ranks(statuses: dict[int, int]) -> int:
    """The launcher's status from the failed ranks' {rank: returncode} (STATUS_ORDER, then the lowest
    rank). One line on stderr names the rank when ranks exited with different statuses of their own."""
    rank, code = min(statuses.items(), key=lambda item: (STATUS_ORDER.get(item[1], 0), item[0]))
    # A rank the teardown killed (e.g. while it printed the same error) is no news; another own status is.
    if len({c for c in statuses.values() if c not in TEARDOWN_STATUSES}) > 1:
        others = ", ".join(f"rank {r}: {describe_status(c)}" for r, c in sorted(statuses.items()) if r != rank)
        print(f"acc-clip launch: status from rank {rank} ({describe_status(code)}); {others}", file=sys.stderr)
    return shell_status(code)


def run_one_process(args) -> None:
    """Accelerate's one-process launch (its simple_launcher): the command and environment Accelerate prepares,
    run and waited on here. Accelerate 1.16's own launcher takes SIGTERM over while it waits, exits 143 and kills
    the trainer 5 s later, in the middle of its save; here the StopForwarder passes the signal on and the
    trainer's own status comes back, as a CalledProcessError like Accelerate's."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    command, environment = prepare_simple_launcher_cmd_env(args)
    returncode = subprocess.Popen(command, env=environment).wait()  # a handled signal does not end the wait
    if returncode != 0:
        raise subprocess.CalledProcessError(returncode=returncode, cmd=command)


def launch(args) -> BaseException | None:
    """Accelerate's launch_command, with its one-process launcher replaced by `run_one_process` (launch_command
    picks its launchers by name from its module); the exception it ended with, if any."""
    import accelerate.commands.launch as accelerate_launch
    from accelerate.commands.launch import launch_command

    accelerate_launch.simple_launcher = run_one_process
    try:
        launch_command(args)
    except Exception as error:  # noqa: BLE001 - read by exit_status, outside the launch
        return error
    return None


def exit_status(outcome: BaseException | None) -> int:
    """The trainers' status from how Accelerate's launcher ended."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if outcome is None:
        return 0
    if isinstance(outcome, subprocess.CalledProcessError):  # simple_launcher: the one trainer's status
        return shell_status(outcome.returncode)
    if isinstance(outcome, ChildFailedError):  # torch elastic: every rank that exited non-zero
        return status_of_ranks({rank: failure.exitcode for rank, failure in outcome.failures.items()})
    if isinstance(outcome, SignalException):  # SIGHUP/SIGQUIT, still torch's: the workers were torn down
        return 128 + int(outcome.sigval)
    raise outcome  # Accelerate's own checks (a missing config file, bad values): main's one line


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        return UsageError.exit_status
    stop = StopForwarder()
    stop.install()  # before Accelerate is imported: a stop in those seconds must not kill the launcher
    try:
        args = parse_launch_args(argv)
        keep_torch_off_stop_signals()
        mute_torch_elastic_logs()
        outcome = launch(args)
        stop.launch_over = True  # a stop now finds no children because they are gone, not yet to come
        return exit_status(outcome)
    except StoppedBeforeStart:
        return PREEMPTED_EXIT_CODE
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    except Exception as error:  # noqa: BLE001 - Accelerate's own checks of its options, as one line
        print(f"error: {describe_error(error)}", file=sys.stderr)
        return UsageError.exit_status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Errors a user can act on, each one line, each kind with its own exit status, so that a scheduler or a
wrapper script can tell "fix the command" from "fix the data" from "retry later":

| status | kind | meaning |
| --- | --- | --- |
| 0 | | done |
| 1 | (a bug) | an unexpected exception, with its traceback |
| 2 | UsageError | the command line or a config file: a flag, a value, a combination |
| 3 | DataError | the data: a CSV, an image folder, shards, a validation set |
| 4 | CheckpointError | a checkpoint or weights file: missing, damaged, of another run or model |
| 5 | ResourceError | the machine or its storage: a full disk, a run folder in use, remote storage |
|   |               | (retrying later or elsewhere may succeed) |
| 6 | DivergedError | training diverged: a non-finite loss or weights |
|   |               | (resume from the last checkpoint with other settings) |
| 75 | | preempted: stopped on a signal after saving; rerun with --resume latest (runtime/signals.py) |

Every message names the file, row, key or flag at fault. `run_command` prints it as `error: ...` and
returns the status."""

from __future__ import annotations

import sys
from collections.abc import Callable


class AccClipError(Exception):
    """A failure reported to the user as one line; the subclass says which kind (and the exit status)."""

    exit_status = 2


class UsageError(AccClipError):
    """The command line or a config file is wrong: fix the command."""

    exit_status = 2


class DataError(AccClipError):
    """The data cannot be read as given: fix the data (or let bad samples be skipped)."""

    exit_status = 3


class CheckpointError(AccClipError):
    """A checkpoint or weights file is missing, damaged, or belongs to another run or model."""

    exit_status = 4


class ResourceError(AccClipError):
    """The machine or its storage failed the run (a full disk, a folder in use): retrying may succeed."""

    exit_status = 5


class DivergedError(AccClipError):
    """Training produced non-finite values; the checkpoints saved before are kept."""

    exit_status = 6


def describe_error(error: BaseException) -> str:
    """'Type: first line of the message': enough to name a failure in one line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """An AccClipError's own message (already one line for the user); 'Type: first line' for any other."""
    return str(error) if isinstance(error, AccClipError) else describe_error(error)


KINDS = {
    kind.__name__: kind for kind in (AccClipError, UsageError, DataError, CheckpointError, ResourceError, DivergedError)
}


def kind_name(error: BaseException, otherwise: type[AccClipError]) -> str:
    """The name of an error's kind, to send to other processes (`KINDS[name]` rebuilds it there); an
    exception that is not an AccClipError counts as `otherwise`."""
    return type(error).__name__ if type(error) in KINDS.values() else otherwise.__name__


def attempt(function: Callable, *args) -> Exception | None:
    """Run function(*args); the exception it raised, or None. For collective steps where every process
    must learn of one process's failure before any of them stops (see checkpoint/manager.py)."""
    try:
        function(*args)
    except Exception as error:  # noqa: BLE001 - reported to every process, then raised as one line
        return error
    return None


def run_command(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """A command's `main(argv)`, its AccClipError printed as one line and turned into its exit status."""
    try:
        return int(main(argv) or 0)
    except AccClipError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status

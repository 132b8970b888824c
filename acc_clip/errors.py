"""The one exception type for bad user input, and the helpers that turn other failures into one line.

The CLI prints it as a single line (`error: ...`) and exits with status 2, so every message
must name the file, row, key or flag at fault.
"""


class AccClipError(Exception):
    """Bad input or configuration, reported to the user as one line."""


def user_error_exit_code() -> int:
    return 2


def describe_error(error: BaseException) -> str:
    """'Type: first line of the message': enough to name a failure in one line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """An AccClipError's own message (already one line for the user); 'Type: first line' for any other."""
    return str(error) if isinstance(error, AccClipError) else describe_error(error)


def attempt(function, *args):
    """Run function(*args); the exception it raised, or None. For collective steps where every process
    must learn of one process's failure before any of them stops (see checkpoint/manager.py)."""
    try:
        function(*args)
    except Exception as error:  # noqa: BLE001 - reported to every process, then raised as one line
        return error
    return None

"""The one exception type for bad user input.

The CLI prints it as a single line (`error: ...`) and exits with status 2, so every message
must name the file, row, key or flag at fault.
"""


class AccClipError(Exception):
    """Bad input or configuration, reported to the user as one line."""


def user_error_exit_code() -> int:
    return 2

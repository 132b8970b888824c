"""Error kinds (acc_clip/errors.py): each kind's exit status, `run_command` printing one line and
returning that status, and the names that carry a kind to other processes."""

from __future__ import annotations

import pytest

from acc_clip.errors import (
    KINDS,
    AccClipError,
    CheckpointError,
    DataError,
    DivergedError,
    ResourceError,
    UsageError,
    attempt,
    describe_error,
    kind_name,
    one_line,
    run_command,
)

STATUSES = {UsageError: 2, DataError: 3, CheckpointError: 4, ResourceError: 5, DivergedError: 6}


@pytest.mark.parametrize("kind, status", STATUSES.items())
def test_run_command_prints_one_line_and_returns_the_kind_s_status(kind, status, capsys):
    def main(argv):
        assert argv == ["--x", "1"]
        raise kind(f"--x 1: broken ({kind.__name__})")

    assert kind.exit_status == status
    assert run_command(main, ["--x", "1"]) == status
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: --x 1: broken ({kind.__name__})\n"


def test_every_kind_is_an_acc_clip_error_with_its_own_status():
    assert all(issubclass(kind, AccClipError) for kind in STATUSES)
    assert len(set(STATUSES.values())) == len(STATUSES)
    assert AccClipError.exit_status == 2  # a plain AccClipError is a usage error
    with pytest.raises(AccClipError):  # catching the base catches every kind
        raise DivergedError("loss is nan at step 3")


def test_run_command_returns_main_s_status_and_0_for_none(capsys):
    assert run_command(lambda argv: None, []) == 0
    assert run_command(lambda argv: 1, []) == 1  # e.g. compare-loss: the comparison failed
    assert capsys.readouterr().err == ""


def test_an_unexpected_exception_is_not_turned_into_a_line():
    """A bug keeps its traceback (status 1 from the interpreter)."""

    def main(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_command(main, [])


def test_describe_error_and_one_line():
    assert describe_error(ValueError("first\nsecond")) == "ValueError: first"
    assert describe_error(RuntimeError()) == "RuntimeError"
    assert one_line(DataError("row 3: bad")) == "row 3: bad"
    assert one_line(OSError(28, "No space left on device")) == "OSError: [Errno 28] No space left on device"


def test_kind_names_carry_a_kind_to_other_processes():
    assert KINDS[kind_name(CheckpointError("x"), UsageError)] is CheckpointError
    assert kind_name(ValueError("x"), ResourceError) == "ResourceError"  # a foreign error counts as `otherwise`
    assert set(KINDS.values()) == {AccClipError, *STATUSES}


def test_attempt_returns_the_exception_or_none():
    assert attempt(lambda x: x, 1) is None
    error = attempt(lambda: 1 / 0)
    assert isinstance(error, ZeroDivisionError)

"""The remote copy's heartbeat (RemoteSync, on a file:// folder): `--resume latest` never adopts a remote
run whose owner still runs (a fresh heartbeat of another run), adopts one whose heartbeat is stale, marked
stopped, absent (an older acc_clip) or unreadable, and the owner keeps its heartbeat fresh while it owns the
folder, and never once another run claimed it.

The trainer's side (a SIGKILLed run, then a refusal and an adoption) is in tests/integration/test_checkpoint.py."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from acc_clip.checkpoint.remote_sync import HEARTBEAT_FILE, RemoteSync
from acc_clip.errors import UsageError


def run_with_sync(tmp_path: Path, machine: str, **settings) -> tuple[Path, RemoteSync]:
    """A run folder `tmp_path/machine/run` copied to `tmp_path/remote/run`."""
    run = tmp_path / machine / "run"
    run.mkdir(parents=True)
    return run, RemoteSync(str(run), f"file://{tmp_path / 'remote'}", "fsspec", 60, **settings)


def heartbeat(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "remote" / "run" / HEARTBEAT_FILE).read_text())


def age_heartbeat(tmp_path: Path, seconds: float) -> None:
    """Make the remote heartbeat `seconds` old, as a run that stopped beating that long ago leaves it."""
    beat = heartbeat(tmp_path)
    beat["time"] = time.time() - seconds
    (tmp_path / "remote" / "run" / HEARTBEAT_FILE).write_text(json.dumps(beat))


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def owner(tmp_path) -> RemoteSync:
    """The run that copies to the remote folder, claimed as a first start claims it."""
    _run, sync = run_with_sync(tmp_path, "machine_a")
    sync.claim(may_adopt=False)
    return sync


def test_a_fresh_heartbeat_of_another_run_refuses_adoption_naming_run_host_and_age(tmp_path, owner):
    age_heartbeat(tmp_path, 42)
    before = heartbeat(tmp_path)
    run, adopter = run_with_sync(tmp_path, "machine_b")
    mine = adopter.run_id
    with pytest.raises(UsageError) as refused:
        adopter.claim(may_adopt=True)
    message = str(refused.value)
    assert "\n" not in message
    assert re.search(
        rf"belongs to run {owner.run_id}, which may still run on {re.escape(socket.gethostname())} \(pid \d+\): "
        r"its heartbeat is 42 s old, fresher than --remote-stale-after 900 s; stop that run first or wait",
        message,
    ), message
    # nothing taken over: the adopter keeps its own id, the remote folder its owner and heartbeat
    assert adopter.run_id == mine and (run / "run_id").read_text().strip() == mine
    assert (tmp_path / "remote" / "run" / "run_id").read_text().strip() == owner.run_id
    assert heartbeat(tmp_path) == before


def test_a_stale_heartbeat_is_adopted_with_a_warning_naming_its_age(tmp_path, owner, caplog):
    age_heartbeat(tmp_path, 1000)
    run, adopter = run_with_sync(tmp_path, "machine_b")
    with caplog.at_level("WARNING"):
        adopter.claim(may_adopt=True)
    assert adopter.run_id == owner.run_id and (run / "run_id").read_text().strip() == owner.run_id
    assert "its heartbeat from " in caplog.text and " is 1000 s old, stale (--remote-stale-after 900)" in caplog.text
    assert time.time() - heartbeat(tmp_path)["time"] < 60  # the adopter's own, fresh
    assert heartbeat(tmp_path)["stopped"] is False

    # the staleness is the option's: 1000 s is fresh under --remote-stale-after 3600
    age_heartbeat(tmp_path, 1000)
    _run, patient = run_with_sync(tmp_path, "machine_c", stale_after=3600)
    with pytest.raises(UsageError, match="is 1000 s old, fresher than --remote-stale-after 3600 s"):
        patient.claim(may_adopt=True)


def test_a_run_that_stopped_is_adopted_at_once(tmp_path, owner, caplog):
    owner.stop()  # a normal end, or preemption's exit 75
    assert heartbeat(tmp_path)["stopped"] is True and heartbeat(tmp_path)["run_id"] == owner.run_id
    _run, adopter = run_with_sync(tmp_path, "machine_b")
    with caplog.at_level("WARNING"):
        adopter.claim(may_adopt=True)
    assert adopter.run_id == owner.run_id
    assert re.search(r"its owner on \S+ \(pid \d+\) stopped \d+ s ago", caplog.text), caplog.text


@pytest.mark.parametrize("body", [None, b"\xff\xfe not utf-8", b'{"run_id": "x"}', b"[1, 2]"])
def test_a_run_without_a_readable_heartbeat_is_adopted(tmp_path, owner, caplog, body):
    """None: a remote run copied by an older acc_clip, which wrote no heartbeat. The others: warned about."""
    path = tmp_path / "remote" / "run" / HEARTBEAT_FILE
    if body is None:
        path.unlink()
    else:
        path.write_bytes(body)
    _run, adopter = run_with_sync(tmp_path, "machine_b")
    with caplog.at_level("WARNING"):
        adopter.claim(may_adopt=True)
    assert adopter.run_id == owner.run_id
    assert ("cannot be read; taken as no heartbeat" in caplog.text) == (body is not None)


def test_the_owner_refreshes_its_heartbeat_and_stops_once_another_run_claims_the_folder(tmp_path, caplog):
    # a copy every 60 s, a staleness of 0.3 s: the heartbeat comes every 0.1 s, between copies
    _run, sync = run_with_sync(tmp_path, "machine_a", stale_after=0.3)
    sync.claim(may_adopt=False)
    sync.start()
    try:
        first = heartbeat(tmp_path)
        assert first["run_id"] == sync.run_id and first["host"] == socket.gethostname() and not first["stopped"]
        assert wait_for(lambda: heartbeat(tmp_path)["time"] >= first["time"] + 0.25)  # beats, not just one

        with caplog.at_level("WARNING"):
            claimed = tmp_path / "remote" / "run_id.new"
            claimed.write_text("another-run\n")
            claimed.replace(tmp_path / "remote" / "run" / "run_id")  # another run claims it, in one write
            assert wait_for(lambda: "now belongs to run another-run" in caplog.text)  # a beat found it out
        last = heartbeat(tmp_path)
        time.sleep(0.4)
        assert heartbeat(tmp_path) == last  # never beaten again
    finally:
        sync.stop()
    assert heartbeat(tmp_path) == last  # nor marked stopped: the folder is no longer this run's


def test_a_long_copy_refreshes_the_heartbeat_between_its_files(tmp_path):
    run, sync = run_with_sync(tmp_path, "machine_a", stale_after=0.3)
    sync.claim(may_adopt=False)
    for name in "abc":
        (run / f"{name}.txt").write_text(name)
    put_file = sync.fs.put_file

    def slow_put_file(local: str, remote: str) -> None:
        time.sleep(0.15)
        put_file(local, remote)

    sync.fs.put_file = slow_put_file
    claimed = heartbeat(tmp_path)["time"]
    assert sync.sync_once() == 4  # a, b, c and run_id
    assert heartbeat(tmp_path)["time"] >= claimed + 0.25

"""Fault injection: the faults of docs/reliability.md, each on a fresh run folder, and a table of what happened.

    python tools/fault_injection.py [--work DIR]

Every run trains the tiny ResNet config on a 160-row demo CSV (2 epochs of 10 steps, batch 16) on the
CPU, with --log-samples so that each run records the samples of every optimizer step. "Data
lost" compares a run that met a fault (and was resumed) with one uninterrupted run: samples trained a
different number of times (twice, or never) plus steps whose loss differs. It must be 0 everywhere.
A full disk needs a tmpfs mount (root); without that right the row says "not tried". Takes a few
minutes on 2 cores. Not a test: tests/ holds one test per fault (named in docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from fault_runs import ENV, REPO, data_lost, error_line, make_data, records, run, train_args  # noqa: E402
from PIL import Image  # noqa: E402

from acc_clip.errors import CheckpointError, DataError, ResourceError, UsageError  # noqa: E402
from acc_clip.runtime.faults import kill_at  # noqa: E402
from acc_clip.runtime.signals import PREEMPTED_EXIT_CODE  # noqa: E402


class Outcome(NamedTuple):
    seen: str  # what the user saw, shortened
    lost: int  # samples trained a different number of times than in the uninterrupted run, + losses that differ
    ended_well: bool  # the fault met its answer: the refusal, the skip, or a resume that ran to the end


def wait_for_steps(run_dir: Path, steps: int, process: subprocess.Popen) -> None:
    while len(records(run_dir, "metrics.jsonl")) < steps:
        if process.poll() is not None:
            raise RuntimeError(f"the run ended before step {steps}: {process.stderr.read()[-2000:]}")
        time.sleep(0.2)


def interrupted_then_resumed(work: Path, data: Path, reference: Path, name: str, signum: int) -> Outcome:
    logs = work / name
    process = subprocess.Popen(
        train_args(data, logs, "run"), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_steps(logs / "run", 7, process)
    process.send_signal(signum)
    process.wait(timeout=300)
    resumed = run(train_args(data, logs, "run", "--resume", "latest"))
    seen = f"stopped (exit {process.returncode}); resumed: " + (
        "ok" if resumed.returncode == 0 else error_line(resumed)
    )
    stopped_mid_run = process.returncode in (-signal.SIGKILL, PREEMPTED_EXIT_CODE) and "resumed from" in resumed.stdout
    return Outcome(seen, data_lost(logs / "run", reference), stopped_mid_run and resumed.returncode == 0)


# the faults: each returns an Outcome (None: not tried here) --------------------------------------


def kill_9_mid_epoch(work, data, reference):
    return interrupted_then_resumed(work, data, reference, "kill9", signal.SIGKILL)


def sigterm_mid_epoch(work, data, reference):
    return interrupted_then_resumed(work, data, reference, "sigterm", signal.SIGTERM)


def kill_9_inside_a_save(work, data, reference):
    logs = work / "kill_in_save"
    killed = run(train_args(data, logs, "run"), env=kill_at("before_commit", 6))
    resumed = run(train_args(data, logs, "run", "--resume", "latest"))
    partial = any(p.name.startswith(".tmp-") for p in (logs / "run" / "checkpoints").iterdir())
    return Outcome(
        f"killed (exit {killed.returncode}); resumed: {'ok' if resumed.returncode == 0 else error_line(resumed)}"
        f"; partial save left: {partial}",
        data_lost(logs / "run", reference),
        killed.returncode == -signal.SIGKILL and resumed.returncode == 0 and not partial,
    )


def bit_flip_in_newest_checkpoint(work, data, reference):
    logs = work / "bitflip"
    process = subprocess.Popen(
        train_args(data, logs, "run"), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_steps(logs / "run", 8, process)
    process.kill()
    process.wait()
    newest = sorted((logs / "run" / "checkpoints").glob("step_*"))[-1]
    weights = bytearray((newest / "model.safetensors").read_bytes())
    weights[-8] ^= 0x40
    (newest / "model.safetensors").write_bytes(bytes(weights))
    resumed = run(train_args(data, logs, "run", "--resume", "latest"))
    said = [line for line in resumed.stdout.splitlines() + resumed.stderr.splitlines() if "passes its check" in line]
    seen = (said[0].split("--resume latest: ")[-1][:160] if said else "no fallback said") + (
        "" if resumed.returncode == 0 else "; " + error_line(resumed)
    )
    return Outcome(seen, data_lost(logs / "run", reference), resumed.returncode == 0 and bool(said))


def full_disk_during_a_save(work, data, reference):
    from acc_clip.io.sealed import folder_bytes

    room = int(folder_bytes(str(sorted((reference / "checkpoints").glob("step_*"))[-1])) * 1.5) + 2_000_000
    disk = work / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        return None  # room for one and a half checkpoints: the second save fails
    try:
        failed = run(train_args(data, disk, "run"))
        subprocess.run(["mount", "-o", f"remount,size={room * 10}", str(disk)], check=True)  # every save kept
        resumed = run(train_args(data, disk, "run", "--resume", "latest"))
        seen = f"{error_line(failed)[:150]}...; after freeing space, resumed: " + (
            "ok" if resumed.returncode == 0 else error_line(resumed)
        )
        said_space = (
            failed.returncode == ResourceError.exit_status
            and "no space left on the disk" in error_line(failed)
            and "MB are free" in error_line(failed)
        )
        return Outcome(seen, data_lost(disk / "run", reference), said_space and resumed.returncode == 0)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def second_run_with_the_same_name(work, data, reference):
    logs = work / "twice"
    first = subprocess.Popen(
        train_args(data, logs, "run"), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_steps(logs / "run", 2, first)
    first.send_signal(signal.SIGSTOP)  # still running (paused) however fast the tiny run would end
    second = run(train_args(data, logs, "run", "--resume", "latest"))
    first.send_signal(signal.SIGCONT)
    first.wait(timeout=600)
    refused = second.returncode == ResourceError.exit_status and "is in use by another run" in error_line(second)
    return Outcome(
        f"second run: {error_line(second)[:140]}; first run exit {first.returncode}",
        data_lost(logs / "run", reference),
        refused and first.returncode == 0,
    )


def shifted_csv_row(work, data, reference):
    shifted = work / "shifted.csv"
    lines = data.read_text().splitlines()
    lines[5] = lines[5] + ",an extra field"
    shifted.write_text("\n".join(lines) + "\n")
    refused = run(train_args(shifted, work / "shifted", "run"))
    skipped = run(train_args(shifted, work / "shifted", "skip", "--skip-bad-rows", "--epochs", "1"))
    said = [line for line in skipped.stdout.splitlines() + skipped.stderr.splitlines() if "skipped 1 row" in line]
    named = refused.returncode == DataError.exit_status and "row 5 (line 6) has 3 fields" in error_line(refused)
    return Outcome(
        f"{error_line(refused)[:120]}...; with --skip-bad-rows: {'1 row skipped, named' if said else 'not said'}",
        0,
        named and bool(said) and skipped.returncode == 0,
    )


def bad_images(work, data, reference):
    rows = data.read_text().splitlines()
    corrupt, fifo = work / "corrupt.jpg", work / "pipe.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    os.mkfifo(fifo)
    rows[1] = f"{corrupt},a corrupt image"
    rows[2] = f"{work / 'missing.jpg'},a missing image"
    rows[3] = f"{fifo},a FIFO"
    eps = work / "drawing.jpg"  # an EPS file under a photo's name: PIL would hand it to Ghostscript
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    rows[4] = f"{eps},an EPS drawing"
    bad = work / "bad_images.csv"
    bad.write_text("\n".join(rows) + "\n")
    result = run(train_args(bad, work / "bad_images", "run", "--epochs", "1", "--max-bad-fraction", "0.2"))
    said = [line for line in result.stdout.splitlines() if "samples skipped so far" in line]
    counted = said[-1].split(": ", 1)[-1] if said else error_line(result)
    # PIL itself would take the EPS for an image (and hand it to Ghostscript where installed)
    eps_refused = Image.open(str(eps)).format == "EPS" and not _decodes(eps.read_bytes())
    # the 4 bad rows are lost by nature: counted, never replaced by other samples
    seen_twice = sum(
        n - 1
        for n in Counter(
            i for r in records(work / "bad_images" / "run", "samples.jsonl") for i in r["indices"]
        ).values()
        if n > 1
    )
    return Outcome(
        counted[:120] + ("; the EPS refused by format" if eps_refused else "; the EPS NOT refused by format"),
        seen_twice,
        result.returncode == 0 and "4 samples skipped" in counted and eps_refused,
    )


def _decodes(data: bytes) -> bool:
    from acc_clip.data.pixels import ImageDecodeError, pil_image

    try:
        pil_image(data, decode=False)
    except ImageDecodeError:
        return False
    return True


def cut_shard(work, data, reference):
    shards = work / "shards"
    converted = run(
        [
            sys.executable,
            "-m",
            "acc_clip.cli",
            "shards",
            "--csv",
            str(data),
            "--out",
            str(shards),
            "--samples-per-shard",
            "40",
            "--no-progress",
        ]
    )
    if converted.returncode:
        return Outcome(f"conversion failed: {error_line(converted)}", 0, False)
    with tarfile.open(shards / "00001.tar") as tar:
        cut = tar.getmembers()[9].offset  # three whole samples kept, 37 missing
    with open(shards / "00001.tar", "r+b") as file:
        file.truncate(cut)
    verify = run([sys.executable, "-m", "acc_clip.cli", "shards", "verify", str(shards)])
    result = run(train_args(shards, work / "cut", "run", "--epochs", "1", "--max-bad-fraction", "0.5"))
    indices = [i for r in records(work / "cut" / "run", "samples.jsonl") for i in r["indices"]]
    said = [line for line in result.stdout.splitlines() if "samples skipped so far" in line]
    verified = "verify names it" if "cut short" in verify.stdout + verify.stderr else "verify silent"
    counted = said[-1].split(": ", 1)[-1] if said else error_line(result)
    return Outcome(
        f"{verified}; training: {counted[:90]}",
        len(indices) - len(set(indices)),
        verified == "verify names it" and "37 samples skipped" in counted,
    )


def refused(result: subprocess.CompletedProcess, status: int, *words: str) -> bool:
    """Refused with one line naming `words`, and the exit status of the error's kind (acc_clip/errors.py)."""
    return (
        result.returncode == status
        and len(result.stderr.strip().splitlines()) == 1
        and all(word in result.stderr for word in words)
    )


def unreadable_random_state(work, data, reference):
    from acc_clip.io.files import file_sha256
    from acc_clip.io.sealed import MANIFEST

    copy = work / "rng" / "step_00000003"
    shutil.copytree(reference / "checkpoints" / "step_00000003", copy)
    (copy / "random_states_0.pkl").write_bytes(b"not a pickle")
    manifest = json.loads((copy / MANIFEST).read_text())  # made to match: only the load can fail
    manifest["files"]["random_states_0.pkl"] = (copy / "random_states_0.pkl").stat().st_size
    manifest["sha256"]["random_states_0.pkl"] = file_sha256(str(copy / "random_states_0.pkl"))
    (copy / MANIFEST).write_text(json.dumps(manifest))
    result = run(train_args(data, work / "rng", "run", "--resume", str(copy)))
    return Outcome(
        error_line(result)[-120:],
        0,
        refused(result, CheckpointError.exit_status, "random_states_0.pkl", "could not be restored"),
    )


def same_name_and_remote_elsewhere(work, data, reference):
    remote = f"file://{work / 'remote'}"
    first = run(
        train_args(
            data,
            work / "machine_a",
            "run",
            "--epochs",
            "1",
            "--remote-sync",
            remote,
            "--remote-sync-protocol",
            "fsspec",
        )
    )
    metrics = (work / "remote" / "run" / "metrics.jsonl").read_text() if first.returncode == 0 else ""
    second = run(
        train_args(data, work / "machine_b", "run", "--remote-sync", remote, "--remote-sync-protocol", "fsspec")
    )
    untouched = (work / "remote" / "run" / "metrics.jsonl").read_text() == metrics != ""
    return Outcome(
        error_line(second)[:140],
        0 if untouched else 1,
        refused(second, UsageError.exit_status, "holds another run's copy") and untouched,
    )


def damaged_sizes_json(work, data, reference):
    shards = work / "sizes_shards"
    run([sys.executable, "-m", "acc_clip.cli", "shards", "--csv", str(data), "--out", str(shards), "--no-progress"])
    (shards / "sizes.json").write_text('{"00000.tar": "many"')
    result = run(train_args(shards, work / "sizes", "run"))
    return Outcome(error_line(result)[:140], 0, refused(result, DataError.exit_status, "sizes.json"))


def csv_path_is_a_fifo(work, data, reference):
    fifo = work / "rows.csv"
    os.mkfifo(fifo)
    result = run(train_args(fifo, work / "fifo", "run"))
    return Outcome(error_line(result)[:140], 0, refused(result, DataError.exit_status, "not a regular file"))


FAULTS = [
    ("kill -9 in mid-epoch, then --resume latest", kill_9_mid_epoch),
    ("SIGTERM in mid-epoch, then --resume latest", sigterm_mid_epoch),
    ("kill -9 inside a save (before the commit)", kill_9_inside_a_save),
    ("one bit flipped in the newest checkpoint", bit_flip_in_newest_checkpoint),
    ("a full disk during a save", full_disk_during_a_save),
    ("a second run with the same --name", second_run_with_the_same_name),
    ("the same --name and --remote-sync from another machine", same_name_and_remote_elsewhere),
    ("a random-state file that cannot be read", unreadable_random_state),
    ("a CSV row with an extra field", shifted_csv_row),
    ("a corrupt JPEG, a missing file, a FIFO and an EPS in the CSV", bad_images),
    ("a shard cut at a member boundary", cut_shard),
    ("a damaged sizes.json", damaged_sizes_json),
    ("--train-data naming a FIFO", csv_path_is_a_fifo),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="folder for the runs (default: a new temporary folder, removed after)")
    parser.add_argument("--only", nargs="*", metavar="WORD", help="run only the faults whose name holds one of these")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="acc_clip_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work)
    reference = run(train_args(data, work / "reference", "run"))
    if reference.returncode:
        print(f"the uninterrupted run failed: {error_line(reference)}")
        return 1
    rows, lost_total = [], 0
    for name, fault in FAULTS:
        if args.only and not any(word in name for word in args.only):
            continue
        outcome = fault(work, data, work / "reference" / "run")
        if outcome is None:
            rows.append((name, "not tried (cannot mount a tmpfs here)", "-", "-"))
            continue
        lost_total += outcome.lost
        survived = outcome.lost == 0 and outcome.ended_well
        rows.append((name, outcome.seen, "yes" if survived else "NO", str(outcome.lost)))
    print("| fault | what the user sees | survived | data lost |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    tried = sum(row[2] != "-" for row in rows)
    print(f"\nfaults tried: {tried}, survived: {sum(row[2] == 'yes' for row in rows)}, data lost: {lost_total}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(row[2] in ("yes", "-") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Random-kill soak: a small run trained to its end through N kills at random moments, then compared with
the same run left alone.

    python tools/soak.py --kills 20 --steps 60 --processes 1|2 --data csv|shards --seed S --work DIR \\
        [--report FILE.json|FILE.md] [--trainer-flags="--async-save ..."]

The run: the tiny ResNet config, 64 px images, a global batch of 8, STEPS steps over --epochs epochs of a
demo CSV (or the same rows as 4 webdataset shards), a step checkpoint every --save-every steps and one at
each epoch's end, --log-samples. One process runs `python -m acc_clip.train`, two run under
`acc-clip launch --config_file launch/cpu_2proc.yaml train` (which returns the trainers' status, 75 when
preempted).

The uninterrupted run goes first, recording where it passes each fault point. The kills are then planned
from random.Random(--seed) (the same seed and run give the same plan; when a signal lands depends on the
machine, so the report says what happened): one in each of N equal spans of the run, SIGKILL, SIGTERM and
fault kills in equal shares, shuffled:
- SIGKILL or SIGTERM sent once the run has logged a random step (learnt from metrics.jsonl as it runs),
  a random fraction of a step later, or at a random moment of the start-up. SIGTERM makes the trainer
  save and exit 75; SIGKILL loses the steps since the last save. With two processes a SIGKILL goes to
  every process (a machine lost) or to one rank;
- a kill inside a save at each fault point of acc_clip/runtime/faults.py in turn (faults.POINTS: new
  points join by themselves), at a step where the uninterrupted run passed that point.
After each kill the trainer is started again with `--resume latest` until it exits 0. Then: the final
weights must be bit-equal to the uninterrupted run's (the last step checkpoint's model.safetensors and
every epoch_N.pt), every step's loss equal (metrics.jsonl, after the trainer's rewinds), and every sample
of every epoch trained as many times (samples.jsonl). Exit status 0 only on PASS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fault_runs import ENV, REPO, loss_differences, make_data, records, sample_count_differences, train_flags

from acc_clip.runtime import faults
from acc_clip.runtime.signals import PREEMPTED_EXIT_CODE

GLOBAL_BATCH = 8
IMAGE_SIZE = (80, 64)  # the model crops 64 px: small files, quick decoding
PROBE = "probe-train"  # internal command: the uninterrupted run, recording the fault points it passes
STARTUP_SHARE = 0.15  # the share of signal kills sent during start-up (loading, resuming, rewinding records)
KINDS = ("SIGKILL", "SIGTERM", "fault")
ATTEMPT_TIMEOUT_S = 600
ENDED_FIRST = "ended before the kill"


@dataclass(frozen=True)
class Setup:
    """The run a soak trains: its size, processes and data."""

    steps: int
    epochs: int
    processes: int
    data: str  # "csv" or "shards"
    save_every: int
    keep: int  # --keep-checkpoints
    extra: tuple[str, ...] = ()  # more trainer flags, for both runs (e.g. --async-save)

    @property
    def steps_per_epoch(self) -> int:
        return self.steps // self.epochs

    @property
    def rows(self) -> int:
        return self.steps_per_epoch * GLOBAL_BATCH


@dataclass(frozen=True)
class Kill:
    """One kill of the plan."""

    kind: str  # SIGKILL, SIGTERM or fault
    step: int  # a signal: sent once this global step is logged; a fault: the step whose save it kills
    fraction: float  # how far into the next step (or into the start-up) a signal goes
    startup: bool = False  # a signal sent during the start-up instead
    point: str | None = None  # the fault point
    target: str = "all"  # a SIGKILL with 2 processes: "all" or "rank N"

    @property
    def label(self) -> str:
        """The kind of kill: SIGKILL (to rank N), SIGTERM, fault POINT."""
        if self.kind == "fault":
            return f"fault {self.point}"
        return self.kind + (f" to {self.target}" if self.target != "all" else "")

    def describe(self) -> str:
        if self.kind == "fault":
            return f"{self.label} at step {self.step}"
        where = "start-up" if self.startup else f"after step {self.step}"
        return f"{self.label}, {where} +{self.fraction:.2f}"


@dataclass
class Attempt:
    """What one start of the trainer did."""

    number: int
    planned: str  # Kill.describe(), or "-" for a run left to finish
    kind: str = "-"  # Kill.label
    moment: str = ""  # where the kill actually landed
    sent_after_s: float | None = None  # seconds after this start (the exit, for a fault)
    step_when_sent: int | None = None  # global steps logged when the signal went (None: training not begun)
    status: int | None = None
    expected: bool = True  # the status is one this kill explains
    resumed_from: int | None = None  # the global step this start resumed from (None: a fresh start)
    last_step: int = 0  # global steps logged when it ended
    note: str = ""
    handlers_ready: bool = False  # the signal went after the run's first log line: every process handles a stop


@dataclass
class Reference:
    """The uninterrupted run: where it is, how long its start-up and steps take, where each point fires."""

    run_dir: Path
    startup_s: float
    step_s: float
    wall_s: float
    reached: dict[str, list[int]] = field(default_factory=dict)


# the plan -------------------------------------------------------------------------------------------


def plan_kills(seed: int, kills: int, steps: int, processes: int, reached: dict[str, list[int]]) -> list[Kill]:
    """`kills` kills from random.Random(seed), sorted by step so that they walk through the run: one at a
    random step of each of `kills` equal spans of the run, the kinds in equal shares and shuffled; a fault
    kill takes its point in turn from faults.POINTS, at a step where the uninterrupted run passed that point
    (`reached`), a step no other fault kill of that point takes."""
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(kills)]
    rng.shuffle(kinds)
    points = [faults.POINTS[i % len(faults.POINTS)] for i in range(kinds.count("fault"))]
    rng.shuffle(points)
    free = {point: sorted(found) for point, found in reached.items()}
    plan = []
    for slot, kind in enumerate(kinds):
        step, fraction = rng.randint(*span(slot, kills, steps)), rng.random()
        fault = place_fault(points.pop(), step, free) if kind == "fault" else None
        if fault is not None:
            plan.append(Kill("fault", fault[1], fraction, point=fault[0]))
            continue
        kind = "SIGKILL" if kind == "fault" else kind  # no fault point left to place: a crash instead
        startup = rng.random() < STARTUP_SHARE
        target = "all"
        if kind == "SIGKILL" and processes > 1:
            target = rng.choice(["all"] + [f"rank {r}" for r in range(processes)])
        plan.append(Kill(kind, step, fraction, startup=startup, target=target))
    return sorted(plan, key=lambda kill: kill.step)


def span(slot: int, kills: int, steps: int) -> tuple[int, int]:
    """The steps of the slot-th of `kills` equal spans of 1 .. steps - 1."""
    low = 1 + slot * (steps - 1) // kills
    return low, max(low, (slot + 1) * (steps - 1) // kills)


def place_fault(point: str, step: int, free: dict[str, list[int]]) -> tuple[str, int] | None:
    """(point, step) for a fault kill near `step`: `point` first, else the other points in turn; the first
    free step at or after `step` where the point was passed, else the last one before it. Taken from `free`."""
    order = [point] + [p for p in faults.POINTS if p != point]
    for candidate in order:
        left = free.get(candidate, [])
        if left:
            chosen = next((s for s in left if s >= step), left[-1])
            left.remove(chosen)
            return candidate, chosen
    return None


# the run --------------------------------------------------------------------------------------------


def make_train_data(work: Path, setup: Setup) -> Path:
    """setup.rows rows of the demo CSV, or the same rows as 4 shards."""
    from acc_clip.prep.shards.convert import convert_csv_to_shards

    full = make_data(work, num_train=math.ceil(setup.rows / 5), size=IMAGE_SIZE)
    lines = full.read_text().splitlines(keepends=True)
    csv = work / "train.csv"
    csv.write_text("".join(lines[: setup.rows + 1]))
    if setup.data == "csv":
        return csv
    shards = work / "shards"
    convert_csv_to_shards(str(csv), str(shards), samples_per_shard=setup.rows // 4, workers=1, progress=False)
    return shards


def soak_flags(setup: Setup, data: Path, logs: Path, name: str) -> list[str]:
    flags = train_flags(
        data,
        logs,
        name,
        "--batch-size",
        str(GLOBAL_BATCH // setup.processes),
        "--epochs",
        str(setup.epochs),
        "--save-every-n-steps",
        str(setup.save_every),
        "--save-frequency",
        "1",
        "--keep-checkpoints",
        str(setup.keep),
        *setup.extra,
    )
    if setup.data == "shards":  # a CSV option: shards would only be told it has no effect
        at = flags.index("--csv-separator")
        del flags[at : at + 2]
    return flags


def free_port() -> int:
    with socket.socket() as sock:  # each start a port of its own: a killed run's may still be held
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(processes: int, module: list[str], args: list[str]) -> list[str]:
    """`module` (`-m acc_clip.train`, or this script's probe) on one process, or under acc-clip launch."""
    if processes == 1:
        return [sys.executable, *module, *args]
    launch = ["--config_file", str(REPO / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(free_port())]
    return [sys.executable, "-m", "acc_clip.cli", "launch", *launch, *module, *args]


def start(cmd: list[str], log_file: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log_file, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env={**ENV, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)


def last_step(run_dir: Path) -> int:
    """Global steps logged (metrics.jsonl's last whole record + 1); a line torn by a kill is not one."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"]) + 1
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def training_begun(log_file: Path) -> bool:
    """Whether this start logged a step: metrics.jsonl is then rewound, its last record this start's."""
    return "Train Epoch:" in log_file.read_text(errors="replace")


def run_logged(log_file: Path) -> bool:
    """Whether the run logged its first line ("acc_clip run NAME: ..."): the trainer installs its stop handlers
    before it starts the run, and with several processes the line comes after all of them met."""
    return re.search(r"acc_clip run \S+: ", log_file.read_text(errors="replace")) is not None


def resumed_from(log_file: Path) -> int | None:
    found = re.search(r"resumed from \S+: .*global step (\d+)", log_file.read_text(errors="replace"))
    return int(found.group(1)) if found else None


def partial_saves(run_dir: Path) -> set[tuple[str, int, int]]:
    """The partial saves in the checkpoint folder, each as (name, inode, mtime): a save of the same step
    made again is another."""
    from acc_clip.checkpoint.folders import TMP_PREFIX

    found = set()
    for path in (run_dir / "checkpoints").glob(TMP_PREFIX + "*"):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            found.add((path.name, stat.st_ino, stat.st_mtime_ns))
    return found


def resume_point(run_dir: Path) -> int:
    """The global step `--resume latest` will go on from: the newest complete checkpoint, counting one that a
    kill left moved aside (the trainer puts it back)."""
    from acc_clip.checkpoint.folders import OLD_PREFIX, STEP_PREFIX, complete_checkpoints
    from acc_clip.io.sealed import MANIFEST

    folder = run_dir / "checkpoints"
    names = [Path(p).name for p in complete_checkpoints(str(folder))]
    if folder.is_dir():
        names += [p.name[len(OLD_PREFIX) :] for p in folder.glob(OLD_PREFIX + "*") if (p / MANIFEST).is_file()]
    return max((int(n[len(STEP_PREFIX) :]) for n in names), default=0)


# the uninterrupted run, and where the fault points fire -------------------------------------------------


def probe_train(out: str, flags: list[str]) -> int:
    """The trainer, recording each fault point it passes ("point step" lines in `out`): the modules that
    call fault_point import it by name, so it is replaced before they are imported."""
    if "acc_clip.checkpoint.folders" in sys.modules:
        raise RuntimeError("the fault points' callers were imported before the probe")
    original = faults.fault_point

    def recording(point: str, step: int) -> None:
        with open(out, "a") as file:
            file.write(f"{point} {step}\n")
        original(point, step)

    faults.fault_point = recording
    from acc_clip.cli import main as acc_clip_main

    return acc_clip_main(["train", *flags])


def run_reference(setup: Setup, data: Path, work: Path) -> Reference:
    probe_file, log_file = work / "fault_points.txt", work / "reference.log"
    args = [PROBE, str(probe_file), *soak_flags(setup, data, work, "reference")]
    module = [str(REPO / "tools" / "soak.py")] if setup.processes == 1 else ["-m", "soak"]
    began = time.monotonic()
    # Under the launcher the ranks run `-m soak`: this folder on their path.
    path = os.pathsep.join(p for p in (str(REPO / "tools"), os.environ.get("PYTHONPATH")) if p)
    process = start(command(setup.processes, module, args), log_file, env={"PYTHONPATH": path})
    first = None
    while process.poll() is None:
        if first is None and last_step(work / "reference") > 0:
            first = time.monotonic()
        time.sleep(0.02)
    wall = time.monotonic() - began
    if process.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {process.returncode}), see {log_file}")
    reached: dict[str, list[int]] = {point: [] for point in faults.POINTS}
    for line in probe_file.read_text().splitlines() if probe_file.exists() else []:
        point, step = line.split()
        reached.setdefault(point, []).append(int(step))
    startup = (first or began) - began
    return Reference(
        work / "reference",
        startup,
        (wall - startup) / setup.steps,
        wall,
        {point: sorted(set(steps)) for point, steps in reached.items()},
    )


# one start of the trainer, and its kill ------------------------------------------------------------------


class Trainer:
    """One start of the trainer: its processes, and how each kind of kill reaches them."""

    def __init__(self, setup: Setup, flags: list[str], run_dir: Path, log_file: Path, env: dict[str, str]):
        import psutil

        self.setup, self.run_dir, self.log_file = setup, run_dir, log_file
        self.partial_before = partial_saves(run_dir)
        self.began = time.monotonic()
        self.process = start(command(setup.processes, ["-m", "acc_clip.train"], flags), log_file, env)
        self.root = psutil.Process(self.process.pid)
        # Every process of the run seen (kept as psutil's objects: a pid reused later is not ours to end).
        self.seen: dict[int, psutil.Process] = {}
        self.timed_out = False

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def alive(self) -> bool:
        self._note_processes()
        return self.process.poll() is None

    def _note_processes(self) -> None:
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            self.seen.update((p.pid, p) for p in self.root.children(recursive=True))

    def send(self, kind: str, target: str) -> bool:
        """SIGTERM to the trainer or the launcher (which passes it on); SIGKILL to every process, or to one
        rank (once the launcher has started it). False when the run ended before anything was signalled."""
        import psutil

        if kind == "SIGTERM":
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
                return True
            return False
        tree = self.rank(target.split()[-1]) if target != "all" else self._tree()
        for each in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                each.kill()
        return bool(tree)

    def _tree(self) -> list:
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rank(self, rank: str) -> list:
        """The process of that rank, waited for while the launcher starts it; [] if the run ends first."""
        while self.alive():
            found = [p for p in self._tree() if _rank_of(p) == rank]
            if found:
                return found
            time.sleep(0.01)
        return []

    def wait(self) -> int:
        """The start's exit status; one that hangs past ATTEMPT_TIMEOUT_S is killed (and flagged)."""
        while self.alive():
            if self.elapsed() > ATTEMPT_TIMEOUT_S:
                self.timed_out = True
                self.send("SIGKILL", "all")
                break
            time.sleep(0.05)
        return self.process.wait()

    def leftovers(self) -> list[int]:
        """Processes of this start still running after it ended (they would hold the run's lock): ended here."""
        import psutil

        left = []
        for pid, child in self.seen.items():
            try:
                child.wait(timeout=30)
            except psutil.NoSuchProcess:
                continue
            except psutil.TimeoutExpired:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
                left.append(pid)
        return left


def _rank_of(process) -> str | None:
    try:
        return process.environ().get("RANK") if "acc_clip.train" in " ".join(process.cmdline()) else None
    except Exception:  # noqa: BLE001 - gone or not ours: not a rank to kill
        return None


def wait_for_moment(trainer: Trainer, kill: Kill, after_step: int, reference: Reference) -> bool:
    """Sleep until the kill's moment: its share of the start-up, or `after_step` logged plus its share of a
    step. False when the trainer ended first."""
    if kill.startup:
        deadline = trainer.began + kill.fraction * reference.startup_s
        while time.monotonic() < deadline:
            if not trainer.alive():
                return False
            time.sleep(0.005)
        return trainer.alive()
    while not (training_begun(trainer.log_file) and last_step(trainer.run_dir) >= after_step):
        if not trainer.alive():
            return False
        time.sleep(0.01)
    time.sleep(kill.fraction * reference.step_s)
    return trainer.alive()


def expected_statuses(kill: Kill, processes: int) -> set[int] | None:
    """The statuses a kill explains (None: any but 0). A SIGTERM before the stop handlers are in place ends a
    process as the default action does: the trainer or the launcher itself (-15), or, passed on by the
    launcher, ranks still importing (acc-clip launch reports 128 + 15, as a shell would)."""
    if kill.kind == "SIGTERM":
        return {PREEMPTED_EXIT_CODE, -signal.SIGTERM} | ({128 + signal.SIGTERM} if processes > 1 else set())
    if processes == 1 or (kill.kind == "SIGKILL" and kill.target == "all"):
        return {-signal.SIGKILL}
    return None  # one rank killed: the other fails in its next collective, the launcher reports either


def attempt_with_kill(setup: Setup, flags: list[str], work: Path, number: int, kill: Kill, ref: Reference) -> Attempt:
    """One start of the trainer and its kill; a kill with no step left for it starts nothing (status None)."""
    run_dir = work / "soak"
    resumed_at = resume_point(run_dir)
    record = Attempt(number, kill.describe(), kill.label)
    env: dict[str, str] = {}
    if kill.kind == "fault":
        if kill.step <= resumed_at:  # the run resumes past it: it would not be passed again
            record.moment, record.note = "not applied", f"the run resumes from step {resumed_at}"
            return record
        env, record.moment = faults.kill_at(kill.point or "", kill.step), f"{kill.point} at step {kill.step}"
    elif resumed_at >= setup.steps:
        record.moment, record.note = "not applied", f"no step left to train after step {resumed_at}"
        return record
    trainer = Trainer(setup, flags, run_dir, work / f"attempt_{number:02d}.log", env)
    if kill.kind != "fault":
        send_at_moment(trainer, kill, resumed_at, ref, record)
    finish(trainer, record)
    if kill.kind == "fault":
        record.sent_after_s = trainer.elapsed()  # the point killed it: its exit is the moment
    record.expected = record.expected and explained(kill, record, setup)
    return record


def explained(kill: Kill, record: Attempt, setup: Setup) -> bool:
    """Whether the start ended as its kill explains."""
    finished = record.status == 0 and record.last_step == setup.steps
    if record.moment == ENDED_FIRST:
        return finished  # the run got to its end before the kill's moment; anything else is a failure
    if kill.kind == "SIGTERM" and finished:
        return True  # after the last step the loop is over: the run ends as it would have
    if kill.kind == "SIGTERM" and record.handlers_ready:
        return record.status == PREEMPTED_EXIT_CODE  # a stop, from the start-up on, saves what there is and exits 75
    allowed = expected_statuses(kill, setup.processes)
    return record.status != 0 if allowed is None else record.status in allowed


def send_at_moment(trainer: Trainer, kill: Kill, resumed_at: int, ref: Reference, record: Attempt) -> None:
    """A signal kill: at its moment, on a step this start trains (after the checkpoint it resumes from)."""
    run_dir = trainer.run_dir
    after = max(kill.step, resumed_at + 1)
    if not wait_for_moment(trainer, kill, after, ref):
        record.moment = ENDED_FIRST
        return
    begun = training_begun(trainer.log_file)
    record.step_when_sent = last_step(run_dir) if begun else None
    record.handlers_ready = run_logged(trainer.log_file)
    if not trainer.send(kill.kind, kill.target):
        record.moment = ENDED_FIRST
        return
    record.sent_after_s = trainer.elapsed()
    record.moment = f"step {record.step_when_sent} logged" if begun else "start-up"
    if after != kill.step and not kill.startup:
        add_note(record, f"planned step {kill.step} <= the resume point {resumed_at}")


def add_note(record: Attempt, text: str) -> None:
    record.note = f"{record.note}; {text}" if record.note else text


def finish(trainer: Trainer, record: Attempt) -> None:
    """Wait for the trainer; what it ended with, and what it left behind."""
    run_dir = trainer.run_dir
    record.status = trainer.wait()
    if trainer.timed_out:
        record.expected = False
        add_note(record, f"hung: killed after {ATTEMPT_TIMEOUT_S} s")
    record.resumed_from = resumed_from(trainer.log_file)
    record.last_step = last_step(run_dir)
    partial = sorted(name for name, *_ in partial_saves(run_dir) - trainer.partial_before)
    if partial:  # the kill landed inside a save (or between a commit's renames): the next start cleans up
        add_note(record, f"left {', '.join(partial)}")
    left = trainer.leftovers()
    if left:
        record.expected = False
        add_note(record, f"processes {left} outlived the run")


def soak(setup: Setup, data: Path, work: Path, plan: list[Kill], ref: Reference) -> list[Attempt]:
    """Every kill of the plan, each on a start of its own; then starts without a kill until one exits 0."""
    flags = soak_flags(setup, data, work, "soak")
    attempts: list[Attempt] = []
    done = False
    for kill in plan:
        if done:
            attempts.append(Attempt(0, kill.describe(), kill.label, "not applied", note="the run had already finished"))
            continue
        number = 1 + sum(a.number > 0 for a in attempts)
        attempt = attempt_with_kill(setup, [*flags, *resume_flags(number)], work, number, kill, ref)
        if attempt.status is None:
            attempt.number = 0  # no start was needed
        attempts.append(attempt)
        done = attempt.status == 0
    for _ in range(2):  # a start without a kill must end the run; a second covers a kill that landed at its end
        if done:
            break
        number = 1 + sum(a.number > 0 for a in attempts)
        record = Attempt(number, "-", moment="none")
        log_file = work / f"attempt_{number:02d}.log"
        trainer = Trainer(setup, [*flags, *resume_flags(number)], work / "soak", log_file, {})
        finish(trainer, record)
        record.expected = record.expected and record.status == 0
        attempts.append(record)
        done = record.status == 0
    return attempts


def resume_flags(number: int) -> list[str]:
    return [] if number == 1 else ["--resume", "latest"]


# the comparison -------------------------------------------------------------------------------------------


def weight_files(run_dir: Path, steps: int) -> list[Path]:
    checkpoints = run_dir / "checkpoints"
    return [checkpoints / f"step_{steps:08d}" / "model.safetensors", *sorted(checkpoints.glob("epoch_*.pt"))]


def tensors(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def compare_weights(run_dir: Path, reference: Path, steps: int) -> tuple[bool, str]:
    """Every tensor of the final step checkpoint and of each epoch_N.pt, torch.equal to the reference's."""
    differing, compared = [], 0
    for wanted in weight_files(reference, steps):
        got = run_dir / wanted.relative_to(reference)
        if not got.exists():
            differing.append(f"{got.relative_to(run_dir)} missing")
            continue
        ours, theirs = tensors(got), tensors(wanted)
        compared += len(theirs)
        differing += [
            f"{wanted.name}:{key}" for key in theirs.keys() | ours.keys() if not _equal(ours.get(key), theirs.get(key))
        ]
    files = ", ".join(str(p.relative_to(reference / "checkpoints")) for p in weight_files(reference, steps))
    if differing:
        return False, f"{len(differing)} tensor(s) differ: {', '.join(sorted(differing)[:5])}"
    return True, f"{compared} tensors equal ({files})"


def _equal(a, b) -> bool:
    import torch

    return a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def compare_losses(run_dir: Path, reference: Path) -> tuple[bool, str]:
    """Each step once, with the reference's loss to the last bit."""
    try:
        steps = [r["step"] for r in records(run_dir, "metrics.jsonl")]
        differing = loss_differences(run_dir, reference)
    except json.JSONDecodeError as error:
        return False, f"metrics.jsonl holds a torn record ({error})"
    wanted = {r["step"] for r in records(reference, "metrics.jsonl")}
    twice = sorted({s for s in steps if steps.count(s) > 1})
    extra = sorted(set(steps) - wanted)
    problems = [f"{name}: {found[:8]}" for name, found in (("differ", differing), ("twice", twice), ("extra", extra))]
    if differing or twice or extra:
        return False, "steps " + "; ".join(p for p in problems if not p.endswith("[]"))
    return True, f"{len(wanted)} steps equal"


def compare_samples(run_dir: Path, reference: Path) -> tuple[bool, str]:
    """Every sample of every epoch trained as many times as in the reference."""
    try:
        differing = sample_count_differences(run_dir, reference)
    except json.JSONDecodeError as error:
        return False, f"samples.jsonl holds a torn record ({error})"
    trained = sum(len(r["indices"]) for r in records(reference, "samples.jsonl"))
    if differing:
        return False, f"{differing} sample-epoch count(s) differ (of {trained} samples trained)"
    return True, f"{trained} samples trained, each as often"


# the report -----------------------------------------------------------------------------------------------


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {gpu}; the runs use the CPU"


def kinds_count(attempts: list[Attempt]) -> dict[str, int]:
    """The kills applied, by kind (and target); then where they landed: in the start-up, or inside a save."""
    applied = [a for a in attempts if a.status is not None and a.planned != "-" and a.moment != ENDED_FIRST]
    counts = Counter(a.kind for a in sorted(applied, key=lambda a: a.kind))
    counts["landed in the start-up"] = sum(a.moment == "start-up" for a in applied)
    counts["left a partial save"] = sum("left .tmp-" in a.note for a in applied)
    return dict(counts)


def build_report(args, setup: Setup, ref: Reference, attempts: list[Attempt], checks: dict, wall_s: float) -> dict:
    passed = all(ok for ok, _ in checks.values())
    return {
        "command": "python tools/soak.py " + " ".join(args.argv),
        "machine": machine(),
        "setup": asdict(setup) | {"global_batch": GLOBAL_BATCH, "rows": setup.rows, "seed": args.seed},
        "reference": {
            "wall_s": round(ref.wall_s, 1),
            "startup_s": round(ref.startup_s, 2),
            "step_s": round(ref.step_s, 3),
            "fault_points_reached": ref.reached,
        },
        "kills_planned": args.kills,
        "kills_applied": kinds_count(attempts),
        "attempts": [asdict(a) for a in attempts],
        "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()},
        "wall_s": round(wall_s, 1),
        "result": "PASS" if passed else "FAIL",
    }


def markdown(report: dict) -> str:
    lines = [
        f"# Random-kill soak: {report['result']}",
        "",
        f"`{report['command']}`, on {report['machine']}; {report['wall_s']} s in all "
        f"(the uninterrupted run: {report['reference']['wall_s']} s).",
        "",
        f"Kills applied: {report['kills_applied']} (planned: {report['kills_planned']}).",
        "",
        "| # | attempt | planned | landed | sent at (s) | steps logged then | exit | explained | resumed from | "
        "steps logged at exit | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, a in enumerate(report["attempts"], 1):
        cells = [
            i,
            a["number"] or "-",
            a["planned"],
            a["moment"],
            "-" if a["sent_after_s"] is None else f"{a['sent_after_s']:.2f}",
            "-" if a["step_when_sent"] is None else a["step_when_sent"],
            "-" if a["status"] is None else a["status"],
            "yes" if a["expected"] else "NO",
            "-" if a["resumed_from"] is None else a["resumed_from"],
            a["last_step"],
            a["note"],
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "| check | passed | detail |", "| --- | --- | --- |"]
    for name, check in report["checks"].items():
        lines.append(f"| {name} | {'yes' if check['ok'] else 'NO'} | {check['detail']} |")
    return "\n".join(lines) + f"\n\n{report['result']}\n"


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n" if path.suffix == ".json" else markdown(report))


# the command ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills to plan (default 20)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of the run (default 60)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs the steps span (default 2)")
    parser.add_argument("--processes", type=int, choices=(1, 2), default=1)
    parser.add_argument("--data", choices=("csv", "shards"), default="csv")
    parser.add_argument("--seed", type=int, default=0, help="the plan's seed: the same seed, the same kills")
    parser.add_argument("--save-every", type=int, default=3, help="--save-every-n-steps (default 3)")
    parser.add_argument("--keep", type=int, default=3, help="--keep-checkpoints (default 3)")
    parser.add_argument(
        "--trainer-flags", default="", help='more trainer flags (both runs), one string: --trainer-flags="--async-save"'
    )
    parser.add_argument("--work", help="a new or empty folder for the runs (default: a temporary one, removed on PASS)")
    parser.add_argument("--report", type=Path, help="also write the report here: JSON for .json, else markdown")
    args = parser.parse_args(argv)
    if args.steps % args.epochs or args.steps < 2 * args.epochs or args.kills < 0:
        parser.error("--steps must be a multiple of --epochs, 2 steps an epoch at least; --kills 0 or more")
    args.argv = argv
    return args


def prepare_work(folder: str | None) -> Path:
    work = Path(folder or tempfile.mkdtemp(prefix="acc_clip_soak_"))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work}: not empty; the soak needs a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    return work


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [PROBE]:
        return probe_train(argv[1], argv[2:])
    args = parse_args(argv)
    extra = tuple(shlex.split(args.trainer_flags))
    setup = Setup(args.steps, args.epochs, args.processes, args.data, args.save_every, args.keep, extra)
    work = prepare_work(args.work)
    began = time.monotonic()
    data = make_train_data(work / "data", setup)
    ref = run_reference(setup, data, work)
    plan = plan_kills(args.seed, args.kills, setup.steps, setup.processes, ref.reached)
    attempts = soak(setup, data, work, plan, ref)
    run_dir = work / "soak"
    checks = {
        "final weights": compare_weights(run_dir, ref.run_dir, setup.steps),
        "losses": compare_losses(run_dir, ref.run_dir),
        "sample counts": compare_samples(run_dir, ref.run_dir),
        "exit statuses": _statuses(attempts),
    }
    report = build_report(args, setup, ref, attempts, checks, time.monotonic() - began)
    print(markdown(report))
    if args.report:
        write_report(report, args.report)
    if report["result"] == "PASS" and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"runs and each start's log (attempt_NN.log) kept in {work}")
    return 0 if report["result"] == "PASS" else 1


def _statuses(attempts: list[Attempt]) -> tuple[bool, str]:
    """Each start ended as its kill explains, and the last one with 0."""
    odd = [a.number for a in attempts if a.status is not None and not a.expected]
    ended = [a for a in attempts if a.status is not None]
    if not ended or ended[-1].status != 0:
        return False, "the run never ended with 0"
    if odd:
        return False, f"attempt(s) {odd} ended as their kill does not explain"
    return True, f"{len(ended)} starts, each ended as its kill explains, the last with 0"


if __name__ == "__main__":
    sys.exit(main())

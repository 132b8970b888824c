"""Read a training loss curve from any of the logs we compare: acc_clip's `metrics.jsonl`,
open_clip_train's `out.log`, the vendor's `TCAPPDLL` console log, or a plain list of floats.

The format is detected from the content, not the file name. Formats that carry a global optimizer
step give `LossCurve.steps`; the others give `steps=None` and are compared by position, as the
vendor's check did. When a step is logged twice (a run that crashed and was resumed appends to
its log), the last record of that step wins.

Vendor log assumption: a loss line contains `train.loss : <float>` (spaces around the colon
optional, case-insensitive; `train.loss_avg` is a running average and is not read). Steps come
from a `step : <int>` / `global_step : <int>` field; failing that, from `Iteration: <int>` /
`iter : <int>` when those only ever increase (a global counter, not one restarting each epoch);
otherwise the curve has no steps.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from acc_clip.errors import DataError, UsageError
from acc_clip.runtime.run_dir import LOG_FILE, METRICS_FILE

FORMAT_METRICS = "acc_clip metrics.jsonl"
FORMAT_OPEN_CLIP = "open_clip out.log"
FORMAT_VENDOR = "vendor TCAPPDLL log"
FORMAT_PLAIN = "plain float per line"

EXPECTED_FORMATS = (
    f"expected acc_clip {METRICS_FILE}, open_clip {LOG_FILE} ('Train Epoch: ... Loss: ...' lines), "
    "a vendor log ('train.loss : <float>' lines) or one float per line"
)

_FLOAT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?nan|[+-]?inf"

# open_clip_train.train.train_one_epoch: "Train Epoch: {epoch} [{num_samples}/{samples_per_epoch} ({percent}%)] ...
# Loss: {val} ({avg})". `Loss:` must not be the tail of another loss name such as `Contrastive_loss:`.
_OPEN_CLIP_TRAIN = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \((\d+)%\)\]")
_OPEN_CLIP_LOSS = re.compile(rf"(?<![\w])Loss: ({_FLOAT}) \(")

_VENDOR_LOSS = re.compile(rf"(?<![\w.])train\.loss\s*:\s*({_FLOAT})", re.IGNORECASE)
_VENDOR_STEP = re.compile(r"(?<![\w.])(?:global_step|step)\s*:\s*(\d+)", re.IGNORECASE)
_VENDOR_ITERATION = re.compile(r"(?<![\w.])(?:iteration|iter)\s*:\s*(\d+)", re.IGNORECASE)


@dataclass
class LossCurve:
    steps: list[int] | None  # global optimizer step of each loss, ascending; None: only the order is known
    losses: list[float]
    source_format: str


def resolve_log_path(path: str | Path) -> Path:
    """A log file as given, or the run folder's metrics.jsonl, else its open_clip out.log."""
    path = Path(path)
    if path.is_dir():
        for name in (METRICS_FILE, LOG_FILE):
            if (path / name).is_file():
                return path / name
        raise DataError(f"{path}: run folder holds neither {METRICS_FILE} nor {LOG_FILE}")
    if not path.is_file():
        raise UsageError(f"{path}: no such file or run folder")
    return path


def read_loss_curve(path: str | Path) -> LossCurve:
    """The loss curve of one log file or run folder, its format detected from the content."""
    path = resolve_log_path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    if not first:
        raise DataError(f"{path}: empty file; {EXPECTED_FORMATS}")
    if first.startswith("{"):
        records = read_metrics(path)
        return LossCurve(
            steps=[r["step"] for r in records], losses=[float(r["loss"]) for r in records], source_format=FORMAT_METRICS
        )
    if any(_OPEN_CLIP_TRAIN.search(line) for line in lines):
        return _parse_open_clip_log(path, lines)
    if any(_VENDOR_LOSS.search(line) for line in lines):
        return _parse_vendor_log(lines)
    plain = _parse_plain_floats(lines)
    if plain is not None:
        return plain
    raise DataError(f"{path}: no loss values recognised; {EXPECTED_FORMATS}")


def read_metrics(path: str | Path) -> list[dict]:
    """The train records of an acc_clip metrics.jsonl (or run folder), one per step, ascending.

    Records of other kinds (`"kind": "eval"`) are dropped; for a step logged twice (appended after a
    resume) the last record wins. A final line without a newline is a write torn by a crash and is skipped.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / METRICS_FILE).is_file():
            raise DataError(f"{path}: run folder has no {METRICS_FILE}")
        path = path / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{path}: no such metrics file")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")  # the element after the last "\n" is "" unless the final write was torn
    by_step: dict[int, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise DataError(f"{path}:{number}: not a JSON object; expected one metrics record per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: not a JSON object; expected one metrics record per line")
        if record.get("kind", "train") != "train":
            continue
        for key in ("step", "loss"):
            if key not in record:
                raise DataError(f"{path}:{number}: train record has no {key!r} key")
        if not isinstance(record["step"], int) or isinstance(record["step"], bool):
            raise DataError(f"{path}:{number}: 'step' is {record['step']!r}, expected an integer")
        by_step[record["step"]] = record
    if not by_step:
        raise DataError(f'{path}: no train records; expected lines like {{"step": 0, "loss": 4.1, ...}}')
    return [by_step[step] for step in sorted(by_step)]


def _last_per_step(steps: list[int], losses: list[float]) -> tuple[list[int], list[float]]:
    by_step = dict(zip(steps, losses))  # later entries overwrite earlier ones
    ordered = sorted(by_step)
    return ordered, [by_step[s] for s in ordered]


def _parse_open_clip_log(path: Path, lines: list[str]) -> LossCurve:
    """Global steps from open_clip's progress lines.

    open_clip logs a line when `i_accum % log_every_n_steps == 0` and at the epoch's last batch,
    reporting `num_samples = batch_count * global_batch`. So the first line of an epoch (batch 1)
    gives the global batch, the last line of a completed epoch gives batches per epoch, and
    step = epoch * batches_per_epoch + batch_count - 1.
    """
    entries = []  # (line number, epoch, num_samples, percent text, loss)
    for number, line in enumerate(lines, start=1):
        progress = _OPEN_CLIP_TRAIN.search(line)
        if not progress:
            continue
        loss = _OPEN_CLIP_LOSS.search(line)
        if not loss:
            raise DataError(f"{path}:{number}: open_clip train line has no 'Loss: <value> (<avg>)'")
        entries.append(
            (number, int(progress.group(1)), int(progress.group(2)), progress.group(4), float(loss.group(1)))
        )

    # A new epoch begins at the first line and wherever the epoch number changes (a resumed log may repeat one).
    starts = [k for k in range(len(entries)) if k == 0 or entries[k][1] != entries[k - 1][1]]
    global_batches = {entries[k][2] for k in starts}
    if len(global_batches) != 1:
        raise DataError(
            f"{path}: first lines of the epochs report different sample counts {sorted(global_batches)}; "
            "expected one per-step global batch"
        )
    global_batch = global_batches.pop()

    batch_counts = []
    for number, _, num_samples, _, _ in entries:
        if num_samples % global_batch:
            raise DataError(
                f"{path}:{number}: sample count {num_samples} is not a multiple of the per-step batch {global_batch}"
            )
        batch_counts.append(num_samples // global_batch)

    # The last line of an epoch that was followed by another one, or that reads 100%, is its last batch.
    ends = [k - 1 for k in starts[1:] if entries[k - 1][1] < entries[k][1]]
    if entries[-1][3] == "100":
        ends.append(len(entries) - 1)
    per_epoch = {batch_counts[k] for k in ends}
    if len(per_epoch) > 1:
        raise DataError(f"{path}: completed epochs have different batch counts {sorted(per_epoch)}")
    if not per_epoch and any(e[1] > 0 for e in entries):
        raise DataError(f"{path}: no completed epoch in the log, so the steps of epochs after 0 cannot be derived")
    batches_per_epoch = per_epoch.pop() if per_epoch else 0

    steps = []
    for (number, epoch, _, percent, _), batch_count in zip(entries, batch_counts):
        if batches_per_epoch and f"{100.0 * batch_count / batches_per_epoch:.0f}" != percent:
            raise DataError(
                f"{path}:{number}: {percent}% does not match batch {batch_count} of {batches_per_epoch}; "
                "cannot derive the global step"
            )
        steps.append(epoch * batches_per_epoch + batch_count - 1)
    steps, losses = _last_per_step(steps, [e[4] for e in entries])
    return LossCurve(steps=steps, losses=losses, source_format=FORMAT_OPEN_CLIP)


def _parse_vendor_log(lines: list[str]) -> LossCurve:
    losses: list[float] = []
    explicit_steps: list[int | None] = []
    iterations: list[int | None] = []
    for line in lines:
        loss = _VENDOR_LOSS.search(line)
        if not loss:
            continue
        losses.append(float(loss.group(1)))
        step = _VENDOR_STEP.search(line)
        iteration = _VENDOR_ITERATION.search(line)
        explicit_steps.append(int(step.group(1)) if step else None)
        iterations.append(int(iteration.group(1)) if iteration else None)

    if None not in explicit_steps:
        steps, losses = _last_per_step(explicit_steps, losses)  # type: ignore[arg-type]
        return LossCurve(steps=steps, losses=losses, source_format=FORMAT_VENDOR)
    if None not in iterations:
        counters = cast(list[int], iterations)
        if all(a < b for a, b in itertools.pairwise(counters)):  # a global counter
            return LossCurve(steps=counters, losses=losses, source_format=FORMAT_VENDOR)
    return LossCurve(steps=None, losses=losses, source_format=FORMAT_VENDOR)


def _parse_plain_floats(lines: list[str]) -> LossCurve | None:
    losses = []
    for line in lines:
        if not line.strip():
            continue
        try:
            losses.append(float(line))
        except ValueError:
            return None
    return LossCurve(steps=None, losses=losses, source_format=FORMAT_PLAIN)


def ema_smooth(values: list[float], ema: float) -> list[float]:
    """Exponential moving average: s_0 = x_0, s_t = ema * s_{t-1} + (1 - ema) * x_t."""
    if not 0.0 <= ema < 1.0:
        raise UsageError(f"--ema {ema}: expected a smoothing factor in [0, 1)")
    smoothed: list[float] = []
    for value in values:
        smoothed.append(value if not smoothed else ema * smoothed[-1] + (1.0 - ema) * value)
    return smoothed

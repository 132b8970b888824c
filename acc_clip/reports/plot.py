"""`acc-clip plot RUN_DIR [RUN_DIR ...] --out loss.png`: loss, learning rate and throughput of
one or more runs, against the global step, from each run's metrics.jsonl.

The loss panel draws each run's raw loss light and thin under its EMA-smoothed loss, bold; only
the smoothed line carries the run's name, so every panel's legend has one entry per run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from acc_clip.errors import DataError, ResourceError, UsageError
from acc_clip.reports.curves import ema_smooth, read_metrics
from acc_clip.runtime.run_dir import METRICS_FILE


def run_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name, or the path as given when two runs share a folder name."""
    names = [Path(d).name or str(d) for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in run_dirs]


def _series(records: list[dict], key: str, run_dir: str | Path) -> list[float]:
    for record in records:
        if key not in record:
            raise DataError(f"{Path(run_dir) / METRICS_FILE}: train record of step {record['step']} has no {key!r}")
    return [float(record[key]) for record in records]


def plot_runs(run_dirs: Sequence[str | Path], out_path: str | Path, ema: float = 0.9) -> Figure:
    """Draw the runs into one three-panel figure, save it as `out_path` and return it."""
    if not run_dirs:
        raise UsageError("no run folder given; expected one or more RUN_DIR holding metrics.jsonl")
    for run_dir in run_dirs:
        if not (Path(run_dir) / METRICS_FILE).is_file():
            raise UsageError(f"{run_dir}: not a run folder holding {METRICS_FILE}")

    figure = Figure(figsize=(10, 11))
    FigureCanvasAgg(figure)
    loss_axes, lr_axes, speed_axes = figure.subplots(3, 1, sharex=True)
    for index, (run_dir, name) in enumerate(zip(run_dirs, run_names(run_dirs))):
        records = read_metrics(Path(run_dir) / METRICS_FILE)
        steps = [record["step"] for record in records]
        losses = _series(records, "loss", run_dir)
        color = f"C{index % 10}"
        # A leading underscore keeps the raw line out of the legend.
        loss_axes.plot(steps, losses, color=color, linewidth=0.7, alpha=0.35, label=f"_{name} raw")
        loss_axes.plot(steps, ema_smooth(losses, ema), color=color, linewidth=2.0, label=name)
        lr_axes.plot(steps, _series(records, "lr", run_dir), color=color, label=name)
        speed_axes.plot(steps, _series(records, "samples_per_second", run_dir), color=color, label=name)

    panels = (
        (loss_axes, f"Training loss (raw, and EMA {ema})", "loss"),
        (lr_axes, "Learning rate", "learning rate"),
        (speed_axes, "Throughput", "samples / s"),
    )
    for axes, title, ylabel in panels:
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.tick_params(labelbottom=True)  # sharex hides the upper panels' step ticks otherwise
        axes.grid(alpha=0.3)
        axes.legend()
    return save_figure(figure, out_path, "--out")


def save_figure(figure, out_path, flag: str):
    """Lay out and write `figure`; a path that cannot be written is one error naming `flag`."""
    figure.tight_layout()
    try:
        figure.savefig(out_path)
    except (OSError, ValueError) as error:
        raise ResourceError(f"{flag} {out_path}: cannot write the figure ({error})") from error
    return figure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acc-clip plot", description="Plot loss, learning rate and samples/s of runs against the step."
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder holding metrics.jsonl")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="image to write")
    parser.add_argument("--ema", type=float, default=0.9, help="EMA smoothing factor for the bold loss lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plot_runs(args.run_dirs, args.out, ema=args.ema)
    print(f"wrote {args.out}")
    return 0

"""`acc-clip compare-loss REF NEW`: the vendor's loss-curve acceptance check, plus the two-sided
check it lacks.

The vendor's rule averages *signed* errors, `mean((new - ref) / ref) <= 0.05 or mean(new - ref) <= 0.0002`,
so any curve below the reference passes, however far below. We print the vendor's lines unchanged
(people grep them) and add the mean of |new - ref| / |ref| on raw and EMA-smoothed curves. The
comparison passes only when the vendor rule passes AND the smoothed two-sided error is within tolerance.

Relative errors skip points where the reference loss is exactly 0 (no relative error is defined there).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from acc_clip.errors import DataError, UsageError
from acc_clip.reports.curves import LossCurve, ema_smooth, read_loss_curve
from acc_clip.reports.plot import save_figure

VENDOR_RELATIVE_LIMIT = 0.05
VENDOR_ABSOLUTE_LIMIT = 0.0002

ALIGNED_BY_STEP = "step"
ALIGNED_BY_POSITION = "position"


@dataclass
class ComparisonResult:
    aligned_by: str  # ALIGNED_BY_STEP: common steps; ALIGNED_BY_POSITION: both truncated to the shorter
    x: list[int]  # the common steps, or positions 0..n-1
    ref_losses: list[float]
    new_losses: list[float]
    ref_smoothed: list[float]
    new_smoothed: list[float]
    # The vendor's signed means and rule.
    vendor_mean_relative_error: float  # nan when every reference loss is 0
    vendor_mean_absolute_error: float
    vendor_rule: str  # the vendor's "Rule," line: whichever signed mean is smaller
    vendor_passed: bool
    # Two-sided checks.
    mean_abs_relative_error: float
    ema_mean_abs_relative_error: float
    max_abs_difference: float
    ema: float
    tolerance: float
    two_sided_passed: bool
    passed: bool

    @property
    def num_points(self) -> int:
        return len(self.x)


def align_curves(ref: LossCurve, new: LossCurve) -> tuple[str, list[int], list[float], list[float]]:
    """By common step when both curves know their steps, else truncated to the shorter (the vendor's way)."""
    if ref.steps is not None and new.steps is not None:
        ref_by_step = dict(zip(ref.steps, ref.losses))
        new_by_step = dict(zip(new.steps, new.losses))
        common = sorted(ref_by_step.keys() & new_by_step.keys())
        return ALIGNED_BY_STEP, common, [ref_by_step[s] for s in common], [new_by_step[s] for s in common]
    n = min(len(ref.losses), len(new.losses))
    return ALIGNED_BY_POSITION, list(range(n)), ref.losses[:n], new.losses[:n]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _relative_errors(ref: list[float], new: list[float], two_sided: bool) -> list[float]:
    if two_sided:
        return [abs(n - r) / abs(r) for r, n in zip(ref, new) if r != 0]
    return [(n - r) / r for r, n in zip(ref, new) if r != 0]


def compare_curves(ref: LossCurve, new: LossCurve, ema: float = 0.9, tolerance: float = 0.05) -> ComparisonResult:
    if not tolerance >= 0.0:
        raise UsageError(f"--tolerance {tolerance}: expected a non-negative relative error")
    aligned_by, x, ref_losses, new_losses = align_curves(ref, new)
    if not x:
        what = "no step in common" if aligned_by == ALIGNED_BY_STEP else "an empty curve"
        raise DataError(f"nothing to compare: the reference and new curves have {what}")

    vendor_mre = _mean(_relative_errors(ref_losses, new_losses, two_sided=False))
    vendor_mae = _mean([n - r for r, n in zip(ref_losses, new_losses)])
    mre_defined = not math.isnan(vendor_mre)
    vendor_rule = "mean_relative_error" if mre_defined and vendor_mre <= vendor_mae else "mean_absolute_error"
    vendor_passed = (mre_defined and vendor_mre <= VENDOR_RELATIVE_LIMIT) or vendor_mae <= VENDOR_ABSOLUTE_LIMIT

    ref_smoothed = ema_smooth(ref_losses, ema)
    new_smoothed = ema_smooth(new_losses, ema)
    ema_mre = _mean(_relative_errors(ref_smoothed, new_smoothed, two_sided=True))
    two_sided_passed = ema_mre <= tolerance  # False for nan
    return ComparisonResult(
        aligned_by=aligned_by,
        x=x,
        ref_losses=ref_losses,
        new_losses=new_losses,
        ref_smoothed=ref_smoothed,
        new_smoothed=new_smoothed,
        vendor_mean_relative_error=vendor_mre,
        vendor_mean_absolute_error=vendor_mae,
        vendor_rule=vendor_rule,
        vendor_passed=vendor_passed,
        mean_abs_relative_error=_mean(_relative_errors(ref_losses, new_losses, two_sided=True)),
        ema_mean_abs_relative_error=ema_mre,
        max_abs_difference=max(abs(n - r) for r, n in zip(ref_losses, new_losses)),
        ema=ema,
        tolerance=tolerance,
        two_sided_passed=two_sided_passed,
        passed=vendor_passed and two_sided_passed,
    )


def vendor_report_lines(result: ComparisonResult) -> list[str]:
    """The vendor script's four lines, character for character."""
    mean_relative_error = result.vendor_mean_relative_error
    mean_absolute_error = result.vendor_mean_absolute_error
    rule_value = mean_relative_error if result.vendor_rule == "mean_relative_error" else mean_absolute_error
    verdict, comparison = ("pass", "<=") if result.vendor_passed else ("fail", ">")
    return [
        f"MeanRelativeError: {mean_relative_error}",
        f"MeanAbsoluteError: {mean_absolute_error}",
        f"Rule,{result.vendor_rule} {rule_value}",
        f"{verdict} {mean_relative_error=} {comparison} {VENDOR_RELATIVE_LIMIT} "
        f"or {mean_absolute_error=} {comparison} {VENDOR_ABSOLUTE_LIMIT}",
    ]


def two_sided_report_lines(result: ComparisonResult) -> list[str]:
    verdict = "pass" if result.two_sided_passed else "fail"
    comparison = "<=" if result.two_sided_passed else ">"
    return [
        f"AlignedPoints: {result.num_points} (by {result.aligned_by})",
        f"TwoSidedMeanRelativeError: {result.mean_abs_relative_error}",
        f"TwoSidedMeanRelativeErrorEMA({result.ema}): {result.ema_mean_abs_relative_error}",
        f"MaxAbsoluteDifference: {result.max_abs_difference}",
        f"{verdict} two_sided_ema_mean_relative_error={result.ema_mean_abs_relative_error} "
        f"{comparison} {result.tolerance}",
        f"RESULT: {'PASS' if result.passed else 'FAIL'} (vendor rule {'pass' if result.vendor_passed else 'fail'}, "
        f"two-sided {verdict})",
    ]


def plot_comparison(result: ComparisonResult, ref_label: str, new_label: str, out_path: str | Path):
    """Both curves against step (raw thin, EMA thick); returns the saved matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for color, label, raw, smoothed in (
        ("C0", ref_label, result.ref_losses, result.ref_smoothed),
        ("C1", new_label, result.new_losses, result.new_smoothed),
    ):
        axes.plot(result.x, raw, color=color, linewidth=0.7, alpha=0.4, label="_nolegend_")
        axes.plot(result.x, smoothed, color=color, linewidth=2.0, label=f"{label} (EMA {result.ema})")
    axes.set_xlabel("step" if result.aligned_by == ALIGNED_BY_STEP else "logged point (position)")
    axes.set_ylabel("loss")
    axes.set_title(
        f"{'PASS' if result.passed else 'FAIL'}: two-sided EMA mean relative error "
        f"{result.ema_mean_abs_relative_error:.4f} (tolerance {result.tolerance})"
    )
    axes.legend()
    return save_figure(figure, out_path, "--plot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acc-clip compare-loss",
        description="Compare a new loss curve with a reference: the vendor's one-sided rule and a two-sided check.",
    )
    parser.add_argument("ref", help="reference log: metrics.jsonl, open_clip out.log, vendor log, run folder")
    parser.add_argument("new", help="new log, same formats")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw both curves into this image")
    parser.add_argument("--ema", type=float, default=0.9, help="EMA smoothing factor for the two-sided check")
    parser.add_argument("--tolerance", type=float, default=0.05, help="limit on the two-sided EMA mean relative error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when the comparison passes, 1 when it fails (bad input raises an AccClipError)."""
    args = build_parser().parse_args(argv)
    result = compare_curves(
        read_loss_curve(args.ref), read_loss_curve(args.new), ema=args.ema, tolerance=args.tolerance
    )
    for line in vendor_report_lines(result) + two_sided_report_lines(result):
        print(line)
    if args.plot:
        plot_comparison(result, args.ref, args.new, args.plot)
        print(f"Plot: {args.plot}")
    return 0 if result.passed else 1

"""The loss-curve check: the vendor's one-sided rule, reproduced, and the two-sided check that fixes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from acc_clip import cli
from acc_clip.errors import AccClipError, ResourceError
from acc_clip.reports.compare_loss import ALIGNED_BY_POSITION, ALIGNED_BY_STEP, compare_curves
from acc_clip.reports.curves import LossCurve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decaying_losses(n: int) -> list[float]:
    return [2.0 + 3.0 * math.exp(-step / 10.0) + 0.05 * math.sin(step) for step in range(n)]


def curve(losses: list[float], steps: list[int] | None = None) -> LossCurve:
    return LossCurve(steps=steps, losses=losses, source_format="test")


def write_metrics(path: Path, steps: list[int], losses: list[float]) -> Path:
    path.write_text("".join(json.dumps({"step": s, "epoch": 0, "loss": v}) + "\n" for s, v in zip(steps, losses)))
    return path


def write_floats(path: Path, losses: list[float]) -> Path:
    path.write_text("".join(f"{v!r}\n" for v in losses))
    return path


REF = decaying_losses(50)


def test_identical_curves_pass_with_zero_errors():
    result = compare_curves(curve(REF), curve(list(REF)))
    assert result.passed and result.vendor_passed and result.two_sided_passed
    assert result.vendor_mean_relative_error == 0.0
    assert result.vendor_mean_absolute_error == 0.0
    assert result.mean_abs_relative_error == 0.0
    assert result.ema_mean_abs_relative_error == 0.0
    assert result.max_abs_difference == 0.0
    assert result.num_points == len(REF)


def test_curve_10_percent_below_passes_the_vendor_rule_but_fails_the_two_sided_check():
    result = compare_curves(curve(REF), curve([0.9 * v for v in REF]))
    assert result.vendor_mean_relative_error == pytest.approx(-0.1)
    assert result.vendor_passed  # the vendor's defect: any lower curve passes
    assert result.mean_abs_relative_error == pytest.approx(0.1)
    assert result.ema_mean_abs_relative_error == pytest.approx(0.1)
    assert not result.two_sided_passed
    assert not result.passed


def test_curve_10_percent_above_fails_both():
    result = compare_curves(curve(REF), curve([1.1 * v for v in REF]))
    assert result.vendor_mean_relative_error == pytest.approx(0.1)
    assert result.vendor_mean_absolute_error == pytest.approx(0.1 * sum(REF) / len(REF))
    assert not result.vendor_passed
    assert not result.two_sided_passed
    assert not result.passed
    assert result.max_abs_difference == pytest.approx(0.1 * max(REF))


def test_noise_that_averages_out_passes_on_the_smoothed_curve_only_within_tolerance():
    wiggle = [v * (1.08 if step % 2 else 0.92) for step, v in enumerate(REF)]  # +-8% each step
    result = compare_curves(curve(REF), curve(wiggle), ema=0.9, tolerance=0.05)
    assert result.mean_abs_relative_error == pytest.approx(0.08)
    assert result.ema_mean_abs_relative_error < 0.05  # smoothing cancels the alternating error
    assert result.passed
    assert not compare_curves(curve(REF), curve(wiggle), ema=0.0, tolerance=0.05).passed  # no smoothing


def test_curves_with_steps_are_aligned_on_the_common_steps():
    ref_steps = list(range(10))
    new_steps = [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]  # the new run skipped steps 3-4 and ran longer
    ref = curve([float(10 + s) for s in ref_steps], ref_steps)
    new = curve([float(10 + s) for s in new_steps], new_steps)
    result = compare_curves(ref, new)
    assert result.aligned_by == ALIGNED_BY_STEP
    assert result.x == [0, 1, 2, 5, 6, 7, 8, 9]
    assert result.max_abs_difference == 0.0  # truncation by position would pair step 3 with step 5
    assert result.passed

    by_position = compare_curves(curve(ref.losses), curve(new.losses))
    assert by_position.aligned_by == ALIGNED_BY_POSITION
    assert by_position.num_points == 10
    assert by_position.max_abs_difference == 2.0


def test_no_common_step_is_an_error():
    with pytest.raises(AccClipError, match="no step in common"):
        compare_curves(curve([1.0, 2.0], [0, 1]), curve([1.0, 2.0], [5, 6]))


def test_cli_prints_the_vendor_lines_then_the_two_sided_ones(tmp_path, capsys):
    ref = write_floats(tmp_path / "ref.txt", REF)
    new = write_floats(tmp_path / "new.txt", [0.9 * v for v in REF])
    assert cli.main(["compare-loss", str(ref), str(new)]) == 1
    lines = capsys.readouterr().out.splitlines()

    result = compare_curves(curve(REF), curve([0.9 * v for v in REF]))
    mre, mae = result.vendor_mean_relative_error, result.vendor_mean_absolute_error
    assert mae < mre  # so the vendor's rule line names the absolute error
    assert lines[:4] == [
        f"MeanRelativeError: {mre}",
        f"MeanAbsoluteError: {mae}",
        f"Rule,mean_absolute_error {mae}",
        f"pass mean_relative_error={mre} <= 0.05 or mean_absolute_error={mae} <= 0.0002",
    ]
    rest = "\n".join(lines[4:])
    assert f"AlignedPoints: {len(REF)} (by position)" in rest
    assert f"TwoSidedMeanRelativeErrorEMA(0.9): {result.ema_mean_abs_relative_error}" in rest
    assert "RESULT: FAIL" in rest


def test_cli_vendor_fail_line_and_exit_codes(tmp_path, capsys):
    steps = list(range(len(REF)))
    ref = write_metrics(tmp_path / "ref.jsonl", steps, REF)
    same = write_metrics(tmp_path / "same.jsonl", steps, REF)
    higher = write_metrics(tmp_path / "higher.jsonl", steps, [1.1 * v for v in REF])

    assert cli.main(["compare-loss", str(ref), str(same)]) == 0
    assert "RESULT: PASS" in capsys.readouterr().out

    assert cli.main(["compare-loss", str(ref), str(higher)]) == 1
    out = capsys.readouterr().out
    assert "\nfail mean_relative_error=" in out and "> 0.05 or mean_absolute_error=" in out
    assert "(by step)" in out

    assert cli.main(["compare-loss", str(ref), str(tmp_path / "missing.log")]) == 2
    assert "missing.log" in capsys.readouterr().err

    assert cli.main(["compare-loss", str(ref), str(same), "--ema", "1.5"]) == 2
    assert "--ema 1.5" in capsys.readouterr().err


def test_cli_tolerance_flag_moves_the_two_sided_limit(tmp_path, capsys):
    ref = write_floats(tmp_path / "ref.txt", REF)
    lower = write_floats(tmp_path / "lower.txt", [0.9 * v for v in REF])
    assert cli.main(["compare-loss", str(ref), str(lower), "--tolerance", "0.11"]) == 0
    assert cli.main(["compare-loss", str(ref), str(lower), "--tolerance", "0.09"]) == 1


def test_cli_plot_writes_a_readable_png(tmp_path, capsys):
    ref = write_floats(tmp_path / "ref.txt", REF)
    new = write_floats(tmp_path / "new.txt", [1.01 * v for v in REF])
    out = tmp_path / "compare.png"
    assert cli.main(["compare-loss", str(ref), str(new), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn

    # A figure that cannot be written is a failed save (ResourceError, 5; was the one status 2 before error kinds).
    assert (
        cli.main(["compare-loss", str(ref), str(new), "--plot", str(tmp_path / "no_dir" / "x.png")])
        == ResourceError.exit_status
        == 5
    )
    assert "--plot" in capsys.readouterr().err

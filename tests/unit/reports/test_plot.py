"""The run plotter: three labelled panels, one legend entry per run per panel, a valid PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from acc_clip import cli
from acc_clip.errors import AccClipError
from acc_clip.reports.curves import ema_smooth
from acc_clip.reports.plot import plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, num_steps: int, scale: float) -> Path:
    run = root / name
    run.mkdir()
    lines = []
    for step in range(num_steps):
        record = {
            "step": step,
            "epoch": step // 10,
            "loss": scale * (5.0 - 0.1 * step) + 0.2 * (step % 3),
            "lr": 1e-3 * min(1.0, (step + 1) / 5),
            "logit_scale": 14.3,
            "samples_per_second": 100.0 * scale + step,
            "data_time": 0.01,
            "batch_time": 0.1,
            "samples_seen": 8 * (step + 1),
        }
        lines.append(json.dumps(record))
        if step == 4:
            lines.append(json.dumps({"kind": "eval", "step": step, "epoch": 0, "loss": 99.0}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    return [make_run(tmp_path, "cuda_run", 30, 1.0), make_run(tmp_path, "sdaa_run", 25, 1.05)]


def test_plot_two_runs_writes_png_with_labelled_panels_and_one_legend_entry_per_run(two_runs, tmp_path):
    out = tmp_path / "loss.png"
    figure = plot_runs(two_runs, out, ema=0.8)

    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(out).ndim == 3

    panels = figure.get_axes()
    assert len(panels) == 3
    for axes in panels:
        assert axes.get_xlabel() and axes.get_ylabel() and axes.get_title()
        assert [text.get_text() for text in axes.get_legend().get_texts()] == ["cuda_run", "sdaa_run"]


def test_plot_loss_panel_holds_raw_and_smoothed_loss_per_run(two_runs, tmp_path):
    figure = plot_runs(two_runs, tmp_path / "loss.png", ema=0.8)
    loss_panel = figure.get_axes()[0]
    lines = loss_panel.get_lines()
    assert len(lines) == 4  # raw + smoothed for each run
    records = [json.loads(line) for line in (two_runs[0] / "metrics.jsonl").read_text().splitlines()]
    raw = [r["loss"] for r in records if r.get("kind", "train") == "train"]
    by_label = {line.get_label(): line for line in lines}
    assert list(by_label["cuda_run"].get_ydata()) == pytest.approx(ema_smooth(raw, 0.8))
    raw_line = next(line for line in lines if line.get_label().startswith("_") and len(line.get_xdata()) == 30)
    assert list(raw_line.get_ydata()) == pytest.approx(raw)  # the eval record's 99.0 is not drawn
    assert by_label["cuda_run"].get_linewidth() > raw_line.get_linewidth()


def test_plot_run_without_metrics_is_an_error_naming_it(two_runs, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(AccClipError, match="empty_run"):
        plot_runs([two_runs[0], empty], tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_plot_cli(two_runs, tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert cli.main(["plot", *map(str, two_runs), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert cli.main(["plot", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err

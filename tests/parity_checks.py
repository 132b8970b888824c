"""The parity runs and checks that tests/integration/test_parity*.py share."""

from __future__ import annotations

import math

from benchmarks.parity_open_clip import build_parser, run_parity

STEPS = 64  # 320 rows // 10 per batch x 2 epochs
# Flat-colour images, open_clip_train's arithmetic: measured 5.7e-6 at most (test_parity.py says where).
FLAT_EMA_TOLERANCE = 2e-5


def parity(train_csv, out, *extra: str, batch_size: int = 10, epochs: int = 2) -> dict:
    args = build_parser().parse_args(
        [
            "--train-data",
            str(train_csv),
            "--batch-size",
            str(batch_size),
            "--epochs",
            str(epochs),
            "--workers",
            "2",
            "--lr",
            "1e-3",
            "--warmup",
            "10",
            "--seed",
            "0",
            "--threads",
            "1",
            "--out",
            str(out),
            *extra,
        ]
    )
    report = run_parity(args)
    result = report["result"]
    print(
        f"parity: {result.num_points} steps, two-sided EMA error {result.ema_mean_abs_relative_error:.3g}, "
        f"max difference {result.max_abs_difference:.3g}, first losses {result.ref_losses[0]} / "
        f"{result.new_losses[0]:.6f}, speed ratio acc_clip/open_clip {report['speed_ratio']:.2f}"
    )
    return report


def assert_same_batches_and_learning_rates(report: dict) -> None:
    ref, new = report["open_clip_batches"], report["acc_clip_batches"]
    assert len(ref) == len(new) == STEPS
    assert new[0] == ref[0], "acc_clip's first batch is not open_clip_train's"
    assert report["first_differing_step"] is None, f"step {report['first_differing_step']}: other rows"

    lr = report["lr"]
    assert lr["steps"] == list(range(STEPS))
    for step, ours, scheduled, logged in zip(
        lr["steps"], lr["acc_clip"], lr["open_clip_scheduled"], lr["open_clip_logged"]
    ):
        assert math.isclose(ours, scheduled, rel_tol=1e-12, abs_tol=0.0), f"step {step}: lr {ours} != {scheduled}"
        assert f"{ours:5f}" == f"{logged:5f}", f"step {step}: lr {ours} is not open_clip's logged {logged}"

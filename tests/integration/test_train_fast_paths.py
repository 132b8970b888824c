"""The fast-path flags in training, each against a run without it from the same seed: subprocess
trainer runs (tiny models, 320 rows, batch 16, 2 epochs = 40 steps, workers 0, one compute thread,
so each run is deterministic), under tests/probe_train.py, which records that the flag took effect:
equal losses alone cannot tell a working --grad-checkpointing from an ignored one.

Tolerances, measured on the 2-core CPU machine (torch 2.14.1 CPU, load 3-5), numbers in the issue's notes:
- --grad-checkpointing recomputes the same forward: losses bit-equal to the run without it over 40
  steps (tiny-vit, where both towers checkpoint; tiny-rn's ResNet tower does not, open_clip's
  ModifiedResNet ignores it), at 1 and at 2 threads. Asserted: equal.
- --no-channels-last on a ResNet tower (channels_last is its default): the convolutions round
  differently and the curves drift a little. docs/performance.md said "within 3e-4 mean relative
  error (CPU, 40 steps)"; over seeds 0-9 here the mean relative error was 1.3e-4 to 2.15e-3 (seed 0,
  the test's: 5.0e-4) and the largest per-step difference 0.0011 to 0.0161; seed 0 at 2 threads
  1.0e-3. Asserted: mean relative error <= 4e-3 and largest difference <= 0.03, about 1.9x the worst
  seed (docs/performance.md now quotes the measured range).
- --torchcompile is not run here: compiling the tiny ResNet took 112 s on this CPU with a cold
  inductor cache (10 s warm), over the suite's budget for one check. Measured instead: over 10 steps
  its losses were within 5e-4 relative (1.3e-3 absolute) of the eager run's.
"""

from __future__ import annotations

import json
import sys

import pytest

from helpers import REPO, TINY_VIT, read_metrics, run_trainer, tiny_train_args

CHANNELS_LAST_MEAN_RELATIVE = 4e-3
CHANNELS_LAST_MAX_DIFFERENCE = 0.03
STEPS = 40


def probed_run(train_csv, logs, name: str, *extra: str) -> tuple[list[float], dict]:
    """The losses of a 40-step tiny run and its probe record."""
    probe = logs / f"{name}.probe.json"
    run_trainer(
        tiny_train_args(train_csv, logs, name, *extra),
        launcher=[sys.executable, str(REPO / "tests" / "probe_train.py")],
        timeout=240,
        env={"OMP_NUM_THREADS": "1", "ACC_CLIP_PROBE": str(probe)},
    )
    losses = [record["loss"] for record in read_metrics(logs / name)]
    assert len(losses) == STEPS
    return losses, json.loads(probe.read_text())


@pytest.fixture(scope="module")
def resnet_baseline(train_csv, tmp_path_factory):
    """tiny-rn with the defaults (channels_last on for its ResNet tower): shared by the comparisons."""
    return probed_run(train_csv, tmp_path_factory.mktemp("fast_paths"), "baseline")


def test_resnet_default_is_channels_last(resnet_baseline):
    _, probe = resnet_baseline
    assert probe["channels_last"] and probe["image_weights_channels_last"]
    assert probe["checkpoint_calls"] == 0 and not probe["compiled"]


def test_no_channels_last_keeps_the_loss_within_the_measured_agreement(resnet_baseline, train_csv, tmp_path):
    reference, _ = resnet_baseline
    losses, probe = probed_run(train_csv, tmp_path, "no_channels_last", "--no-channels-last")
    assert not probe["channels_last"] and not probe["image_weights_channels_last"]
    relative = [abs(new - ref) / abs(ref) for ref, new in zip(reference, losses)]
    mean_relative = sum(relative) / len(relative)
    largest = max(abs(new - ref) for ref, new in zip(reference, losses))
    print(f"--no-channels-last: mean relative error {mean_relative:.3g}, largest difference {largest:.3g}")
    assert mean_relative <= CHANNELS_LAST_MEAN_RELATIVE
    assert largest <= CHANNELS_LAST_MAX_DIFFERENCE


def test_grad_checkpointing_gives_the_same_losses(train_csv, tmp_path):
    reference, plain = probed_run(train_csv, tmp_path, "vit", "--model", TINY_VIT)
    losses, probe = probed_run(
        train_csv, tmp_path, "vit_grad_checkpointing", "--model", TINY_VIT, "--grad-checkpointing"
    )
    assert plain["checkpoint_calls"] == 0
    assert probe["checkpoint_calls"] >= STEPS * 2  # both towers, every step
    assert losses == reference

"""--auto-micro-batch under a simulated memory limit: the probe settles on the largest micro-batch that
fits, and because accumulation is contrastive-exact the weights after 5 plain-SGD steps equal those of
the same split set by hand and of one full batch.

The CPU has no memory limit to hit, so a torch dispatch mode stands in for one during the probe's trials
(a mock of a device's allocator, which cannot exist here): it adds up the bytes every operation returns
during one forward and backward of the model and raises torch's own out-of-memory error above a budget,
as a device allocator would."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from acc_clip.io.sealed import MANIFEST
from acc_clip.train.config import parse_train_config
from acc_clip.train.loop import train
from acc_clip.train.micro_batch import Trial
from helpers import PLAIN_SGD, TINY_VIT, max_difference, tiny_train_args

STEP_BATCH = 16
STEPS = 5
# The split run against one full batch: equal up to fp32 summation order; a micro-batch's gradient counted
# twice or missing moves the weights by far more (lr 1).
TOLERANCE = 1e-5


class SimulatedMemoryLimit(TorchDispatchMode):
    """Out of memory once one forward-and-backward has allocated more than `budget` bytes."""

    def __init__(self, budget: int):
        super().__init__()
        self.budget, self.allocated, self.peak = budget, 0, 0
        self._hook = None

    def __enter__(self):
        self.allocated = self.peak = 0
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._restart)
        return super().__enter__()

    def __exit__(self, *exc):
        self._hook.remove()
        return super().__exit__(*exc)

    def _restart(self, module, _inputs) -> None:  # each forward of the whole model starts a trial
        if isinstance(module, (open_clip.CLIP, open_clip.CustomTextCLIP)):
            self.allocated = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        # New memory only: views and in-place results share an input's storage.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        tensors = [
            t
            for t in tree_leaves(result)
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in inputs
        ]
        self.allocated += sum(t.numel() * t.element_size() for t in tensors)
        self.peak = max(self.peak, self.allocated)
        if self.allocated > self.budget:
            raise torch.OutOfMemoryError(f"simulated: {self.allocated} bytes allocated, {self.budget} available")
        return result


def run(tmp_path: Path, train_csv: Path, name: str, *flags: str) -> Path:
    args = tiny_train_args(train_csv, tmp_path, name, "--model", TINY_VIT, *PLAIN_SGD, "--max-steps", str(STEPS))
    config, notices = parse_train_config([*args, "--save-every-n-steps", str(STEPS), *flags])
    assert train(config, notices) == 0
    return tmp_path / name


@pytest.fixture
def trials_under(monkeypatch):
    """Runs every probe trial under the limit `trials_under` is called with; returns the trials made."""
    made: list[Trial] = []
    original = Trial.__call__

    def limit_trials(limit: SimulatedMemoryLimit) -> list[Trial]:
        def limited(trial: Trial, micro_batch: int) -> None:
            made.append(trial)
            with limit:
                original(trial, micro_batch)

        monkeypatch.setattr(Trial, "__call__", limited)
        return made

    return limit_trials


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))


def manifest_data(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / MANIFEST).read_text())["data"]


@pytest.mark.usefixtures("in_process")
def test_the_probe_settles_on_the_largest_fitting_micro_batch_and_changes_nothing(tmp_path, train_csv, trials_under):
    # Without a limit the whole batch fits; the trial it made measures each size for the budget.
    unlimited = SimulatedMemoryLimit(budget=2**62)
    trials = trials_under(unlimited)
    free = run(tmp_path, train_csv, "free", "--batch-size", str(STEP_BATCH), "--auto-micro-batch")
    assert manifest_data(free)["accum_freq"] == 1
    peaks = {}
    for size in (STEP_BATCH // 4, STEP_BATCH // 2):
        trials[0](size)
        peaks[size] = unlimited.peak
    assert peaks[STEP_BATCH // 4] < peaks[STEP_BATCH // 2], peaks
    # A budget that a micro-batch of STEP_BATCH / 4 fits and one of STEP_BATCH / 2 does not.
    trials_under(SimulatedMemoryLimit((peaks[STEP_BATCH // 4] + peaks[STEP_BATCH // 2]) // 2))
    auto = run(tmp_path, train_csv, "auto", "--batch-size", str(STEP_BATCH), "--auto-micro-batch")
    data = manifest_data(auto)
    assert (data["batch_size"], data["accum_freq"], data["auto_micro_batch"]) == (STEP_BATCH // 4, 4, True)
    assert "as 4 micro-batch(es) of 4" in (auto / "out.log").read_text()

    by_hand = run(tmp_path, train_csv, "by_hand", "--batch-size", str(STEP_BATCH // 4), "--accum-freq", "4")
    full = run(tmp_path, train_csv, "full", "--batch-size", str(STEP_BATCH))
    difference_to_hand = max_difference(weights(auto), weights(by_hand))
    difference_to_full = max_difference(weights(auto), weights(full))
    print(f"\nauto vs by hand {difference_to_hand:.3g}, auto vs one full batch {difference_to_full:.3g}")
    assert difference_to_hand == 0.0  # the probe left no trace: the same run as the split set by hand
    assert difference_to_full <= TOLERANCE


def test_auto_micro_batch_with_accum_freq_is_refused_in_one_line():
    with pytest.raises(Exception, match=r"--auto-micro-batch chooses the micro-batches itself: drop --accum-freq 2"):
        parse_train_config(["--train-data", "x.csv", "--auto-micro-batch", "--accum-freq", "2"])

"""open_clip main's compile and FSDP flags, trained.

- `--fsdp` launched with launch/cpu_2proc.yaml (no FSDP in the launch config) trains as the same command
  launched with launch/cpu_2proc_fsdp.yaml: the same per-step losses and final weights, bit for bit (it is
  the same code path: --fsdp sets the variables the config's fsdp section sets).
- `--torchcompile` under FSDP2 on two CPU processes (aot_eager, the default strategy task: the blocks compiled
  before fully_shard, the forward and loss around the root) trains as eager FSDP; it also writes its epoch
  save as the sharded step checkpoint alone (`--fsdp-checkpoint sharded`).
- each --torchcompile-strategy (model, task, step) on one process with aot_eager trains as eager.

Four steps of plain SGD at lr 1 (PLAIN_SGD), where a gradient off by any factor shows. aot_eager, not
inductor: the same graphs and autograd split without C++ code generation (inductor compiled the tiny ResNet
in 112 s cold on this CPU; aot_eager the tiny ViT's whole step in about 20 s).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from background_trainer import launch_with
from dist_worker import run_steps, tiny_config
from helpers import PLAIN_SGD, TINY_VIT, max_difference, read_metrics, run_trainer, tiny_train_args

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ROWS, STEPS = 64, 4  # 2 processes x 8 per step: one epoch of 4 steps
# Measured on this CPU: every comparison below was exactly 0 (losses and weights); fp32 round-off between
# compiled and eager graphs would be ~1e-7. A gradient off by a factor moves weights by ~1e-2 at lr 1.
TOLERANCE = 1e-5
COMPILED = ["--torchcompile", "--torchcompile-backend", "aot_eager"]


@pytest.fixture(scope="module")
def csv64(train_csv, tmp_path_factory) -> Path:
    lines = train_csv.read_text().splitlines(keepends=True)
    out = tmp_path_factory.mktemp("csv") / "train64.csv"
    out.write_text("".join(lines[: ROWS + 1]))
    return out


def run_args(csv: Path, logs: Path, name: str, *extra: str) -> list[str]:
    return tiny_train_args(
        csv, logs, name, "--model", TINY_VIT, "--batch-size", "8", "--epochs", "1", "--gather-with-grad",
        "--save-frequency", "1", *PLAIN_SGD, *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(csv64, tmp_path_factory) -> Path:
    """Three 2-process runs of the same command: `flag` (--fsdp, DDP's launch config), `config` (the FSDP
    launch config), `compiled` (--fsdp --torchcompile, epoch save sharded)."""
    logs = tmp_path_factory.mktemp("runs")
    for name, config, extra in (
        ("flag", "cpu_2proc.yaml", ["--fsdp"]),
        ("config", "cpu_2proc_fsdp.yaml", []),
        ("compiled", "cpu_2proc.yaml", ["--fsdp", *COMPILED, "--fsdp-checkpoint", "sharded"]),
    ):
        run_trainer(run_args(csv64, logs, name, *extra), launcher=launch_with(config))
    return logs


def losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(run_dir)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "epoch_1.pt")["state_dict"]


def test_fsdp_flag_without_a_launch_config_trains_as_the_fsdp_launch_config(runs):
    flag, config = runs / "flag", runs / "config"
    assert "FSDP2: 5 units" in (flag / "out.log").read_text() and "2 process(es)" in (flag / "out.log").read_text()
    assert (flag / "checkpoints" / f"step_{STEPS:08d}" / "pytorch_model_fsdp_0").is_dir()  # a sharded checkpoint
    assert len(losses(flag)) == STEPS
    difference = max_difference(final_weights(flag), final_weights(config))
    print(f"\n--fsdp vs the FSDP launch config: losses {losses(flag)} / {losses(config)}, weights {difference:.3g}")
    assert losses(flag) == losses(config) and difference == 0


def test_torchcompile_under_fsdp2_trains_as_eager_fsdp(runs):
    """The compiled run's weights are read from its sharded epoch-end step checkpoint (it writes no
    epoch_1.pt: --fsdp-checkpoint sharded), the eager run's from epoch_1.pt."""
    import open_clip

    from acc_clip.model.weights import load_weights

    compiled, eager = runs / "compiled", runs / "flag"
    log = (compiled / "out.log").read_text()
    assert "blocks and stages compiled (strategy task, backend aot_eager" in log
    assert "torch.compile: strategy task, backend aot_eager" in log
    first_step = [read_metrics(run)[0]["batch_time"] for run in (compiled, eager)]
    assert first_step[0] > 5 * first_step[1]  # it compiled (measured 17.5 s against 0.6 s eager)
    assert not (compiled / "checkpoints" / "epoch_1.pt").exists() and (eager / "checkpoints" / "epoch_1.pt").exists()
    model = open_clip.create_model(TINY_VIT)
    load_weights(model, str(compiled / "checkpoints" / f"step_{STEPS:08d}"), "--checkpoint")
    loss_gap = max(abs(a - b) for a, b in zip(losses(compiled), losses(eager)))
    weight_gap = max_difference(model.state_dict(), final_weights(eager))
    print(f"\ncompiled vs eager FSDP2: losses {loss_gap:.3g}, weights {weight_gap:.3g}")
    assert len(losses(compiled)) == STEPS and loss_gap <= TOLERANCE and weight_gap <= TOLERANCE


# one process, each strategy ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(csv64, accelerator) -> dict:
    """strategy (None: eager) -> (losses, weights, graphs dynamo compiled) of 3 SGD steps at batch 16."""
    from torch._dynamo.utils import counters

    results, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainers above (one_cpu_thread), and kind to a shared CPU
    for strategy in (None, "model", "task", "step"):
        flags = [] if strategy is None else [*COMPILED, "--torchcompile-strategy", strategy]
        torch._dynamo.reset()
        counters.clear()
        config = tiny_config(csv64, "--batch-size", "16", *flags)
        losses, weights, _ = run_steps(config, accelerator, 3, optimizer_name="sgd")
        results[strategy] = losses, weights, counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    torch.set_num_threads(threads)
    return results


@pytest.mark.parametrize("strategy", ["model", "task", "step"])
def test_each_compile_strategy_trains_as_eager_on_one_process(one_process, strategy):
    losses, weights, graphs = one_process[strategy]
    eager_losses, eager_weights, _ = one_process[None]
    loss_gap = max(abs(a - b) for a, b in zip(losses, eager_losses))
    print(f"\n{strategy}: {graphs} graphs, losses {loss_gap:.3g}, weights {max_difference(weights, eager_weights):.3g}")
    assert graphs > 0  # compiled, not run eagerly
    assert loss_gap <= TOLERANCE and max_difference(weights, eager_weights) <= TOLERANCE

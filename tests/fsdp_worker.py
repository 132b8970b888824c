"""The FSDP equality scenarios at the function level (the real model, data pipeline, loss, train_step
and Accelerator), as tests/dist_worker.py does for DDP.

`python tests/fsdp_worker.py OUT CSV` runs every scenario in one process group and writes, from rank 0,
OUT/<scenario>.pt: per-step losses, the final full weights and, under FSDP, how many gradient
reduce-scatters each step made. Launched three ways by tests/integration/test_fsdp.py: under
launch/cpu_2proc_fsdp.yaml (FSDP2), under launch/cpu_2proc.yaml (DDP), and as one plain process, which
runs each scenario's one-process reference (twice the per-process batch x --accum-freq, without the
flags that only say how processes share the work).
"""

from __future__ import annotations

import os
import sys

import torch

from dist_worker import accelerator_for_cpu, one_process_reference, run_steps, tiny_config
from helpers import PLAIN_SGD, TINY_RN, TINY_VIT

# name -> (model, per-process batch, flags). 20 steps of global batch 16 are one epoch of the 320-row CSV.
# tiny-rn has batch norm: each process normalises its own rows, so it has no one-process reference.
SCENARIOS = {
    "vit": (TINY_VIT, 8, ["--gather-with-grad"]),
    "vit_accum2": (TINY_VIT, 4, ["--gather-with-grad", "--accum-freq", "2"]),
    "vit_local": (TINY_VIT, 8, ["--gather-with-grad", "--local-loss"]),
    "rn": (TINY_RN, 8, ["--gather-with-grad"]),
    "rn_local_accum2": (TINY_RN, 4, ["--gather-with-grad", "--local-loss", "--accum-freq", "2"]),
}
# Options that change what FSDP holds (frozen parameters, SigLIP's bias, recomputed blocks): fewer steps.
SHORT_SCENARIOS = {
    "vit_siglip": (TINY_VIT, 8, ["--siglip"]),
    "vit_lock_checkpointing": (
        TINY_VIT,
        8,
        [
            "--gather-with-grad",
            "--lock-image",
            "--lock-text",
            "--lock-text-unlocked-layers",
            "1",
            "--lock-text-freeze-layer-norm",
            "--grad-checkpointing",
        ],
    ),
    # Layer decay (open_clip main's groups, built before FSDP swaps the parameters) under the trainer's plain SGD:
    # the groups' lr scales must survive the swap (tests/integration/test_fsdp_param_groups.py).
    "vit_layer_decay": (
        TINY_VIT,
        8,
        [*PLAIN_SGD, "--gather-with-grad", "--image-layer-decay", "0.5", "--text-layer-decay", "0.8"],
    ),
}
STEPS, SHORT_STEPS = 20, 3


class ReduceScatterCounter:
    """Counts FSDP2's gradient reduce-scatters (one per unit per reduction), through its public hook
    FSDPModule.set_custom_reduce_scatter, then reduce-scatters as FSDP2 does by default."""

    def __init__(self) -> None:
        self.calls = 0
        self.per_step: list[int] = []

    def end_step(self) -> None:
        self.per_step.append(self.calls - sum(self.per_step))

    def install(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

        counter = self

        class Counting(DefaultReduceScatter):
            def __call__(self, *args, **kwargs):
                counter.calls += 1
                return super().__call__(*args, **kwargs)

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_custom_reduce_scatter(Counting())


def run(name: str, scenario: tuple, steps: int, accelerator, train_csv: str, out_dir: str) -> None:
    model, batch, flags = scenario
    if accelerator.num_processes == 1:
        if model == TINY_RN:
            return
        batch, flags = one_process_reference(batch, flags)
    config = tiny_config(train_csv, "--batch-size", str(batch), "--model", model, *flags)
    counter = ReduceScatterCounter() if getattr(accelerator, "is_fsdp2", False) else None
    optimizer_name = "configured" if "--opt" in flags else "sgd"  # the config's optimizer where it names one
    losses, weights, _ = run_steps(config, accelerator, steps, optimizer_name=optimizer_name, after_prepare=counter)
    if accelerator.is_main_process:
        torch.save(
            {
                "losses": losses,
                "weights": weights,
                "reduce_scatters": counter.per_step if counter else None,
                "fsdp": bool(getattr(accelerator, "is_fsdp2", False)),
                "processes": accelerator.num_processes,
            },
            os.path.join(out_dir, f"{name}.pt"),
        )


def main(out_dir: str, train_csv: str, only: str = "") -> None:
    accelerator = accelerator_for_cpu()
    chosen = [name for name in (*SCENARIOS, *SHORT_SCENARIOS) if not only or name in only.split(",")]
    for name in chosen:
        scenario, steps = (SCENARIOS[name], STEPS) if name in SCENARIOS else (SHORT_SCENARIOS[name], SHORT_STEPS)
        run(name, scenario, steps, accelerator, train_csv, out_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:4])

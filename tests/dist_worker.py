"""Train a few steps at the function level (the real model, data pipeline, loss, train_step and
Accelerator) for the accumulation and multi-process tests.

Imported by the tests for one-process references; launched by test_distributed.py as
`accelerate launch --config_file launch/cpu_2proc.yaml tests/dist_worker.py OUT CSV TEACHER` to run every
multi-process scenario in one process group (one launch instead of one per scenario: the CPU is
small and shared). Rank 0 writes OUT/<scenario>.pt: losses, weights, and how many gradient
all-reduces the DDP communication hook saw.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate.utils import gather_object

from acc_clip.data import build_train_data
from acc_clip.data.pixels import train_transform
from acc_clip.loss import create_objective, model_overrides
from acc_clip.loss.siglip import DIST_IMPLS as SIGLIP_DIST_IMPLS
from acc_clip.model.build import create_model, uses_channels_last
from acc_clip.model.optim import create_optimizer
from acc_clip.runtime import parallel
from acc_clip.runtime.device import host_process_group, make_accelerator, plan_device
from acc_clip.train.balance import Balancer
from acc_clip.train.compiled import step_function
from acc_clip.train.config import TrainConfig, parse_train_config
from acc_clip.train.loop import to_device
from helpers import TINY_COCA, TINY_VIT

TEACHER = "{teacher}"  # stands for the distillation teacher's local-dir: name, given on the command line

# AdamW is what the trainer uses; plain SGD (lr 1) applies the raw gradient, so a gradient counted twice
# or missing a factor shows, where AdamW's update would hide it (it does not change when a gradient is
# multiplied by a constant). Scenarios beyond the first objective's are checked with SGD only, the
# stronger test, to keep the worker short.
BOTH, SGD = ("adamw", "sgd"), ("sgd",)
DISTILL = ["--distill-model", TEACHER, "--gather-with-grad"]
# name -> (per-process batch, extra flags, optimizers); each is compared with one process at batch x accum x 2.
SCENARIOS = {
    "gather": (8, ["--gather-with-grad"], BOTH),
    "gather_local": (8, ["--gather-with-grad", "--local-loss"], BOTH),
    "gather_accum2": (8, ["--gather-with-grad", "--accum-freq", "2"], BOTH),
    **{
        f"siglip_{impl}": (8, ["--siglip", "--loss-dist-impl", impl], BOTH if impl == "bidir" else SGD)
        for impl in SIGLIP_DIST_IMPLS
    },
    "siglip_accum2": (8, ["--siglip", "--accum-freq", "2"], SGD),
    # CoCa: captions differ in length between the ranks, so the caption loss must weigh by global tokens.
    "coca": (4, ["--model", TINY_COCA, "--gather-with-grad"], SGD),
    "coca_accum2": (4, ["--model", TINY_COCA, "--gather-with-grad", "--accum-freq", "2"], SGD),
    "distill": (8, DISTILL, SGD),
    "distill_local_accum2": (8, [*DISTILL, "--local-loss", "--accum-freq", "2"], SGD),
}
STEPS = 3
# Flags that only say how the processes split the work: a one-process reference leaves them out.
PROCESS_FLAGS = {"--accum-freq": 1, "--loss-dist-impl": 1, "--gather-with-grad": 0, "--local-loss": 0}


def optimizers_for(scenario: str) -> tuple[str, ...]:
    return SCENARIOS[scenario][2]


def scenario_flags(scenario: str, teacher: str) -> list[str]:
    return [teacher if flag == TEACHER else flag for flag in SCENARIOS[scenario][1]]


def one_process_reference(batch: int, flags) -> tuple[int, tuple[str, ...]]:
    """The batch and flags of one process doing the work of 2 processes x batch x --accum-freq: the
    flags less PROCESS_FLAGS (and their values)."""
    accum = int(flags[flags.index("--accum-freq") + 1]) if "--accum-freq" in flags else 1
    kept, skip = [], 0
    for flag in flags:
        if skip:
            skip -= 1
        elif flag in PROCESS_FLAGS:
            skip = PROCESS_FLAGS[flag]
        else:
            kept.append(flag)
    return batch * 2 * accum, tuple(kept)


def reference_of(scenario: str) -> tuple[int, tuple[str, ...]]:
    """One process for a scenario (kept symbolic: TEACHER stays as it is)."""
    batch, flags, _ = SCENARIOS[scenario]
    return one_process_reference(batch, flags)


def tiny_config(train_csv, *extra: str, model: str = TINY_VIT) -> TrainConfig:
    config, _ = parse_train_config(
        [
            "--train-data",
            str(train_csv),
            "--csv-separator",
            ",",
            "--model",
            model,
            "--workers",
            "0",
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "--lr",
            "1e-3",
            "--warmup",
            "0",
            "--wd",
            "0.1",
            *extra,
        ]
    )
    return config


def without_key_bias(weights: dict) -> dict:
    """The weights less the key third of each attention's in_proj_bias. Adding a constant to every key
    logit is undone by the softmax, so that bias has no effect and its gradient is zero up to fp32
    round-off (~1e-10, checked in test_step.py); AdamW's first step divides that noise by its own size and
    moves the bias by +-lr at random. Every other weight is compared."""
    result = {}
    for key, value in weights.items():
        if key.endswith("attn.in_proj_bias"):
            query, _, value_bias = value.chunk(3)
            value = torch.cat([query, value_bias])
        result[key] = value
    return result


def accelerator_for_cpu():
    return make_accelerator(plan_device("cpu", "fp32"))


class AllReduceCounter:
    """A DDP communication hook that counts gradient buckets all-reduced, then all-reduces them."""

    def __init__(self) -> None:
        self.calls = 0
        self.per_step: list[int] = []  # calls made during each optimizer step

    def end_step(self) -> None:
        self.per_step.append(self.calls - sum(self.per_step))

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.calls += 1
        return allreduce_hook(state, bucket)


def run_steps(
    config: TrainConfig,
    accelerator,
    steps: int,
    *,
    optimizer_name: str = "adamw",
    counter: AllReduceCounter | None = None,
    drop_on_rank: int | None = None,
    after_prepare=None,
):
    """`steps` optimizer steps of `config` from the seeded initial weights, on the first micro-batches
    of epoch 0; returns (losses, weights, the indices trained in each step). `drop_on_rank` makes that
    rank lose its last sample of every micro-batch, as if it were corrupt. `after_prepare`: an object whose
    install(model) is called on the wrapped model and end_step() after each step (a communication counter)."""
    rank, world_size = accelerator.process_index, accelerator.num_processes
    bundle = create_model(
        config.model, precision=config.runtime.precision, seed=config.runtime.seed, **model_overrides(config)
    )
    # The trainer's own image path: uint8 crops from the loader, normalised on the device.
    image_transform = train_transform(bundle.preprocess_train, decode_on_device=False, device=accelerator.device)
    data = build_train_data(
        config,
        image_transform,
        bundle.tokenizer,
        seed=config.runtime.seed,
        rank=rank,
        world_size=world_size,
        pin_memory=False,
    )
    model = bundle.model
    channels_last = uses_channels_last(model, config.model.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if optimizer_name in ("adamw", "configured"):  # the config's optimizer (AdamW by default), as the trainer's
        optimizer = create_optimizer(model, config.optimizer, "cpu")
    else:  # plain SGD: the update is the gradient itself, so any gradient scale error shows
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    compiling = config.runtime.compiling()  # --torchcompile: as the loop compiles (train/compiled.py)
    model, optimizer = parallel.prepare(accelerator, model, optimizer, sync_batch_norm=False, compile_model=compiling)
    if counter is not None:
        model.register_comm_hook(None, counter.hook)
    if after_prepare is not None:
        after_prepare.install(model)
    objective = create_objective(config, rank, world_size, accelerator.device)
    step = step_function(compiling, model, objective)
    host_group = host_process_group(accelerator)
    batches = iter(data.batches(0))
    losses, trained = [], []
    balancer = Balancer(host_group, rank, world_size)
    model.train()
    for _ in range(steps):
        micro_batches = [next(batches) for _ in range(config.training.accum_freq)]
        if drop_on_rank == rank:
            micro_batches = [
                b._replace(images=b.images[:-1], texts=b.texts[:-1], indices=b.indices[:-1], num_bad=b.num_bad + 1)
                for b in micro_batches
            ]
        micro_batches = balancer.balance(micro_batches)
        trained.append([i for b in micro_batches for i in b.indices.tolist()])
        device_batches = [to_device(b, image_transform, accelerator.device, channels_last) for b in micro_batches]
        losses.append(float(step(model, device_batches, objective, accelerator, optimizer)["loss"]))
        for watcher in (counter, after_prepare):
            if watcher is not None:
                watcher.end_step()
    weights = {k: v.detach().clone() for k, v in parallel.full_state_dict(model).items()}
    accelerator.free_memory()
    return losses, weights, trained


def main(out_dir: str, train_csv: str, teacher: str) -> None:
    accelerator = accelerator_for_cpu()
    assert accelerator.num_processes == 2, accelerator.num_processes
    for name, (batch, _, optimizers) in SCENARIOS.items():
        for optimizer_name in optimizers:
            counter = AllReduceCounter()
            config = tiny_config(train_csv, "--batch-size", str(batch), *scenario_flags(name, teacher))
            losses, weights, _ = run_steps(config, accelerator, STEPS, optimizer_name=optimizer_name, counter=counter)
            if accelerator.is_main_process:
                torch.save(
                    {"losses": losses, "weights": weights, "all_reduces": counter.per_step},
                    os.path.join(out_dir, f"{name}-{optimizer_name}.pt"),
                )
    # A rank that skipped a corrupt sample: the ranks must agree on a batch size and go on.
    config = tiny_config(train_csv, "--batch-size", "8", "--gather-with-grad")
    losses, _, trained = run_steps(config, accelerator, 2, drop_on_rank=1)
    all_trained = gather_object([trained])
    if accelerator.is_main_process:
        torch.save({"losses": losses, "trained": all_trained}, os.path.join(out_dir, "uneven.pt"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:4])

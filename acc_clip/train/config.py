"""The training command's configuration: every component's section, composed, and the rules that span
sections, kept here in one place.

Every flag of open_clip_train's command line keeps its name and meaning (tests/unit/train/test_open_clip_flags.py),
so the vendor's default command runs unchanged. Sources: the defaults (open_clip_train's), a YAML file
(`--config FILE`), command-line flags; later wins. A flag set where it has no effect is announced at
start-up, or refused where it could only be a mistake."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from acc_clip.checkpoint.manager import CheckpointOptions
from acc_clip.config.parsing import Config, from_values, parse, unmet_needs
from acc_clip.config.schema import POSITIVE, Domain, Section, option
from acc_clip.data import DataOptions, check_train_source, source_options
from acc_clip.errors import UsageError
from acc_clip.evaluation.evaluator import EvaluationOptions
from acc_clip.loss import ObjectiveOptions, check_objective, objective_options
from acc_clip.model.ema import EmaOptions
from acc_clip.model.lora import LoraOptions
from acc_clip.model.optim import OptimizerOptions, resolve_defaults
from acc_clip.model.options import ModelOptions
from acc_clip.runtime.device import RuntimeOptions
from acc_clip.runtime.signals import DEFAULT_STOP_SIGNALS, STOPPABLE, are_stop_signals
from acc_clip.train.metrics import LoggingOptions
from acc_clip.train.profiling import ProfilingOptions


@dataclass
class TrainingOptions(Section):
    """How long a run trains and how one optimizer step is made."""

    title: ClassVar[str] = "training"
    epochs: int = option(32, "training epochs", domain=POSITIVE, train_only=True)
    max_steps: int | None = option(
        None,
        "stop after this many optimizer steps (benchmarks, smoke tests); leave it out for no limit",
        domain=Domain("at least 1 (leave it out for no limit)", lambda v: v >= 1, ("0", "-1")),
        train_only=True,
    )
    accum_freq: int = option(1, "micro-batches per optimizer step, contrastive-exact", domain=POSITIVE, train_only=True)
    auto_micro_batch: bool = option(
        False,
        "--batch-size becomes each process's batch per optimizer step, trained as the fewest equal "
        "micro-batches that fit in device memory (tried at start-up, backing off on out-of-memory) with "
        "contrastive-exact accumulation: the update is the full batch's, whatever fitted (instead of --accum-freq)",
        train_only=True,
    )
    stop_signals: str = option(
        DEFAULT_STOP_SIGNALS,
        "comma-separated signals that end the run after its current step with a checkpoint and exit status 75 "
        f"(resume with --resume latest); among {', '.join(STOPPABLE)}",
        domain=Domain(f"signal names among {', '.join(STOPPABLE)}", are_stop_signals, ("SIGKILL", "", "SIGFOO")),
        train_only=True,
    )

    def check(self) -> None:
        if self.auto_micro_batch and self.accum_freq != 1:
            raise UsageError(
                f"--auto-micro-batch chooses the micro-batches itself: drop --accum-freq {self.accum_freq} "
                "(--batch-size is then each process's batch per optimizer step)"
            )


class TrainConfig(Config):
    """The training command's sections, each reachable by name."""

    @property
    def data(self) -> DataOptions:
        return self[DataOptions]

    @property
    def model(self) -> ModelOptions:
        return self[ModelOptions]

    @property
    def lora(self) -> LoraOptions:
        return self[LoraOptions]

    @property
    def optimizer(self) -> OptimizerOptions:
        return self[OptimizerOptions]

    @property
    def ema(self) -> EmaOptions:
        return self[EmaOptions]

    @property
    def training(self) -> TrainingOptions:
        return self[TrainingOptions]

    @property
    def checkpoint(self) -> CheckpointOptions:
        return self[CheckpointOptions]

    @property
    def evaluation(self) -> EvaluationOptions:
        return self[EvaluationOptions]

    @property
    def logging(self) -> LoggingOptions:
        return self[LoggingOptions]

    @property
    def runtime(self) -> RuntimeOptions:
        return self[RuntimeOptions]

    @property
    def profiling(self) -> ProfilingOptions:
        return self[ProfilingOptions]


def sections() -> list[type]:
    """Every section the training command takes, the registries' own included."""
    return [
        DataOptions,
        *source_options(),
        ModelOptions,
        LoraOptions,
        OptimizerOptions,
        EmaOptions,
        TrainingOptions,
        ObjectiveOptions,
        *objective_options(),
        CheckpointOptions,
        EvaluationOptions,
        LoggingOptions,
        RuntimeOptions,
        ProfilingOptions,
    ]


def check_compiled_step(config: TrainConfig) -> None:
    """--torchcompile-strategy step compiles the step of one batch; the contrastive-exact accumulation of
    several re-forwards each against the others' cached features, which is not one compiled step."""
    runtime = config.runtime
    if runtime.torchcompile and runtime.torchcompile_strategy == "step" and config.training.accum_freq > 1:
        raise UsageError(
            f"--torchcompile-strategy step needs --accum-freq 1 (given {config.training.accum_freq}): it compiles "
            "the step of one batch; use --torchcompile-strategy task to compile each micro-batch's forward and loss"
        )


def check_lora(config: TrainConfig) -> None:
    """--lora-rank freezes every base weight itself (--lora-towers chooses the towers it adapts), and peft's
    parametrized attention weight does not compile."""
    if not config.lora.enabled:
        return
    model = config.model
    for flag, given in (("--lock-image", model.lock_image), ("--lock-text", model.lock_text)):
        if given:
            raise UsageError(
                f"--lora-rank with {flag}: LoRA freezes every base weight already; choose the adapted towers "
                "with --lora-towers instead"
            )
    if config.runtime.torchcompile:
        raise UsageError(
            "--lora-rank with --torchcompile: not supported (peft parametrizes the packed attention weight at "
            "every forward, which recompiles or breaks the graph at every block); drop --torchcompile"
        )


def resolve(config: Config) -> tuple[TrainConfig, list[str]]:
    """Defaults derived from other sections, then the rules across sections; returns the config and the
    notices (flags given that have no effect in this run)."""
    config = TrainConfig(config.sections(), config.given)
    resolve_defaults(config.optimizer, config.model.model)
    check_compiled_step(config)
    check_lora(config)
    notices = [
        *check_train_source(config, [path for _, path in config.evaluation.val_sources]),
        *check_objective(config),
        *unmet_needs(config),
    ]
    return config, notices


def parse_train_config(argv: list[str]) -> tuple[TrainConfig, list[str]]:
    """The checked config of `acc-clip train ARGV` and the notices to give at start-up."""
    return resolve(
        parse(
            argv,
            sections(),
            prog="acc-clip train",
            train=True,
            description="Train a CLIP model with open_clip_train's flags, on Accelerate.",
        )
    )


def train_config(**values: Any) -> TrainConfig:
    """A checked config from option values by name, as a YAML file would give them (tests, tools)."""
    return resolve(from_values(sections(), values))[0]

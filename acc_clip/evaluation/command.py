"""`acc-clip eval ...` (also `accelerate launch -m acc_clip.eval ...`): evaluate a checkpoint with the
training loop's own evaluator; one JSON line per evaluation on stdout (main process), all metrics
together in `--out`.

Its flags are training's own (the same sections, the training-only options left out), so a shared flag
has one definition and one default. A step checkpoint folder brings the model it was trained as: its
manifest's model name, recorded model options (--force-quick-gelu, --image-mean, ...) and objective
(--siglip) stand in for the defaults, and flags given on the command line still win. An open_clip
`epoch_N.pt` or a bare state dict records none of that: give the flags the run was trained with."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

from acc_clip.config.parsing import Config, parse, unmet_needs
from acc_clip.config.schema import REQUIRED, Section, option
from acc_clip.data import DataOptions, source_options
from acc_clip.errors import UsageError
from acc_clip.evaluation.evaluator import EvaluationOptions, Evaluator
from acc_clip.io.atomic import write_atomically
from acc_clip.io.sealed import MANIFEST, read_record
from acc_clip.loss import ObjectiveOptions, check_objective, create_objective, model_overrides, objective_options
from acc_clip.model.build import create_tokenizer, open_clip_model
from acc_clip.model.options import ModelOptions, create_kwargs
from acc_clip.model.weights import load_weights
from acc_clip.runtime.device import RuntimeOptions, make_accelerator, plan_device


@dataclass
class EvalOptions(Section):
    title: ClassVar[str] = "eval"
    checkpoint: str = option(
        REQUIRED,
        "open_clip epoch_N.pt, a plain state dict, or an acc_clip "
        "checkpoints/step_N folder (which brings its model and model options)",
    )
    out: str | None = option(None, "also write all metrics to this JSON file")


def sections() -> list[type]:
    return [
        EvalOptions,
        ModelOptions,
        ObjectiveOptions,
        *objective_options(),
        EvaluationOptions,
        DataOptions,
        *source_options(),
        RuntimeOptions,
    ]


def recorded_defaults(checkpoint: str) -> dict[str, Any]:
    """The model a step checkpoint folder records (name, model options, the objective's identifying flags, the
    run's --precision), as option values; {} for a file (open_clip's epoch_N.pt records none of them). The files'
    hashes are checked once, when the weights load."""
    if not (os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, MANIFEST))):
        return {}
    manifest = read_record(checkpoint, "--checkpoint")
    objective = {key: value for key, value in manifest.get("objective", {}).items() if key == "siglip"}
    precision = {"precision": manifest["precision"]} if manifest.get("precision") else {}
    return {"model": manifest["model"], **manifest.get("model_options", {}), **objective, **precision}


def parse_eval_config(argv: list[str]) -> Config:
    description = "Evaluate a checkpoint: validation retrieval and zero-shot, with training's own evaluator."
    config = parse(argv, sections(), prog="acc-clip eval", description=description, train=False)
    options = config[EvalOptions]
    defaults = recorded_defaults(options.checkpoint)
    if defaults:
        config = parse(argv, sections(), prog="acc-clip eval", description=description, train=False, defaults=defaults)
    elif os.path.isfile(options.checkpoint) and "model" not in config.given:
        raise UsageError(
            f"--checkpoint {options.checkpoint}: give --model (and the run's model flags): only a step "
            "checkpoint folder records the model it holds"
        )
    if not config[EvaluationOptions].any_set:
        raise UsageError(
            "nothing to evaluate: give --val-data, --fewshot-data, --zeroshot-data, --imagenet-val and/or --imagenet-v2"
        )
    if options.out and not os.path.isdir(os.path.dirname(os.path.abspath(options.out))):
        raise UsageError(f"--out {options.out}: no such folder")
    return config


def main(argv: list[str]) -> int:
    config = parse_eval_config(argv)
    options, model_options, runtime = config[EvalOptions], config[ModelOptions], config[RuntimeOptions]
    for notice in [*unmet_needs(config), *check_objective(config)]:
        print(f"acc-clip eval: {notice}", file=sys.stderr)
    accelerator = make_accelerator(plan_device(runtime.device, runtime.precision))
    model, _, preprocess_val = open_clip_model(
        model_options.model,
        "",
        "--model",
        "--checkpoint",
        **{**create_kwargs(model_options, runtime.precision), **model_overrides(config)},
    )
    load_weights(model, options.checkpoint, "--checkpoint")
    model.to(accelerator.device)
    if accelerator.is_main_process:
        print(
            f"acc-clip eval: {options.checkpoint} ({model_options.model}) on {accelerator.num_processes} "
            f"process(es), device {accelerator.device}",
            file=sys.stderr,
        )
    # The validation loss is that of the objective the model and --siglip select (CoCa, SigLIP or CLIP).
    objective = create_objective(config, 0, 1, accelerator.device)
    evaluator = Evaluator(config, preprocess_val, create_tokenizer(model_options), accelerator, objective)
    results = evaluator.evaluate(model)
    if accelerator.is_main_process:
        for name, metrics in results.items():
            print(json.dumps({"eval": name, **metrics}), flush=True)
        if options.out:
            write_atomically(options.out, json.dumps(results, indent=2))
    # The process group ends here, on every process, not at interpreter exit: torch aborts a process that exits
    # with a live process group while another still uses it ("terminate called without an active exception").
    accelerator.end_training()
    return 0

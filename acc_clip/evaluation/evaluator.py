"""The evaluator the training loop and `acc-clip eval` use: validation retrieval (CSV or shards)
and zero-shot sets, built once from the config, run on open_clip_train's schedule.

Distributed evaluation: every process encodes its share of the rows, the features are gathered
with their row indices and re-ordered by index (duplicates dropped), so any number of processes
gives the metrics of one process reading the whole set in order. Metrics are computed on the main
process and broadcast, so every process returns the same dict.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from acc_clip.config.parsing import Config
from acc_clip.config.schema import NON_NEGATIVE, POSITIVE, Needs, Section, option
from acc_clip.data import DataOptions, build_eval_loader
from acc_clip.errors import DataError, UsageError
from acc_clip.evaluation import fewshot, sets, zeroshot
from acc_clip.evaluation.gather import gather_rows_by_index
from acc_clip.evaluation.retrieval import (
    coco_retrieval_metrics,
    default_chunk_size,
    retrieval_metrics,
    same_key_same_features,
)
from acc_clip.loss import PER_MODEL_OUTPUTS, Objective, ObjectiveOptions, model_rows, total_loss
from acc_clip.loss.clip import ClipObjective
from acc_clip.model.build import image_input_dtype
from acc_clip.runtime import parallel

log = logging.getLogger(__name__)


VAL_DATA = Needs("--val-data", lambda s: bool(s.val_data))
ZEROSHOT_DATA = Needs("--zeroshot-data", lambda s: bool(s.zeroshot_data))
ZEROSHOT = Needs("a zero-shot set", lambda s: bool(s.zeroshot_data or s.imagenet_val or s.imagenet_v2))
VALIDATION = Needs("--val-data or --fewshot-data", lambda s: bool(s.val_data or s.fewshot_data))
ANY_SET = Needs("--val-data, --fewshot-data or a zero-shot set", lambda s: s.any_set)


@dataclass
class EvaluationOptions(Section):
    title: ClassVar[str] = "evaluation"
    val_data: list[str] | None = option(
        None,
        "validation sets: a CSV or shards (PATH), or several as NAME=PATH, each reported under its name "
        "(NAME/val_loss, ...)",
    )
    val_num_samples: int | None = option(
        None,
        "samples the validation set holds (default: sizes.json; needed for "
        "shards without it; one set only); every sample is evaluated, whatever it says",
        domain=POSITIVE,
        needs=VAL_DATA,
    )
    val_retrieval_chunk_size: int | None = option(
        None,
        "validation queries ranked per block against every key (0: one block, the whole matrix; default: "
        "as many as keep a block of scores within 512 MB); any value gives the same metrics",
        domain=NON_NEGATIVE,
        needs=VAL_DATA,
    )
    val_retrieval_precision: str = option(
        "fp32",
        "retrieval scores: fp32 (float32 features, summed in float64, so every chunk size and process count "
        "ranks alike) or model (the features in the model's precision: less memory, ranks may then move "
        "with the chunking)",
        choices=("fp32", "model"),
        needs=VAL_DATA,
    )
    val_frequency: int = option(
        1, "evaluate every N epochs (validation and few-shot)", domain=NON_NEGATIVE, needs=VALIDATION, train_only=True
    )
    val_every_n_steps: int | None = option(
        None,
        "also evaluate every set every N optimizer steps, counted over the run (a resumed run evaluates at "
        "the same steps), before that step's checkpoint; results.jsonl records the step",
        domain=POSITIVE,
        needs=ANY_SET,
        train_only=True,
    )
    zeroshot_frequency: int = option(
        2, "zero-shot every N epochs", domain=NON_NEGATIVE, needs=ZEROSHOT, train_only=True
    )
    zeroshot_data: list[str] | None = option(
        None,
        "zero-shot sets: a folder per class or a filepath,label CSV (PATH), or several as NAME=PATH, each "
        "reported under its name (NAME/zeroshot_top1, ...)",
    )
    zeroshot_classnames: list[str] | None = option(
        None, "class names file, one per line (FILE for every set, NAME=FILE for one)", needs=ZEROSHOT_DATA
    )
    zeroshot_templates: list[str] | None = option(
        None,
        "prompt templates file, one per line with {} (FILE for every set, NAME=FILE for one)",
        needs=ZEROSHOT_DATA,
    )
    fewshot_data: str | None = option(
        None,
        "few-shot linear probe: a folder per class or a filepath,label CSV, each class's first 10 images (by "
        "path) the shots, the rest the test; ridge probes with 1, 5 and 10 shots, on the validation schedule",
    )
    imagenet_val: str | None = option(None, "ImageNet validation folder for zero-shot")
    imagenet_v2: str | None = option(
        None,
        "ImageNetV2 matched-frequency folder (sub-folders 0..999 by class "
        "index) for zero-shot, on --imagenet-val's schedule",
    )

    @property
    def any_set(self) -> bool:
        return bool(self.val_data or self.fewshot_data or self.zeroshot_data or self.imagenet_val or self.imagenet_v2)

    @property
    def val_sources(self) -> list[tuple[str, str]]:
        return sets.val_sources(self.val_data)

    @property
    def zeroshot_sources(self) -> list[sets.ZeroShotSource]:
        return sets.zeroshot_sources(self.zeroshot_data, self.zeroshot_classnames, self.zeroshot_templates)

    def check(self) -> None:
        imagenet = [group for group, path in zip(sets.IMAGENET_GROUPS, (self.imagenet_val, self.imagenet_v2)) if path]
        groups = [group for group, _ in self.val_sources] + [s.group for s in self.zeroshot_sources] + imagenet
        sets.check_groups(groups)
        if self.val_num_samples is not None and len(self.val_sources) > 1:
            raise UsageError(
                "--val-num-samples says how many samples one validation set holds; with several --val-data "
                "sets, give each set of shards its sizes.json instead"
            )


def _sum_over_processes(accelerator: Accelerator, value: int) -> int:
    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).sum().item())


def encode_rows(clip, objective, loader, accelerator: Accelerator, autocast) -> tuple[dict, dict, int]:
    """This process's share of the set through the model (eval mode, no gradient): the objective's
    per-sample rows by name, each concatenated over batches, on the CPU, with "indices"; the per-model
    rows (PER_MODEL_OUTPUTS) of its last batch; and the rows skipped as unreadable."""
    input_dtype = image_input_dtype(clip)
    parts: dict[str, list[torch.Tensor]] = {"indices": []}
    per_model: dict[str, torch.Tensor] = {}
    bad = 0
    with zeroshot.eval_mode(clip):
        for batch in loader:
            bad += batch.num_bad
            if len(batch.indices) == 0:
                continue
            images = batch.images.to(accelerator.device, dtype=input_dtype)
            with autocast():
                rows = model_rows(objective, clip, images, batch.texts.to(accelerator.device))
            for key, value in rows.items():
                if key in PER_MODEL_OUTPUTS:
                    per_model[key] = value.float().cpu()
                else:
                    parts.setdefault(key, []).append(value.float().cpu() if value.is_floating_point() else value.cpu())
            parts["indices"].append(batch.indices)
    return {key: torch.cat(values) for key, values in parts.items() if values}, per_model, bad


def _rows_over_processes(
    accelerator: Accelerator, local: dict[str, torch.Tensor], per_model: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every process's rows, by row index (see gather_rows_by_index), and the per-model rows; row names,
    widths and per-model values are taken from whichever process has rows, as a process may have had
    none (its share unreadable, or no share at all)."""
    layout = {key: (tuple(value.shape[1:]), value.dtype) for key, value in local.items() if key != "indices"}
    if accelerator.num_processes > 1:
        shares: list[Any] = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(shares, (layout, per_model))
        layout, per_model = next(((s, p) for s, p in shares if s), ({}, {}))
    names = sorted(layout)
    empty = {key: torch.empty((0, *shape), dtype=dtype) for key, (shape, dtype) in layout.items()}
    gathered = gather_rows_by_index(
        accelerator,
        local.get("indices", torch.empty(0, dtype=torch.long)),
        *(local.get(key, empty[key]) for key in names),
    )
    return {"indices": gathered[0], **dict(zip(names, gathered[1:]))}, per_model


def gather_ranks(accelerator: Accelerator, ranks: torch.Tensor) -> torch.Tensor:
    """Every process's ranks of its share of the queries, joined in process order (the shares are
    contiguous in that order, see retrieval.share_of), on every process."""
    if accelerator.num_processes == 1:
        return ranks
    padded = accelerator.pad_across_processes(ranks.to(accelerator.device), dim=0, pad_index=-1)
    gathered = accelerator.gather(padded).cpu()
    return gathered[gathered >= 0]


def score_dtype(options: EvaluationOptions, clip: torch.nn.Module, accelerator: Accelerator) -> torch.dtype:
    """What retrieval scores are computed in: float64 sums of the float32 features (fp32), or the model's
    precision (model): the autocast dtype, else that of the model's weights."""
    if options.val_retrieval_precision == "fp32":
        return torch.float64
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    return autocast or image_input_dtype(clip)


def evaluate_retrieval(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    accelerator: Accelerator,
    objective: Objective | None = None,
    *,
    precision_autocast: Callable[[], AbstractContextManager] | None = None,
    options: EvaluationOptions | None = None,
) -> dict[str, float]:
    """Encode the validation set (`Batch`es from `acc_clip.data.csv.build_eval_loader`, each row on one
    process) and return, on every process:

    - `val_loss`: the run's objective (default: CLIP) on the whole set as one batch, NOT open_clip's
      per-batch mean; with several named losses each as `val_<name>` too;
    - `retrieval_metrics` keys (row-level pairs; rows sharing an image file or a caption get the
      same features, see `same_key_same_features`);
    - `coco_retrieval_metrics` keys when the loader's dataset has `filepaths` and some image has
      more than one caption;
    - `num_samples` (rows evaluated) and `num_bad` (rows skipped: unreadable image, empty caption).

    Every process ranks its share of the queries, in blocks of --val-retrieval-chunk-size (`options`).
    The model is put in eval mode for the pass and returned to its previous mode after it.
    """
    options = options or EvaluationOptions()
    clip = parallel.unwrap(model)
    one_process = (objective or ClipObjective(Config([ObjectiveOptions()]), 0, 1, accelerator.device)).on_one_process()
    local, per_model, local_bad = encode_rows(
        clip, one_process, loader, accelerator, precision_autocast or contextlib.nullcontext
    )
    rows, per_model = _rows_over_processes(accelerator, local, per_model)
    num_bad = _sum_over_processes(accelerator, local_bad)
    if len(rows["indices"]) == 0:
        raise DataError(f"validation set: no readable samples ({num_bad} skipped as unreadable)")

    indices = rows.pop("indices").tolist()
    filepaths = getattr(loader.dataset, "filepaths", None)
    captions = getattr(loader.dataset, "captions", None)
    image_keys = [filepaths[i] for i in indices] if filepaths is not None else None
    caption_keys = [captions[i] for i in indices] if captions is not None else None
    if image_keys is not None:
        rows["image_features"] = same_key_same_features(rows["image_features"], image_keys)
    if caption_keys is not None:
        rows["text_features"] = same_key_same_features(rows["text_features"], caption_keys)
    # Each process ranks its share of the queries; the shares' ranks are joined on every process.
    chunk, dtype = options.val_retrieval_chunk_size, score_dtype(options, clip, accelerator)
    share, gather = (accelerator.process_index, accelerator.num_processes), functools.partial(gather_ranks, accelerator)
    image_features, text_features = rows["image_features"], rows["text_features"]
    retrieval = retrieval_metrics(
        image_features,
        text_features,
        per_model["logit_scale"],
        chunk_size=chunk,
        score_dtype=dtype,
        image_keys=image_keys,
        caption_keys=caption_keys,
        share=share,
        gather=gather,
    )
    if image_keys is not None and len(set(image_keys)) < len(image_keys):
        retrieval.update(
            coco_retrieval_metrics(
                image_features,
                text_features,
                image_keys,
                chunk_size=chunk,
                score_dtype=dtype,
                caption_keys=caption_keys,
                share=share,
                gather=gather,
            )
        )

    result: list[dict[str, float] | None] = [None]
    if accelerator.is_main_process:
        loss_chunk = default_chunk_size(len(indices)) if chunk is None else chunk
        metrics = validation_losses(one_process, rows, per_model, loss_chunk)
        metrics.update(retrieval)
        metrics.update(num_samples=len(indices), num_bad=num_bad)
        result[0] = metrics
    broadcast_object_list(result)
    return result[0] or {}


def validation_losses(objective: Objective, rows: dict, per_model: dict, chunk_size: int = 0) -> dict[str, float]:
    """`val_loss` (and `val_<name>` per named loss when there are several): the objective on the
    whole set's rows as one batch (computed in blocks of chunk_size rows where it can, `Objective.whole_set`)."""
    with torch.no_grad():
        losses = objective.whole_set({**rows, **per_model}, chunk_size)
    metrics = {"val_loss": float(total_loss(losses))}
    if len(losses) > 1:
        metrics.update({f"val_{name}": float(value) for name, value in losses.items()})
    return metrics


def expected_val_samples(options: EvaluationOptions, loader) -> tuple[int | None, str]:
    """How many samples the validation set should hold, and who says so: --val-num-samples, else the
    shards' sizes.json; (None, "") for a CSV without the flag (its rows are the count)."""
    if options.val_num_samples is not None:
        return options.val_num_samples, "--val-num-samples"
    from_sizes = getattr(loader.dataset, "num_samples", None)
    return (from_sizes, "sizes.json") if from_sizes is not None else (None, "")


def val_count_warning(expected: int | None, said_by: str, metrics: dict) -> str | None:
    """The warning to give when the samples read (evaluated or unreadable) are not the count expected.
    The count never cuts or pads the set: evaluation reads every sample once, so only this line differs."""
    read = metrics["num_samples"] + metrics["num_bad"]
    if expected is None or read == expected:
        return None
    return (
        f"{said_by} says the validation set holds {expected} samples but {read} were read "
        f"({metrics['num_bad']} unreadable); the metrics are over every sample read, once each"
        + ("" if said_by == "--val-num-samples" else " (a shard missing or cut short?)")
    )


def zeroshot_sets(options: EvaluationOptions, preprocess_val: Callable) -> list[tuple]:
    """(group, dataset, classnames, templates) for each `--zeroshot-data` set, `--imagenet-val` and
    `--imagenet-v2` (open_clip_train's 'imagenet-val' and 'imagenet-v2': OpenAI's ImageNet class names and
    templates)."""
    result: list[tuple] = []
    for source in options.zeroshot_sources:
        dataset, classnames = zeroshot.load_zeroshot_dataset(
            source.data, transform=preprocess_val, classnames_file=source.classnames
        )
        result.append((source.group, dataset, classnames, zeroshot.load_templates(source.templates)))
    if options.imagenet_val:
        dataset, classnames = zeroshot.load_imagenet_val(options.imagenet_val, transform=preprocess_val)
        result.append(("imagenet-zeroshot", dataset, classnames, zeroshot.OPENAI_IMAGENET_TEMPLATES))
    if options.imagenet_v2:
        dataset, classnames = zeroshot.load_imagenet_v2(options.imagenet_v2, transform=preprocess_val)
        result.append(("imagenetv2-zeroshot", dataset, classnames, zeroshot.OPENAI_IMAGENET_TEMPLATES))
    return result


@dataclass
class ValSet:
    """One validation set: its group name (sets.py), its loader and the samples it should hold."""

    group: str
    loader: Any
    expected: tuple[int | None, str]


class Evaluator:
    """Validation sets (retrieval), the few-shot probe and zero-shot sets, built once from the evaluation
    options (and the data options for reading them), run on open_clip_train's schedule and by steps."""

    def __init__(
        self,
        config: Config,
        preprocess_val: Callable,
        tokenizer: Callable,
        accelerator: Accelerator,
        objective: Objective | None = None,
    ):
        self.options, self.data = config[EvaluationOptions], config[DataOptions]
        self.tokenizer, self.accelerator = tokenizer, accelerator
        self.objective = objective  # the validation loss's; CLIP's when None
        self.val_sets = [self._val_set(config, group, path, preprocess_val) for group, path in self.options.val_sources]
        self._val_counts_warned: set[tuple[str, int]] = set()
        self.zeroshot_sets = zeroshot_sets(self.options, preprocess_val)
        self.fewshot_set: zeroshot.ZeroShotDataset | None = None
        if self.options.fewshot_data:
            self.fewshot_set, _ = zeroshot.load_zeroshot_dataset(
                self.options.fewshot_data, transform=preprocess_val, what="--fewshot-data set"
            )
            # A class too small to probe stops the run here, not at its first evaluation.
            fewshot.split(self.fewshot_set)

    def _val_set(self, config: Config, group: str, path: str, preprocess_val: Callable) -> ValSet:
        accelerator = self.accelerator
        loader = build_eval_loader(
            config,
            path,
            preprocess_val,
            self.tokenizer,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            expected_samples=self.options.val_num_samples,
        )
        return ValSet(group, loader, expected_val_samples(self.options, loader))

    @property
    def enabled(self) -> bool:
        return bool(self.val_sets or self.zeroshot_sets or self.fewshot_set is not None)

    def evaluate(self, model, *, retrieval: bool = True, classification: bool = True) -> dict[str, dict]:
        """Metrics per set, by group name (sets.py): "retrieval" or each validation set's name, "fewshot",
        then each zero-shot set's."""
        results: dict[str, dict] = {}
        for val_set in self.val_sets if retrieval else ():
            results[val_set.group] = evaluate_retrieval(
                model,
                val_set.loader,
                self.accelerator,
                self.objective,
                precision_autocast=self.accelerator.autocast,
                options=self.options,
            )
            self._check_val_count(val_set, results[val_set.group])
        if retrieval and self.fewshot_set is not None:
            results[sets.FEWSHOT] = fewshot.fewshot_eval(
                model,
                self.fewshot_set,
                self.accelerator,
                batch_size=self.data.batch_size,
                workers=self.data.workers,
                precision_autocast=self.accelerator.autocast,
            )
        classifiers: dict[tuple, torch.Tensor] = {}  # ImageNet val and V2 share one: 1000 classes x 80 prompts
        for name, dataset, classnames, templates in self.zeroshot_sets if classification else ():
            key = (tuple(classnames), tuple(templates))
            if key not in classifiers:
                classifiers[key] = zeroshot.zeroshot_classifier(
                    model, self.tokenizer, classnames, templates, self.accelerator, self.accelerator.autocast
                )
            results[name] = zeroshot.zeroshot_eval(
                model,
                self.tokenizer,
                dataset,
                classnames,
                templates,
                self.accelerator,
                batch_size=self.data.batch_size,
                workers=self.data.workers,
                precision_autocast=self.accelerator.autocast,
                classifier=classifiers[key],
            )
        return results

    def _check_val_count(self, val_set: ValSet, metrics: dict) -> None:
        warning = val_count_warning(*val_set.expected, metrics)
        read = metrics["num_samples"] + metrics["num_bad"]
        if warning and self.accelerator.is_main_process and (val_set.group, read) not in self._val_counts_warned:
            self._val_counts_warned.add((val_set.group, read))  # once per count read: not again every epoch
            log.warning(warning if val_set.group == sets.UNNAMED_VAL else f"{val_set.group}: {warning}")

    def due_at_step(self, global_step: int) -> bool:
        """Whether --val-every-n-steps asks for every set after `global_step` steps."""
        every = self.options.val_every_n_steps
        return self.enabled and every is not None and global_step % every == 0

    @staticmethod
    def _due(frequency: int, completed_epochs: int, last: bool) -> bool:
        return frequency > 0 and (last or completed_epochs % frequency == 0)

    def run(self, model, completed_epochs: int, *, last: bool = False, force: bool = False) -> dict:
        """The metrics due after `completed_epochs` (all of them with `force`), one flat dict: an unnamed
        validation set's keys as they are, the others' named after their set (sets.flat_key)."""
        options = self.options
        results = self.evaluate(
            model,
            retrieval=force or self._due(options.val_frequency, completed_epochs, last),
            classification=force or self._due(options.zeroshot_frequency, completed_epochs, last),
        )
        return {sets.flat_key(group, key): value for group, result in results.items() for key, value in result.items()}


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items())

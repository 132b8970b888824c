"""One typed training configuration, from three sources, later wins: the defaults (open_clip_train's),
a YAML file (`--config FILE`), command-line flags.

Every flag of open_clip_train's command line that the seed uses keeps its name and meaning, so the
vendor's default command runs unchanged. Unknown keys, in YAML or on the command line, are errors
that name the closest valid key. A flag set where it has no effect (the CoCa weights for a CLIP model)
is said at start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Optional, get_type_hints

import yaml

from acc_clip.io.files import MAX_IMAGE_BYTES
from acc_clip.errors import AccClipError

PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")  # open_clip's
SCHEDULERS = ("cosine", "const", "const-cooldown")
DATASET_TYPES = ("auto", "csv", "webdataset", "synthetic")
SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")  # open_clip SigLipLoss's exchanges across processes

COCA_FLAGS = ("coca_caption_loss_weight", "coca_contrastive_loss_weight")
# torch's process-group backends, and those vendor packages register (SDAA's tccl, Ascend's hccl).
DIST_BACKENDS = ("nccl", "gloo", "mpi", "ucc", "xccl", "tccl", "hccl")
# open_clip_train flags that cannot mean anything under acc_clip: flag -> why, and what to use instead.
REFUSED_FLAGS = {
    "horovod": "acc_clip runs on Accelerate, not Horovod: start processes with `accelerate launch` (launch/README.md)",
    "torchscript": "a TorchScript model cannot be trained here; export (acc-clip export) and script the open_clip "
                   "model for inference",
    "trace": "open_clip_train cannot train a traced model either; trace the exported model for inference",
    "use_bnb_linear": "bitsandbytes int8 linear layers are not supported; train in a --precision of torch's",
    "no_set_device_rank": "Accelerate places each process on its local device; choose devices with "
                          "CUDA_VISIBLE_DEVICES or SDAA_VISIBLE_DEVICES",
}


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if default is dict:  # a fresh {} per config
        return field(default_factory=dict, metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def _base_type(kind: Any) -> Any:
    """The type a flag parses to: Optional[X] -> X, list[X] -> list, dict -> dict."""
    args = getattr(kind, "__args__", None)
    if args and type(None) in args:  # Optional[X]
        kind = next(arg for arg in args if arg is not type(None))
    return getattr(kind, "__origin__", kind)


def _element_type(kind: Any) -> Any:
    """X for Optional[list[X]]."""
    args = getattr(kind, "__args__", None)
    if args and type(None) in args:
        kind = next(arg for arg in args if arg is not type(None))
    return kind.__args__[0]


@dataclass
class TrainConfig:
    # data
    train_data: Optional[str] = _opt(None, "training CSV, shard pattern 'DIR/{00000..00031}.tar', or a shard folder")
    val_data: Optional[str] = _opt(None, "validation CSV or shards")
    dataset_type: str = _opt("auto", "auto, csv, webdataset or synthetic", choices=DATASET_TYPES)
    csv_separator: str = _opt("\t", "CSV column separator (open_clip's default is a tab)")
    csv_img_key: str = _opt("filepath", "CSV column with image paths")
    csv_caption_key: str = _opt("title", "CSV column with captions")
    train_num_samples: Optional[int] = _opt(None, "samples per epoch for shards (default: sizes.json)")
    val_num_samples: Optional[int] = _opt(None, "samples the validation set holds (default: sizes.json; needed for "
                                                "shards without it); every sample is evaluated, whatever it says")
    dataset_resampled: bool = _opt(False, "sample shards with replacement")
    train_data_upsampling_factors: Optional[str] = _opt(None, "with --dataset-resampled: 'F1::F2::...', one draw "
                                                              "weight per '::'-joined source of --train-data")
    workers: int = _opt(4, "data loader worker processes per rank")
    pin_memory: Optional[bool] = _opt(None, "page-locked loader batches for non-blocking copies to the device "
                                            "(default: on for CUDA and SDAA; --no-pin-memory turns it off)",
                                      tristate=True)
    decode_on_device: bool = _opt(False, "decode JPEGs on the accelerator (nvjpeg on CUDA) instead of in the loader "
                                         "workers; falls back to the workers where the device cannot")
    max_bad_fraction: float = _opt(0.01, "stop when more than this fraction of samples read is missing or corrupt")
    skip_bad_rows: bool = _opt(False, "skip CSV rows whose field count differs from the header's (counted and named "
                                      "in a warning) instead of stopping at the first")
    max_image_bytes: int = _opt(MAX_IMAGE_BYTES, "image files larger than this are skipped and counted as bad")
    # model
    model: str = _opt("RN50", "open_clip model name, or local-dir:PATH holding open_clip_config.json")
    pretrained: str = _opt("", "pretrained tag or local weights file; empty for random init")
    lock_image: bool = _opt(False, "freeze the image tower")
    lock_image_unlocked_groups: int = _opt(0, "leave the last N image layer groups trainable")
    lock_image_freeze_bn_stats: bool = _opt(False, "freeze batch-norm statistics of locked image layers")
    lock_text: bool = _opt(False, "freeze the text tower")
    lock_text_unlocked_layers: int = _opt(0, "leave the last N text layers trainable")
    lock_text_freeze_layer_norm: bool = _opt(False, "freeze layer-norm parameters of locked text layers")
    pretrained_image: bool = _opt(False, "load ImageNet weights into the image tower (timm towers), as open_clip")
    cache_dir: Optional[str] = _opt(None, "where open_clip caches downloaded weights")
    force_image_size: Optional[list[int]] = _opt(None, "override the model's image size (one value, or height width)")
    force_context_length: Optional[int] = _opt(None, "override the text tower's context length")
    force_quick_gelu: bool = _opt(False, "use QuickGELU (as OpenAI's weights expect)")
    force_patch_dropout: Optional[float] = _opt(None, "override the ViT patch dropout in training (evaluation runs "
                                                      "without it)")
    force_custom_text: bool = _opt(False, "build the text tower as a separate module (CustomTextCLIP)")
    image_mean: Optional[list[float]] = _opt(None, "override the normalisation mean (one value per channel)")
    image_std: Optional[list[float]] = _opt(None, "override the normalisation std (one value per channel)")
    image_interpolation: Optional[str] = _opt(None, "resize interpolation: bicubic, bilinear or random",
                                              choices=("bicubic", "bilinear", "random"))
    image_resize_mode: Optional[str] = _opt(None, "evaluation resize: shortest, longest or squash",
                                            choices=("shortest", "longest", "squash"))
    aug_cfg: dict = _opt(dict, "training augmentation, key=value pairs (open_clip's AugmentationCfg: scale=(0.9,1.0) "
                               "color_jitter=... re_prob=...)")
    grad_checkpointing: bool = _opt(False, "activation checkpointing (less memory, more compute)")
    torchcompile: bool = _opt(False, "torch.compile the model")
    cudnn_benchmark: bool = _opt(True, "cuDNN picks the fastest convolution algorithms on CUDA, as open_clip_train "
                                       "does (--no-cudnn-benchmark: the same algorithms every run)", tristate=True)
    channels_last: Optional[bool] = _opt(None, "channels_last memory format (default: on for ResNet image "
                                               "towers, where it is faster; --no-channels-last turns it off)",
                                         tristate=True)
    # optimisation
    batch_size: int = _opt(64, "samples per process per micro-batch")
    epochs: int = _opt(32, "training epochs")
    max_steps: Optional[int] = _opt(None, "stop after this many optimizer steps (benchmarks, smoke tests)")
    # None: open_clip_train's defaults for the model (get_default_params: beta2 0.98, eps 1e-6 for a model whose
    # name holds "vit", else 0.999, 1e-8; lr 5e-4), filled in by `resolve_defaults`, or the timm optimizer's own.
    lr: Optional[float] = _opt(None, "peak learning rate (default 5e-4)")
    beta1: Optional[float] = _opt(None, "AdamW beta1 (default 0.9)")
    beta2: Optional[float] = _opt(None, "AdamW beta2 (default 0.98 for ViT models, else 0.999, as open_clip_train)")
    eps: Optional[float] = _opt(None, "AdamW epsilon (default 1e-6 for ViT models, else 1e-8, as open_clip_train)")
    momentum: Optional[float] = _opt(None, "momentum, for timm optimizers")
    wd: float = _opt(0.2, "weight decay (not applied to gains, biases, logit_scale)")
    fused_adamw: Optional[bool] = _opt(None, "AdamW's fused kernel (default: on where torch has one, CUDA and the "
                                             "CPU from torch 2.4; --no-fused-adamw: open_clip_train's unfused "
                                             "update, the same values up to rounding)", tristate=True)
    opt: str = _opt("adamw", "optimizer: adamw, or any timm optimizer as timm/NAME (e.g. timm/sgd, timm/lamb)")
    warmup: int = _opt(10000, "linear warm-up optimizer steps")
    lr_scheduler: str = _opt("cosine", "cosine, const or const-cooldown", choices=SCHEDULERS)
    skip_scheduler: bool = _opt(False, "no schedule: the learning rate stays at --lr")
    epochs_cooldown: Optional[int] = _opt(None, "cool-down epochs at the end, for const-cooldown")
    lr_cooldown_end: float = _opt(0.0, "learning rate at the end of the cool-down")
    lr_cooldown_power: float = _opt(1.0, "cool-down curve power (1 = linear)")
    grad_clip_norm: Optional[float] = _opt(None, "clip the global gradient norm to this value")
    accum_freq: int = _opt(1, "micro-batches per optimizer step, contrastive-exact")
    precision: str = _opt("amp", "open_clip's: amp (fp16 autocast + grad scaler), amp_bf16 = amp_bfloat16 (bf16 "
                                 "autocast), fp16 / bf16 (weights cast, no autocast), pure_fp16 / pure_bf16 (the whole "
                                 "model cast), fp32", choices=PRECISIONS)
    seed: int = _opt(0, "seed for weights, sample order and augmentation")
    # objective and distributed loss
    siglip: bool = _opt(False, "train with the sigmoid loss (SigLIP); the model starts at logit scale ln 10, logit "
                               "bias -10, as open_clip_train sets it")
    loss_dist_impl: Optional[str] = _opt(None, "SigLIP's exchange of text features across processes: bidir (the "
                                                "default), shift, reduce or gather; the same loss either way",
                                         choices=SIGLIP_DIST_IMPLS)
    coca_caption_loss_weight: float = _opt(2.0, "CoCa models: weight of the caption loss")
    coca_contrastive_loss_weight: float = _opt(1.0, "CoCa models: weight of the contrastive loss")
    distill_model: Optional[str] = _opt(None, "distil from this frozen teacher model (an open_clip name or "
                                              "local-dir:PATH); same transforms and tokenizer as --model assumed")
    distill_pretrained: Optional[str] = _opt(None, "the teacher's weights: a pretrained tag or a local file "
                                                   "(not needed for a local-dir: teacher whose folder holds them)")
    gather_with_grad: bool = _opt(False, "all-gather features with gradient (exact multi-process gradients)")
    local_loss: bool = _opt(False, "compute only the local rows of the logit matrix")
    use_bn_sync: bool = _opt(False, "synchronise batch-norm statistics across processes")
    ddp_static_graph: bool = _opt(False, "DDP's static_graph (the same parameters take part in every step)")
    dist_backend: Optional[str] = _opt(None, "process-group backend (default: nccl on CUDA, tccl on SDAA, gloo on the CPU)")
    dist_url: Optional[str] = _opt(None, "env:// only: addresses come from the launcher (accelerate launch, srun)")
    horovod: bool = _opt(False, "refused: acc_clip runs on Accelerate")
    no_set_device_rank: bool = _opt(False, "refused: Accelerate places each process on its local device")
    torchscript: bool = _opt(False, "refused: a TorchScript model cannot be trained")
    trace: bool = _opt(False, "refused: a traced model cannot be trained")
    use_bnb_linear: Optional[str] = _opt(None, "refused: bitsandbytes linear layers are not supported")
    # device
    device: Optional[str] = _opt(None, "sdaa, cuda, npu, xpu, mps or cpu; default: sdaa if torch_sdaa is installed, "
                                       "else cuda, else cpu")
    # logging and evaluation
    logs: str = _opt("./logs/", "folder holding one sub-folder per run")
    name: Optional[str] = _opt(None, "run name (default: date, model, lr, batch size, workers, precision)")
    log_every_n_steps: int = _opt(100, "log a line every N optimizer steps")
    log_local: bool = _opt(False, "every process writes its own log, out-RANK.log (default: the main process, out.log)")
    debug: bool = _opt(False, "debug-level logging")
    copy_codebase: bool = _opt(False, "copy the acc_clip package into the run folder (code/), to rerun it as it was")
    report_to: str = _opt("", "trackers: tensorboard, wandb, all, or empty")
    wandb_notes: str = _opt("", "wandb run notes")
    wandb_project_name: str = _opt("open-clip", "wandb project")
    val_frequency: int = _opt(1, "evaluate every N epochs")
    zeroshot_frequency: int = _opt(2, "zero-shot every N epochs")
    zeroshot_data: Optional[str] = _opt(None, "zero-shot set: a folder per class, or a filepath,label CSV")
    zeroshot_classnames: Optional[str] = _opt(None, "class names file, one per line")
    zeroshot_templates: Optional[str] = _opt(None, "prompt templates file, one per line with {}")
    imagenet_val: Optional[str] = _opt(None, "ImageNet validation folder for zero-shot")
    imagenet_v2: Optional[str] = _opt(None, "ImageNetV2 matched-frequency folder (sub-folders 0..999 by class index) "
                                            "for zero-shot, on --imagenet-val's schedule")
    # checkpoints
    save_frequency: int = _opt(1, "save every N epochs (0: never)")
    save_every_n_steps: int = _opt(0, "also save every N optimizer steps (0: never)")
    keep_checkpoints: int = _opt(0, "keep only the newest K step checkpoints (0: keep all)")
    save_most_recent: bool = _opt(False, "also keep an epoch_latest.pt")
    delete_previous_checkpoint: bool = _opt(False, "delete the previous epoch_N.pt after saving a new one")
    resume: Optional[str] = _opt(None, "'latest', a checkpoint folder, or an open_clip epoch_N.pt")
    remote_sync: Optional[str] = _opt(None, "copy the run folder to this fsspec URL in the background")
    remote_sync_frequency: int = _opt(300, "seconds between remote copies")
    remote_sync_protocol: str = _opt("s3", "s3 or fsspec", choices=("s3", "fsspec"))

    @property
    def is_coca(self) -> bool:
        """open_clip_train's rule: a model whose name says coca trains with the CoCa loss."""
        return "coca" in self.model.lower()

    @property
    def uses_timm_optimizer(self) -> bool:
        return self.opt.lower().startswith("timm/")

    def __post_init__(self) -> None:
        """open_clip_train's rule: lr, beta1, beta2 and eps left unset take `get_default_params(model)` (a
        model whose name holds "vit": beta2 0.98, eps 1e-6), except under a timm optimizer, which keeps
        its own defaults. Done on every construction, so no config is ever half resolved."""
        if self.uses_timm_optimizer:
            return
        from open_clip_train.params import get_default_params

        for key, value in get_default_params(self.model).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def _validate_compatibility(self) -> None:
        """open_clip_train flags that cannot mean anything here, or only in part: one line each."""
        for key, why in REFUSED_FLAGS.items():
            if getattr(self, key):
                raise AccClipError(f"--{flag(key)}: {why}")
        if self.dist_url not in (None, "env://"):
            raise AccClipError(f"--dist-url {self.dist_url}: acc_clip's processes take their addresses from the "
                               "launcher: accelerate launch --main_process_ip/--main_process_port, or srun with "
                               "MASTER_ADDR/MASTER_PORT (launch/README.md)")
        if self.opt.lower() != "adamw" and not self.uses_timm_optimizer:
            raise AccClipError(f"--opt {self.opt}: expected adamw or a timm optimizer as timm/NAME")
        if self.uses_timm_optimizer:
            if self.lr is None:
                raise AccClipError(f"--opt {self.opt} needs --lr: the schedule starts from it (open_clip_train's too)")
            if (self.beta1 is None) != (self.beta2 is None):
                raise AccClipError(f"--opt {self.opt}: give both --beta1 and --beta2 or neither (as open_clip_train)")
        for key in COCA_FLAGS:
            if getattr(self, key) < 0:
                raise AccClipError(f"--{flag(key)} {getattr(self, key)}: a loss weight must not be negative")
        if self.dist_backend is not None and self.dist_backend not in DIST_BACKENDS:
            raise AccClipError(f"--dist-backend {self.dist_backend}: expected one of {', '.join(DIST_BACKENDS)}")
        if self.force_image_size is not None and (len(self.force_image_size) not in (1, 2) or
                                                  min(self.force_image_size) < 1):
            raise AccClipError(f"--force-image-size {' '.join(map(str, self.force_image_size))}: one positive size, "
                               "or height and width")
        for key in ("image_mean", "image_std"):
            values = getattr(self, key)
            if values is not None and len(values) not in (1, 3):
                raise AccClipError(f"--{flag(key)} {' '.join(map(str, values))}: one value, or one per channel (3)")
        if self.image_std is not None and min(self.image_std) <= 0:
            raise AccClipError(f"--image-std {' '.join(map(str, self.image_std))}: must be positive")
        if self.force_context_length is not None and self.force_context_length < 2:
            raise AccClipError(f"--force-context-length {self.force_context_length}: at least 2 tokens (start, end)")

    def validate(self) -> "TrainConfig":
        self._validate_compatibility()
        positive = ("batch_size", "epochs", "accum_freq", "log_every_n_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise AccClipError(f"--{flag(key)} must be at least 1, got {getattr(self, key)}")
        for key in ("workers", "warmup", "save_frequency", "save_every_n_steps", "keep_checkpoints",
                    "val_frequency", "zeroshot_frequency", "lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, key) < 0:
                raise AccClipError(f"--{flag(key)} must not be negative, got {getattr(self, key)}")
        if self.val_num_samples is not None and self.val_num_samples < 1:
            raise AccClipError(f"--val-num-samples must be at least 1, got {self.val_num_samples}")
        if self.max_image_bytes < 1:
            raise AccClipError(f"--max-image-bytes must be at least 1, got {self.max_image_bytes}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise AccClipError(f"--max-bad-fraction must be within [0, 1], got {self.max_bad_fraction}")
        if self.lr_scheduler == "const-cooldown" and self.epochs_cooldown is None:
            raise AccClipError("--lr-scheduler const-cooldown needs --epochs-cooldown")
        if self.local_loss and not self.gather_with_grad:
            # Without gathered gradients each rank would only see its own rows' gradient: wrong.
            raise AccClipError("--local-loss needs --gather-with-grad")
        if self.distill_pretrained and not self.distill_model:
            # open_clip_train would silently train without a teacher.
            raise AccClipError("--distill-pretrained needs --distill-model (the teacher's architecture)")
        if self.distill_model and (self.is_coca or self.siglip):
            raise AccClipError(f"--distill-model trains with the CLIP distillation loss: it cannot be combined with "
                               f"{'a CoCa model' if self.is_coca else '--siglip'} (open_clip_train cannot either)")
        if self.train_data is None and self.dataset_type != "synthetic":
            raise AccClipError("--train-data is required (a CSV file or webdataset shards)")
        if self.train_data_upsampling_factors is not None:
            from acc_clip.data import check_upsampling_factors  # acc_clip.data imports this module

            check_upsampling_factors(self)
        return self


def flag(key: str) -> str:
    return key.replace("_", "-")


def option_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _closest(key: str) -> str:
    matches = difflib.get_close_matches(key.replace("-", "_").lstrip("_"), option_keys(), n=1, cutoff=0.0)
    return flag(matches[0]) if matches else ""


def _key_values_action() -> type:
    from open_clip_train.params import ParseKwargs  # open_clip's own key=value parsing for --aug-cfg

    class KeyValues(ParseKwargs):
        """open_clip's parsing, with a one-line error where it would raise a ValueError."""

        def __call__(self, parser, namespace, values, option_string=None):
            try:
                super().__call__(parser, namespace, values, option_string)
            except ValueError:
                raise AccClipError(f"{option_string} {' '.join(values)}: expected key=value pairs, e.g. "
                                   "scale=(0.9,1.0) re_prob=0.25") from None

    return KeyValues


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acc-clip train", allow_abbrev=False,
                                     description="Train a CLIP model with open_clip_train's flags, on Accelerate.")
    parser.add_argument("--config", help="YAML file of options (keys as flags, - or _)")
    KeyValues = _key_values_action()
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        base = _base_type(kind)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if f.metadata.get("tristate") else "store_true"
        elif base is list:
            kwargs.update(type=_element_type(kind), nargs="+")
        elif base is dict:
            kwargs.update(nargs="*", action=KeyValues)
        else:
            kwargs["type"] = base
            if base is str:
                # open_clip's run_demo.py prints empty values as nothing: `--pretrained --next-flag`.
                kwargs.update(nargs="?", const="")
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{flag(f.name)}", **kwargs)
    return parser


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise AccClipError(f"{path}: config file not found")
    with open(path) as file:
        try:
            values = yaml.safe_load(file) or {}
        except yaml.YAMLError as error:
            raise AccClipError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise AccClipError(f"{path}: expected a mapping of option: value at the top level")
    known = set(option_keys())
    result = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise AccClipError(f"{path}: unknown key {key!r}; did you mean {_closest(str(key))!r}?")
        result[name] = value
    return result


def _coerce(key: str, value: Any) -> Any:
    """YAML gives ints for floats (`lr: 1`) and strings for scientific notation without a dot (`5e-4`)."""
    kind = get_type_hints(TrainConfig)[key]
    base = _base_type(kind)
    if value is None or base is str and isinstance(value, str):
        return value
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is list:
            element = _element_type(kind)
            return [element(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if base is dict:
            if isinstance(value, dict):
                return dict(value)
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise AccClipError(f"option {key!r}: expected {base.__name__}, got {value!r}") from None


def parse_config(argv: list[str]) -> tuple[TrainConfig, list[str]]:
    """The validated config and the notices to print at start-up (flags set that have no effect in this run)."""
    parser = _argument_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = next(token for token in unknown if token.startswith("-")) if any(
            token.startswith("-") for token in unknown) else unknown[0]
        if bad.startswith("-"):
            raise AccClipError(f"unknown option {bad.split('=')[0]!r}; did you mean '--{_closest(bad.split('=')[0])}'?")
        raise AccClipError(f"unexpected argument {bad!r}")
    values: dict[str, Any] = {}
    config_path = getattr(namespace, "config", None)
    if config_path:
        values.update(_read_yaml(config_path))
    values.update({k: v for k, v in vars(namespace).items() if k != "config"})
    config = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    notices = [f"--{flag(key)} has no effect: {config.model} is not a CoCa model (open_clip_train's rule: the name "
                f"holds 'coca')" for key in COCA_FLAGS if key in values and not config.is_coca]
    if config.momentum is not None and not config.uses_timm_optimizer:
        notices.append(f"--momentum {config.momentum} has no effect with --opt {config.opt} (as in open_clip)")
    if config.siglip and config.is_coca:
        notices.append("--siglip with a CoCa model: the CoCa loss trains (open_clip_train's order); only the SigLIP "
                       "initialisation (logit scale ln 10, bias -10) applies")
    if config.loss_dist_impl is not None and (not config.siglip or config.is_coca):
        notices.append(f"--loss-dist-impl {config.loss_dist_impl} has no effect: this run does not train with the "
                       "SigLIP loss (as in open_clip)")
    return config.validate(), notices


def _plain(value: Any) -> Any:
    """YAML's safe dumper takes lists, not tuples (--aug-cfg scale=(0.9,1.0))."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def save_config(config: TrainConfig, path: str) -> None:
    """The resolved config: every default filled in, those derived from the model included."""
    values = _plain(dataclasses.asdict(config))
    with open(path, "w") as file:
        yaml.safe_dump(values, file, sort_keys=False)

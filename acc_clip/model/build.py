"""The open_clip model, its transforms and tokenizer, tower locking, AdamW parameter groups and
the learning-rate schedule, all as open_clip_train sets them up."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from open_clip import create_model_and_transforms, get_model_config, get_tokenizer
from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

from acc_clip.config import TrainConfig
from acc_clip.errors import AccClipError

LOGIT_SCALE_MAX = math.log(100)  # CLIP's clamp: temperature at most 100


@dataclass
class ModelBundle:
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable


LOCAL_DIR = "local-dir:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip looks for in a local-dir: folder


def local_dir_folder(name: str, flag: str) -> Optional[str]:
    """The folder of a local-dir: model name (None for other names); a folder that is not there is one line."""
    if not name.startswith(LOCAL_DIR):
        return None
    folder = name[len(LOCAL_DIR):]
    if not os.path.isdir(folder):
        raise AccClipError(f"{flag} {name}: no such folder")
    return folder


def is_local_weights(pretrained: str) -> bool:
    """A path to weights on this machine (a file, or an acc_clip checkpoint folder), not a pretrained tag."""
    return bool(pretrained) and os.path.exists(pretrained)


def open_clip_model(name: str, pretrained: str, model_flag: str, weights_flag: str, **kwargs):
    """open_clip's model, transforms and all, with its weights: a pretrained tag (open_clip's), a local
    file or acc_clip checkpoint folder (loaded here, `load_weights`), or those in a local-dir: folder.
    open_clip ignores a pretrained argument beside a local-dir: name; here a local file is loaded
    over the folder's weights rather than dropped. Errors name the flags."""
    from acc_clip.checkpoint.format import load_weights

    local_dir_folder(name, model_flag)
    local = is_local_weights(pretrained)
    if pretrained and os.path.sep in pretrained and not local:
        raise AccClipError(f"{weights_flag} {pretrained}: no such file")
    kwargs = {"precision": "fp32", **kwargs}
    try:
        model, preprocess_train, preprocess_val = create_model_and_transforms(
            name, None if local else pretrained or None, device="cpu", output_dict=True, **kwargs)
    except (RuntimeError, ValueError, FileNotFoundError) as error:  # open_clip's ways of saying bad name/weights
        # open_clip's unknown-name message lists every model it has (kilobytes): keep its start.
        message = str(error) if len(str(error)) <= 300 else f"{str(error)[:300]}... (see open_clip.list_models())"
        raise AccClipError(f"{model_flag} {name} {weights_flag} {pretrained!r}: {message}") from None
    except TypeError as error:  # an option open_clip's classes do not take, e.g. --aug-cfg bogus=1
        raise AccClipError(f"{model_flag} {name}: {error}") from None
    if local:
        load_weights(model, pretrained, weights_flag)
    return model, preprocess_train, preprocess_val


def model_options(config: TrainConfig) -> dict:
    """open_clip_train's arguments to create_model_and_transforms beyond the name and weights."""
    size = config.force_image_size
    options = dict(
        precision=config.precision, force_quick_gelu=config.force_quick_gelu,
        force_custom_text=config.force_custom_text, force_patch_dropout=config.force_patch_dropout,
        force_image_size=size[0] if size is not None and len(size) == 1 else size,
        force_context_length=config.force_context_length, image_mean=config.image_mean, image_std=config.image_std,
        image_interpolation=config.image_interpolation, image_resize_mode=config.image_resize_mode,
        aug_cfg=config.aug_cfg, pretrained_image=config.pretrained_image, cache_dir=config.cache_dir)
    if config.siglip:
        # open_clip_train's SigLIP start: a cooler temperature and a strongly negative bias, most pairs being negatives.
        options.update(init_logit_scale=math.log(10), init_logit_bias=-10)
    return options


def has_weights(name: str, pretrained: str, flag: str) -> bool:
    if pretrained:
        return True
    folder = local_dir_folder(name, flag)
    return folder is not None and any(entry.endswith(WEIGHT_SUFFIXES) for entry in os.listdir(folder))


def create_model(config: TrainConfig) -> ModelBundle:
    """Seeds the global RNGs with `config.seed` first, as open_clip_train does, so the same seed gives
    the same initial weights in both trainers."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    model, preprocess_train, preprocess_val = open_clip_model(config.model, config.pretrained, "--model",
                                                              "--pretrained", **model_options(config))
    check_coca(model, config)
    if not has_weights(config.model, config.pretrained, "--model"):
        initialise_coca_decoder_projection(model)
    if config.lock_image:
        try:
            model.lock_image_tower(unlocked_groups=config.lock_image_unlocked_groups,
                                   freeze_bn_stats=config.lock_image_freeze_bn_stats)
        except AssertionError as error:  # open_clip's way of saying "not for this tower"
            raise AccClipError(f"--lock-image-unlocked-groups {config.lock_image_unlocked_groups} with --model "
                               f"{config.model}: {error}") from None
    if config.lock_text:
        model.lock_text_tower(unlocked_layers=config.lock_text_unlocked_layers,
                              freeze_layer_norm=config.lock_text_freeze_layer_norm)
    if config.grad_checkpointing:
        model.set_grad_checkpointing()
    # open_clip_train's: with --force-context-length the texts are tokenised to that length
    tokenizer = get_tokenizer(config.model, **({'context_length': config.force_context_length}
                                               if config.force_context_length else {}))
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer)


def create_teacher(config: TrainConfig, device) -> torch.nn.Module:
    """The distillation teacher (--distill-model, --distill-pretrained): frozen, in eval mode, on
    `device`. It is not part of the trained model, so it is never wrapped, optimised or saved."""
    name = config.distill_model
    if local_dir_folder(name, "--distill-model") is None and not name.startswith("hf-hub:") and \
            get_model_config(name) is None:
        raise AccClipError(f"--distill-model {name}: open_clip has no model of that name (open_clip.list_models())")
    if not has_weights(name, config.distill_pretrained, "--distill-model"):
        raise AccClipError(f"--distill-model {name}: the teacher has no weights; give "
                           "--distill-pretrained (a tag or a local file) or a local-dir: folder that holds them")
    # In the run's precision, as open_clip_train creates it: under fp16/bf16 it reads the student's cast inputs.
    teacher, _, _ = open_clip_model(name, config.distill_pretrained or "", "--distill-model", "--distill-pretrained",
                                    precision=config.precision)
    return teacher.requires_grad_(False).eval().to(device)


def check_coca(model: torch.nn.Module, config: TrainConfig) -> None:
    """open_clip_train picks the CoCa loss by the model's name; a CoCa model under another name (an exported
    local-dir: folder, say) would silently train without its caption loss, and a CLIP model under a coca name
    would fail in the loss. Both are one line here. open_clip's CoCa pooler also fails on weights cast by
    --precision fp16/bf16 (dtype mismatch in its attention); refuse that before training."""
    from open_clip import CoCa

    if isinstance(model, CoCa) != config.is_coca:
        raise AccClipError(f"--model {config.model}: " + (
            "a CoCa model whose name lacks 'coca', so open_clip_train's rule would train it without its caption "
            "loss; name its folder with coca" if isinstance(model, CoCa) else
            "the name holds 'coca', which selects the CoCa loss (open_clip_train's rule), but the model has no "
            "caption decoder; rename its folder"))
    if isinstance(model, CoCa) and config.precision in ("fp16", "bf16"):
        raise AccClipError(f"--precision {config.precision} with a CoCa model: open_clip's CoCa fails on weights cast "
                           "this way; use amp, amp_bf16 or pure_" + config.precision)


def initialise_coca_decoder_projection(model: torch.nn.Module) -> None:
    """open_clip's CoCa creates its decoder's text_projection with torch.empty and never initialises
    it (the decoder's init_parameters is never called, and would fail if it were: it reads a
    `transformer` attribute the decoder does not have; open_clip issue #554), so a fresh CoCa starts
    from whatever that memory held: zeros, denormals, inf or NaN, different from run to run. Drawn
    here from the seeded generator with the std init_parameters means (width ** -0.5), so the same
    seed gives the same model."""
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None and getattr(decoder, "text_projection", None) is not None:
        with torch.no_grad():
            decoder.text_projection.normal_(std=decoder.width ** -0.5)


def image_input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype images must have for the image tower: that of its first convolution or linear layer.
    Under --precision fp16/bf16 open_clip casts those but keeps norms and embeddings fp32, so the model's
    first parameter does not tell."""
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    tower = getattr(model, "visual", model)
    dtype = next((m.weight.dtype for m in tower.modules() if isinstance(m, layers)), None)
    return dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def uses_channels_last(model: torch.nn.Module, requested: Optional[bool]) -> bool:
    """`--channels-last` as asked, else on for ResNet image towers: their convolutions run faster
    in that layout on GPUs and CPUs alike (docs/performance.md); a ViT has one convolution only."""
    from open_clip.modified_resnet import ModifiedResNet

    return requested if requested is not None else isinstance(model.visual, ModifiedResNet)


def is_gain_or_bias(name: str, parameter: torch.Tensor) -> bool:
    """open_clip_train's rule: no weight decay for gains, biases, norms and the temperature."""
    return parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in trainable if is_gain_or_bias(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in trainable if not is_gain_or_bias(n, p)], "weight_decay": weight_decay},
    ]


def fused_adamw_available(device_type: str) -> bool:
    """torch has fused AdamW kernels for CUDA, and for the CPU from torch 2.4; other devices get the default."""
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return device_type == "cuda" or device_type == "cpu" and (major, minor) >= (2, 4)


def create_timm_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """`--opt timm/NAME` as open_clip_train builds it: timm's create_optimizer_v2 on the model (timm's own
    weight-decay grouping), with betas, momentum and eps only where given."""
    try:
        from timm.optim import create_optimizer_v2
    except ImportError:
        raise AccClipError(f"--opt {config.opt} needs the timm package (pip install timm)") from None
    options = {"betas": (config.beta1, config.beta2)} if config.beta1 is not None else {}
    if config.momentum is not None:
        options["momentum"] = config.momentum
    if config.eps is not None:
        options["eps"] = config.eps
    try:
        return create_optimizer_v2(model, config.opt.split("/", 1)[1], lr=config.lr, weight_decay=config.wd, **options)
    except (AssertionError, TypeError, ValueError) as error:  # timm's ways of saying "no such optimizer / option"
        raise AccClipError(f"--opt {config.opt}: {error}") from None


def create_optimizer(model: torch.nn.Module, config: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    if config.uses_timm_optimizer:
        return create_timm_optimizer(model, config)
    # The fused kernel makes one pass over each parameter instead of a dozen element-wise ops: on the
    # CPU it cuts the tiny model's AdamW step about fivefold (docs/performance.md).
    fused = fused_adamw_available(device_type) if config.fused_adamw is None else config.fused_adamw
    return torch.optim.AdamW(parameter_groups(model, config.wd), lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=config.eps, fused=fused or None)


def create_lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> Callable:
    """A function of the global optimizer step that sets the learning rate: stateless, so resuming is
    only a matter of knowing the step."""
    total_steps = steps_per_epoch * config.epochs
    if config.skip_scheduler:  # open_clip_train's --skip-scheduler: the optimizer keeps --lr throughout
        return lambda step: config.lr
    if config.lr_scheduler == "cosine":
        return cosine_lr(optimizer, config.lr, config.warmup, total_steps)
    if config.lr_scheduler == "const":
        return const_lr(optimizer, config.lr, config.warmup, total_steps)
    cooldown_steps = steps_per_epoch * config.epochs_cooldown
    return const_lr_cooldown(optimizer, config.lr, config.warmup, total_steps, cooldown_steps,
                             config.lr_cooldown_power, config.lr_cooldown_end)


def clamp_logit_scale(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

"""The open_clip model, its transforms and tokenizer, tower locking and the distillation teacher, as
open_clip_train sets them up."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from open_clip import create_model_and_transforms, get_model_config, get_tokenizer

from acc_clip.errors import CheckpointError, UsageError
from acc_clip.model.options import LOCAL_DIR, ModelOptions, create_kwargs
from acc_clip.model.weights import load_weights

LOGIT_SCALE_MAX = math.log(100)  # CLIP's clamp: temperature at most 100


@dataclass
class ModelBundle:
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip looks for in a local-dir: folder


def local_dir_folder(name: str, flag: str) -> str | None:
    """The folder of a local-dir: model name (None for other names); a folder that is not there is one line."""
    if not name.startswith(LOCAL_DIR):
        return None
    folder = name[len(LOCAL_DIR) :]
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {name}: no such folder")
    return folder


def is_local_weights(pretrained: str) -> bool:
    """A path to weights on this machine (a file, or an acc_clip checkpoint folder), not a pretrained tag."""
    return bool(pretrained) and os.path.exists(pretrained)


def open_clip_model(name: str, pretrained: str, model_flag: str, weights_flag: str, **kwargs):
    """open_clip's model, transforms and all, with its weights: a pretrained tag (open_clip's), a local
    file or acc_clip checkpoint folder (loaded here, `load_weights`), or those in a local-dir: folder.
    open_clip ignores a pretrained argument beside a local-dir: name; here a local file is loaded
    over the folder's weights rather than dropped. Errors name the flags."""
    local_dir_folder(name, model_flag)
    local = is_local_weights(pretrained)
    if pretrained and os.path.sep in pretrained and not local:
        raise CheckpointError(f"{weights_flag} {pretrained}: no such file")
    kwargs = {"precision": "fp32", **kwargs}
    try:
        model, preprocess_train, preprocess_val = create_model_and_transforms(
            name, None if local else pretrained or None, device="cpu", output_dict=True, **kwargs
        )
    except (RuntimeError, ValueError, FileNotFoundError) as error:  # open_clip's ways of saying bad name/weights
        # open_clip's unknown-name message lists every model it has (kilobytes): keep its start.
        message = str(error) if len(str(error)) <= 300 else f"{str(error)[:300]}... (see open_clip.list_models())"
        raise UsageError(f"{model_flag} {name} {weights_flag} {pretrained!r}: {message}") from None
    except TypeError as error:  # an option open_clip's classes do not take, e.g. --aug-cfg bogus=1
        raise UsageError(f"{model_flag} {name}: {error}") from None
    if local:
        load_weights(model, pretrained, weights_flag)
    return model, preprocess_train, preprocess_val


def has_weights(name: str, pretrained: str, flag: str) -> bool:
    if pretrained:
        return True
    folder = local_dir_folder(name, flag)
    return folder is not None and any(entry.endswith(WEIGHT_SUFFIXES) for entry in os.listdir(folder))


def create_model(options: ModelOptions, *, precision: str, seed: int, **overrides: Any) -> ModelBundle:
    """The model, its transforms and tokenizer. Seeds the global RNGs with `seed` first, as open_clip_train
    does, so the same seed gives the same initial weights in both trainers. `overrides`: further arguments
    to open_clip (an objective's, e.g. SigLIP's initial logit scale and bias)."""
    from accelerate.utils import set_seed

    set_seed(seed)
    model, preprocess_train, preprocess_val = open_clip_model(
        options.model,
        options.pretrained,
        "--model",
        "--pretrained",
        **{**create_kwargs(options, precision), **overrides},
    )
    check_coca(model, options.model, precision)
    if not has_weights(options.model, options.pretrained, "--model"):
        initialise_coca_decoder_projection(model)
    lock_towers(model, options)
    if options.grad_checkpointing:
        model.set_grad_checkpointing()
    return ModelBundle(model, preprocess_train, preprocess_val, create_tokenizer(options))


def create_tokenizer(options: ModelOptions) -> Callable:
    """open_clip_train's: with --force-context-length the texts are tokenised to that length."""
    return get_tokenizer(
        options.model, **({"context_length": options.force_context_length} if options.force_context_length else {})
    )


def lock_towers(model: Any, options: ModelOptions) -> None:
    """--lock-image and --lock-text, as open_clip_train applies them."""
    if options.lock_image:
        try:
            model.lock_image_tower(
                unlocked_groups=options.lock_image_unlocked_groups, freeze_bn_stats=options.lock_image_freeze_bn_stats
            )
        except AssertionError as error:  # open_clip's way of saying "not for this tower"
            raise UsageError(
                f"--lock-image-unlocked-groups {options.lock_image_unlocked_groups} with --model "
                f"{options.model}: {error}"
            ) from None
    if options.lock_text:
        try:
            model.lock_text_tower(
                unlocked_layers=options.lock_text_unlocked_layers,
                freeze_layer_norm=options.lock_text_freeze_layer_norm,
            )
        except AssertionError as error:  # CLIP's built-in text tower: layer norms can only be frozen with the rest
            raise UsageError(
                f"--lock-text with --model {options.model}: {error} (add --lock-text-freeze-layer-norm)"
            ) from None


def create_teacher(name: str, pretrained: str | None, *, precision: str, device: Any) -> torch.nn.Module:
    """A distillation teacher (--distill-model, --distill-pretrained): frozen, in eval mode, on `device`, in the
    run's precision, as open_clip_train creates it (under fp16/bf16 it reads the student's cast inputs). It is
    not part of the trained model, so it is never wrapped, optimised or saved."""
    if (
        local_dir_folder(name, "--distill-model") is None
        and not name.startswith("hf-hub:")
        and get_model_config(name) is None
    ):
        raise UsageError(f"--distill-model {name}: open_clip has no model of that name (open_clip.list_models())")
    if not has_weights(name, pretrained or "", "--distill-model"):
        raise UsageError(
            f"--distill-model {name}: the teacher has no weights; give "
            "--distill-pretrained (a tag or a local file) or a local-dir: folder that holds them"
        )
    teacher, _, _ = open_clip_model(
        name, pretrained or "", "--distill-model", "--distill-pretrained", precision=precision
    )
    return teacher.requires_grad_(False).eval().to(device)


def check_coca(model: torch.nn.Module, name: str, precision: str) -> None:
    """open_clip_train picks the CoCa loss by the model's name; a CoCa model under another name (an exported
    local-dir: folder, say) would silently train without its caption loss, and a CLIP model under a coca name
    would fail in the loss. Both are one line here. open_clip's CoCa pooler also fails on weights cast by
    --precision fp16/bf16 (dtype mismatch in its attention); refuse that before training."""
    from open_clip import CoCa

    is_coca_name = "coca" in name.lower()
    if isinstance(model, CoCa) != is_coca_name:
        raise UsageError(
            f"--model {name}: "
            + (
                "a CoCa model whose name lacks 'coca', so open_clip_train's rule would train it without its caption "
                "loss; name its folder with coca"
                if isinstance(model, CoCa)
                else "the name holds 'coca', which selects the CoCa loss (open_clip_train's rule), but the model has "
                "no caption decoder; rename its folder"
            )
        )
    if isinstance(model, CoCa) and precision in ("fp16", "bf16"):
        raise UsageError(
            f"--precision {precision} with a CoCa model: open_clip's CoCa fails on weights cast "
            "this way; use amp, amp_bf16 or pure_" + precision
        )


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
            decoder.text_projection.normal_(std=decoder.width**-0.5)


def image_input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype images must have for the image tower: that of its first convolution or linear layer.
    Under --precision fp16/bf16 open_clip casts those but keeps norms and embeddings fp32, so the model's
    first parameter does not tell."""
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    tower = getattr(model, "visual", model)
    dtype = next((m.weight.dtype for m in tower.modules() if isinstance(m, layers)), None)
    return dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def uses_channels_last(model: torch.nn.Module, requested: bool | None) -> bool:
    """`--channels-last` as asked, else on for ResNet image towers: their convolutions run faster
    in that layout on GPUs and CPUs alike (docs/performance.md); a ViT has one convolution only."""
    from open_clip.modified_resnet import ModifiedResNet

    return requested if requested is not None else isinstance(model.visual, ModifiedResNet)


def clamp_logit_scale(model: Any) -> None:
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

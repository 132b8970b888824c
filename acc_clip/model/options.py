"""The model's options: which open_clip model, its weights, the overrides open_clip_train passes to
`create_model_and_transforms`, and how the towers train (locking, activation checkpointing, memory
layout). Those that change the architecture or the preprocessing are recorded in every checkpoint
(`recorded`), so evaluation and export rebuild the model that was trained."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from acc_clip.config.schema import (
    FINITE,
    NON_EMPTY,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_FINITE,
    Domain,
    Needs,
    Section,
    option,
)
from acc_clip.errors import UsageError

LOCAL_DIR = "local-dir:"
DROPOUT = Domain("within [0, 1)", lambda v: 0 <= v < 1, ("1.0", "-0.1"))  # open_clip asserts 0 <= p < 1
LOCK_IMAGE = Needs("--lock-image", lambda s: s.lock_image)
LOCK_TEXT = Needs("--lock-text", lambda s: s.lock_text)


@dataclass
class ModelOptions(Section):
    title: ClassVar[str] = "model"
    model: str = option(
        "RN50", "open_clip model name, or local-dir:PATH holding open_clip_config.json", domain=NON_EMPTY
    )
    pretrained: str = option("", "pretrained tag or local weights file; empty for random init", train_only=True)
    pretrained_image: bool = option(
        False, "load ImageNet weights into the image tower (timm towers), as open_clip", train_only=True
    )
    cache_dir: str | None = option(None, "where open_clip caches downloaded weights")
    force_image_size: list[int] | None = option(
        None, "override the model's image size (one value, or height width)", domain=POSITIVE
    )
    force_context_length: int | None = option(
        None,
        "override the text tower's context length",
        domain=Domain("at least 2 tokens (start, end)", lambda v: v >= 2, ("1", "0")),
    )
    force_quick_gelu: bool = option(False, "use QuickGELU (as OpenAI's weights expect)")
    force_patch_dropout: float | None = option(
        None, "override the ViT patch dropout in training (evaluation runs without it)", domain=DROPOUT
    )
    force_custom_text: bool = option(False, "build the text tower as a separate module (CustomTextCLIP)")
    image_mean: list[float] | None = option(
        None, "override the normalisation mean (one value per channel)", domain=FINITE
    )
    image_std: list[float] | None = option(
        None, "override the normalisation std (one value per channel)", domain=POSITIVE_FINITE
    )
    image_interpolation: str | None = option(
        None, "resize interpolation: bicubic, bilinear or random", choices=("bicubic", "bilinear", "random")
    )
    image_resize_mode: str | None = option(
        None, "evaluation resize: shortest, longest or squash", choices=("shortest", "longest", "squash")
    )
    aug_cfg: dict = option(
        {},
        "training augmentation, key=value pairs (open_clip's AugmentationCfg: "
        "scale=(0.9,1.0) color_jitter=... re_prob=...)",
        train_only=True,
    )
    lock_image: bool = option(False, "freeze the image tower", train_only=True)
    lock_image_unlocked_groups: int = option(
        0, "leave the last N image layer groups trainable", domain=NON_NEGATIVE, needs=LOCK_IMAGE, train_only=True
    )
    lock_image_freeze_bn_stats: bool = option(
        False, "freeze batch-norm statistics of locked image layers", needs=LOCK_IMAGE, train_only=True
    )
    lock_text: bool = option(False, "freeze the text tower", train_only=True)
    lock_text_unlocked_layers: int = option(
        0, "leave the last N text layers trainable", domain=NON_NEGATIVE, needs=LOCK_TEXT, train_only=True
    )
    lock_text_freeze_layer_norm: bool = option(
        False, "freeze layer-norm parameters of locked text layers", needs=LOCK_TEXT, train_only=True
    )
    grad_checkpointing: bool = option(False, "activation checkpointing (less memory, more compute)", train_only=True)
    channels_last: bool | None = option(
        None,
        "channels_last memory format (default: on for ResNet image "
        "towers, where it is faster; --no-channels-last turns it off)",
        tristate=True,
        train_only=True,
    )

    def check(self) -> None:
        size = self.force_image_size
        if size is not None and len(size) not in (1, 2):
            raise UsageError(f"--force-image-size {' '.join(map(str, size))}: one positive size, or height and width")
        for key in ("image_mean", "image_std"):
            values = getattr(self, key)
            if values is not None and len(values) not in (1, 3):
                raise UsageError(
                    f"--{key.replace('_', '-')} {' '.join(map(str, values))}: one value, or one per channel (3)"
                )

    @property
    def is_coca(self) -> bool:
        """open_clip_train's rule: a model whose name says coca trains with the CoCa loss."""
        return "coca" in self.model.lower()


def create_kwargs(options: ModelOptions, precision: str) -> dict[str, Any]:
    """open_clip_train's arguments to create_model_and_transforms beyond the name and weights."""
    size = options.force_image_size
    return dict(
        precision=precision,
        force_quick_gelu=options.force_quick_gelu,
        force_custom_text=options.force_custom_text,
        force_patch_dropout=options.force_patch_dropout,
        force_image_size=size[0] if size is not None and len(size) == 1 else size,
        force_context_length=options.force_context_length,
        image_mean=options.image_mean,
        image_std=options.image_std,
        image_interpolation=options.image_interpolation,
        image_resize_mode=options.image_resize_mode,
        aug_cfg=options.aug_cfg,
        pretrained_image=options.pretrained_image,
        cache_dir=options.cache_dir,
    )


# Options of a run -> where open_clip's config keeps them (as its create_model applies them).
MODEL_CFG_OPTIONS = {
    "force_quick_gelu": ("quick_gelu",),
    "force_custom_text": ("custom_text",),
    "force_image_size": ("vision_cfg", "image_size"),
    "force_patch_dropout": ("vision_cfg", "patch_dropout"),
    "force_context_length": ("text_cfg", "context_length"),
}
PREPROCESS_OPTIONS = {
    "image_mean": "mean",
    "image_std": "std",
    "image_interpolation": "interpolation",
    "image_resize_mode": "resize_mode",
}
RECORDED_OPTIONS = (*MODEL_CFG_OPTIONS, *PREPROCESS_OPTIONS)


def recorded(options: ModelOptions) -> dict[str, Any]:
    """What changes the architecture or preprocessing beyond the model's own config: each checkpoint's
    manifest keeps it (`model_options`), export writes it into open_clip's config, and `acc-clip eval`
    builds the model with it."""
    return {key: getattr(options, key) for key in RECORDED_OPTIONS if getattr(options, key)}


def with_model_options(config: dict, options: dict) -> dict:
    """open_clip_config.json's content with the run's recorded model options written in, so that the
    folder alone builds the model that was trained."""
    config = json.loads(json.dumps(config))  # a copy
    for key, value in options.items():
        if key in MODEL_CFG_OPTIONS and value:
            *parents, leaf = MODEL_CFG_OPTIONS[key]
            section = config["model_cfg"]
            for parent in parents:
                section = section.setdefault(parent, {})
            section[leaf] = value[0] if key == "force_image_size" and len(value) == 1 else value
        elif key in PREPROCESS_OPTIONS and value is not None:
            config.setdefault("preprocess_cfg", {})[PREPROCESS_OPTIONS[key]] = value
    return config

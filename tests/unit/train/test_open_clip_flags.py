"""Every flag of open_clip_train 3.3, read from its own argument parser in the installed package: acc_clip
accepts it with a value of the right type and resolves it to the same value, or refuses it in one line that
names it and says why (REFUSED_FLAGS). Defaults resolve as open_clip_train resolves them (the ViT AdamW
settings included), and the optimizer and learning-rate schedule that each trainer would build from the
same command agree. A failing test names the flags that fall short."""

from __future__ import annotations

import argparse

import pytest
import torch

from acc_clip.config.schema import flag
from acc_clip.errors import AccClipError
from acc_clip.runtime.device import REFUSED_FLAGS
from acc_clip.train.config import parse_train_config as parse_config

TRAIN = ["--train-data", "x.csv"]
# A value of the flag's type for flags whose type alone does not give a valid one, and the flags they need
# beside them in both trainers.
SAMPLE_VALUES = {
    "--model": ["ViT-B-32"],
    "--device": ["cpu"],
    "--opt": ["adamw"],
    "--lr-scheduler": ["const"],
    "--loss-dist-impl": ["shift"],
    "--dist-url": ["env://"],
    "--dist-backend": ["gloo"],
    "--report-to": ["tensorboard"],
    "--resume": ["latest"],
    "--aug-cfg": ["scale=(0.9,1.0)", "re_prob=0.25"],
    "--image-mean": ["0.5", "0.4", "0.3"],
    "--image-std": ["0.2", "0.3", "0.25"],
    "--force-image-size": ["224"],
    "--train-data-upsampling-factors": ["1::2"],
    "--train-data": ["a/{0..3}.tar::b/{0..1}.tar"],
    "--val-data": ["/data/val.csv"],  # a path whose kind its name says: acc_clip picks the reader at start
    "--use-bnb-linear": ["SwitchBackLinear"],
    "--csv-separator": [","],  # one character (checked at start-up)
    "--name": ["run"],  # one folder under --logs (checked at start-up)
}
COMPANIONS = {
    "--local-loss": ["--gather-with-grad"],  # acc_clip refuses --local-loss alone: the gradient would be wrong
    "--distill-pretrained": ["--distill-model", "RN50"],
    "--train-data-upsampling-factors": ["--dataset-resampled", "--train-data", "a/{0..3}.tar::b/{0..1}.tar"],
    "--dataset-resampled": ["--train-data", "a/{0..3}.tar"],  # a flag of shards: refused on CSV data
}


def open_clip_parser() -> argparse.ArgumentParser:
    """open_clip_train's parser as its parse_args builds it (the function builds and uses it in one go)."""
    from open_clip_train import params

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        return original(self, args, namespace)

    argparse.ArgumentParser.parse_args = capture
    try:
        params.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


OPEN_CLIP_FLAGS = [action for action in open_clip_parser()._actions if action.option_strings and action.dest != "help"]


def sample_argv(action: argparse.Action) -> list[str]:
    option = action.option_strings[0]
    if action.nargs == 0:
        value = []
    elif option in SAMPLE_VALUES:
        value = SAMPLE_VALUES[option]
    elif action.choices:
        value = [list(action.choices)[-1]]
    elif action.type is int:
        value = ["3"]
    elif action.type is float:
        value = ["0.25"] * (2 if action.nargs == "+" else 1)
    else:
        value = ["/data/x"]
    return [*COMPANIONS.get(option, []), option, *value]


# Flags acc_clip widened to take several items, one of which has open_clip's meaning: `--val-data PATH` is
# the list of that one set (several named sets: evaluation/sets.py).
WIDENED_TO_LISTS = {"val_data"}


def test_open_clip_train_defines_the_flags_this_test_knows():
    assert len(OPEN_CLIP_FLAGS) == 90  # open_clip_train 3.3.0; another version may add flags to look at


def test_every_flag_is_accepted_with_its_meaning_or_refused_in_one_line():
    from open_clip_train.params import parse_args

    short = []
    for action in OPEN_CLIP_FLAGS:
        argv = sample_argv(action)
        option, key = action.option_strings[0], action.dest
        theirs = getattr(parse_args([*TRAIN, *argv]), key)
        try:
            ours, _ = parse_config([*TRAIN, *argv])
        except AccClipError as error:
            if key not in REFUSED_FLAGS:
                short.append(f"{option}: refused ({error})")
            elif f"--{flag(key)}" not in str(error) or "\n" in str(error):
                short.append(f"{option}: the refusal does not name the flag in one line ({error})")
            continue
        if key in REFUSED_FLAGS:
            short.append(f"{option}: accepted although listed as refused")
        elif ours.value(key) != theirs and not (key in WIDENED_TO_LISTS and ours.value(key) == [theirs]):
            short.append(f"{option} {' '.join(argv)}: acc_clip resolves {ours.value(key)!r}, open_clip {theirs!r}")
    assert not short, "flags that fall short:\n" + "\n".join(short)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--model", "ViT-B-32"],
        ["--model", "local-dir:/models/tiny-vit"],
        ["--model", "ViT-B-16", "--beta2", "0.95"],
        ["--model", "RN50", "--eps", "1e-5"],
        ["--opt", "timm/sgd", "--lr", "0.1"],
        ["--opt", "timm/lamb", "--lr", "1e-3", "--beta1", "0.9", "--beta2", "0.99"],
    ],
)
def test_optimisation_defaults_resolve_as_open_clip_train_resolves_them(argv):
    """The model's name decides AdamW's beta2 and eps (0.98 and 1e-6 when it holds "vit", as open_clip_train's
    get_default_params), unless given; a timm optimizer keeps its own defaults (None here)."""
    from open_clip_train.params import parse_args

    theirs = parse_args([*TRAIN, *argv])
    ours, _ = parse_config([*TRAIN, *argv])
    for key in ("lr", "beta1", "beta2", "eps", "wd", "momentum", "opt"):
        assert ours.value(key) == getattr(theirs, key), key


def test_every_shared_default_is_open_clip_train_s(tmp_path):
    """Defaults of every shared flag, after each trainer's own resolution. --device is acc_clip's one
    deliberate difference: unset, it takes SDAA, else CUDA, else the CPU (open_clip: cuda). --csv-separator
    defaults to auto, which resolves to open_clip's tab unless the header holds a comma and no tab."""
    from open_clip_train.params import parse_args

    from acc_clip.data.csv_file import detect_separator

    theirs = vars(parse_args(TRAIN))
    ours, _ = parse_config(TRAIN)
    flat = ours.flat()
    differing = {
        key: (flat[key], value)
        for key, value in theirs.items()
        if key not in ("device", "csv_separator") and key in flat and flat[key] != value
    }
    assert not differing
    assert flat["csv_separator"] == "auto"
    tab_file = tmp_path / "tab.csv"
    tab_file.write_text("filepath\ttitle\na.jpg\ta, b\n")
    assert detect_separator(str(tab_file)) == theirs["csv_separator"] == "\t"


def built_optimizer_and_schedule(config, model: torch.nn.Module):
    from acc_clip.model.optim import create_lr_schedule, create_optimizer

    optimizer = create_optimizer(model, config.optimizer, "cpu")
    schedule = create_lr_schedule(optimizer, config.optimizer, epochs=config.training.epochs, steps_per_epoch=10)
    return optimizer, [schedule(step) for step in (0, 3, 9, 25, 60)]


def open_clip_built(args, model: torch.nn.Module):
    """What open_clip_train's main builds from `args` (its code path, called through its own functions
    where it has them: timm's create_optimizer_v2, open_clip_train.scheduler)."""
    from open_clip_train.scheduler import const_lr, cosine_lr

    if args.opt.startswith("timm/"):
        from timm.optim import create_optimizer_v2

        extra = {"momentum": args.momentum} if args.momentum is not None else {}
        optimizer = create_optimizer_v2(
            model, args.opt.split("timm/")[-1], lr=args.lr, weight_decay=args.wd, eps=args.eps, **extra
        )
    else:
        from acc_clip.model.optim import is_gain_or_bias  # open_clip_train's rule, asserted against it in test_optim.py

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for n, p in named if is_gain_or_bias(n, p)], "weight_decay": 0.0},
                {"params": [p for n, p in named if not is_gain_or_bias(n, p)], "weight_decay": args.wd},
            ],
            lr=args.lr,
            betas=(args.beta1, args.beta2),
            eps=args.eps,
        )
    total = 10 * args.epochs
    if args.skip_scheduler:
        return optimizer, [args.lr] * 5
    make = cosine_lr if args.lr_scheduler == "cosine" else const_lr
    schedule = make(optimizer, args.lr, args.warmup, total)
    return optimizer, [schedule(step) for step in (0, 3, 9, 25, 60)]


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [
        {
            k: v
            for k, v in group.items()
            if k
            not in ("params", "fused", "foreach", "capturable", "differentiable", "maximize", "decoupled_weight_decay")
        }
        for group in optimizer.param_groups
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "ViT-B-32-tiny"],
        ["--model", "RN50-tiny", "--warmup", "5", "--epochs", "7"],
        ["--model", "ViT-B-32-tiny", "--skip-scheduler", "--lr", "1e-3"],
        ["--lr-scheduler", "const", "--warmup", "4"],
        ["--opt", "timm/sgd", "--lr", "0.1", "--momentum", "0.9", "--wd", "0.01"],
    ],
)
def test_each_trainer_builds_the_same_optimizer_and_schedule(argv):
    """The optimizer (type, every group's hyperparameters) and the learning rate at several steps, built by
    each from the same command line. The model is small; the names only pick the defaults."""
    from open_clip_train.params import parse_args

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    args = parse_args([*TRAIN, "--epochs", "7", *argv])
    config, _ = parse_config([*TRAIN, "--epochs", "7", *argv, "--no-fused-adamw"])
    ours, our_lrs = built_optimizer_and_schedule(config, model)
    theirs, their_lrs = open_clip_built(args, model)
    assert type(ours) is type(theirs)
    assert hyperparameters(ours) == hyperparameters(theirs)
    assert our_lrs == their_lrs


@pytest.mark.parametrize("key", sorted(REFUSED_FLAGS))
def test_refused_flags_say_why_and_what_instead(key):
    action = next(a for a in OPEN_CLIP_FLAGS if a.dest == key)
    with pytest.raises(AccClipError) as error:
        parse_config([*TRAIN, *sample_argv(action)])
    assert str(error.value).startswith(f"--{flag(key)}: ") and len(str(error.value)) > 40

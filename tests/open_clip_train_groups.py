"""open_clip_train 3.3 trained with open_clip main's optimizer groups, for the layer-decay parity test
(tests/integration/test_parity_groups.py): open_clip_train 3.3 has no layer decay, so in this process only

- its AdamW is built over the groups acc_clip forms for its model (acc_clip.model.param_groups, the function
  behind acc_clip's param_groups.json), each starting at --lr times its lr_scale; the parameters it would have
  optimised must be exactly those (checked);
- its scheduler's `assign_learning_rate` sets each group's lr times its lr_scale (open_clip main's rule);

then `open_clip_train.main.main` runs on the rest of the command line. Usage:
    python tests/open_clip_train_groups.py [--image-layer-decay D] [--text-layer-decay D] [--wd-exclude GLOB ...]
        --groups-out FILE -- OPEN_CLIP_TRAIN_FLAGS...
FILE receives every parameter's (lr_scale, weight_decay) by name, to compare with acc_clip's param_groups.json."""

from __future__ import annotations

import argparse
import json
import sys
import types

import open_clip_train.main as open_clip_main
import open_clip_train.scheduler as open_clip_scheduler
import torch

from acc_clip.model.param_groups import decayed_layers, main_rule_groups


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-layer-decay", type=float)
    parser.add_argument("--text-layer-decay", type=float)
    parser.add_argument("--wd-exclude", nargs="+", default=[])
    parser.add_argument("--groups-out", required=True)
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def scaled_assign_learning_rate(optimizer, new_lr):
    for group in optimizer.param_groups:
        group["lr"] = new_lr * group.get("lr_scale", 1.0)


def grouped_adamw(options: argparse.Namespace, models: list):
    """An AdamW class taking open_clip_train's two groups and building main's instead, for the model it made."""

    class GroupedAdamW(torch.optim.AdamW):
        def __init__(self, given_groups, lr, **kwargs):
            model = models[0]
            weight_decay = max(group["weight_decay"] for group in given_groups)
            layers = decayed_layers(model, options.image_layer_decay, options.text_layer_decay)
            groups = main_rule_groups(model, weight_decay, layers, options.wd_exclude, None)
            given = {id(p) for group in given_groups for p in group["params"]}
            assert given == {id(p) for group in groups for p in group["params"]}, "other parameters than 3.3's"
            for group in groups:
                group["lr"] = lr * group["lr_scale"]
            names = {id(p): n for n, p in model.named_parameters()}
            record = {names[id(p)]: [g["lr_scale"], g["weight_decay"]] for g in groups for p in g["params"]}
            with open(options.groups_out, "w") as file:
                json.dump(record, file, indent=1)
            super().__init__(groups, lr=lr, **kwargs)

    return GroupedAdamW


def main(argv: list[str]) -> None:
    options, open_clip_argv = parse(argv)
    models: list = []
    create = open_clip_main.create_model_and_transforms

    def create_and_keep(*args, **kwargs):
        made = create(*args, **kwargs)
        models.append(made[0])  # the first is the trained model (a distillation teacher comes second)
        return made

    open_clip_main.create_model_and_transforms = create_and_keep
    open_clip_main.optim = types.SimpleNamespace(AdamW=grouped_adamw(options, models))  # type: ignore[assignment]
    open_clip_scheduler.assign_learning_rate = scaled_assign_learning_rate
    open_clip_main.main(open_clip_argv)


if __name__ == "__main__":
    main(sys.argv[1:])

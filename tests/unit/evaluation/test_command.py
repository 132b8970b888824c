"""`acc-clip eval` and `acc-clip export` take training's flag definitions: every flag they share with
`acc-clip train` has training's type, default, help, choices and domain, in the options and in the
argparse parser each command builds from them. (How eval builds the model a step checkpoint records is
tested end to end in tests/integration/test_train_eval.py.)"""

from __future__ import annotations

import argparse

import pytest

from acc_clip.checkpoint.export import ExportOptions
from acc_clip.config.parsing import build_parser, command_options
from acc_clip.errors import UsageError
from acc_clip.evaluation import command as eval_command
from acc_clip.train import config as train_config


def definitions(sections, *, train: bool) -> dict:
    """{name: everything that defines the option} of a command's sections."""
    return {
        option.name: (
            option.kind,
            option.element,
            option.optional,
            option.default,
            option.help,
            option.choices,
            option.domain,
            option.tristate,
            option.positional,
        )
        for option in command_options(sections, train=train)
    }


def parser_arguments(parser: argparse.ArgumentParser) -> dict:
    """{dest: what argparse does with the flag} for a built parser (--help and --config left out)."""
    return {
        action.dest: (
            tuple(action.option_strings),
            action.type,
            action.default,
            action.help,
            action.choices,
            action.nargs,
            action.const,
            type(action),
        )
        for action in parser._actions
        if action.dest not in ("help", "config")
    }


TRAIN = definitions(train_config.sections(), train=True)
COMMANDS = {
    "eval": (eval_command.sections(), lambda: build_parser("acc-clip eval", "", eval_command.sections(), train=False)),
    "export": ([ExportOptions], lambda: build_parser("acc-clip export", "", [ExportOptions], train=False)),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_a_command_shares_with_train_has_trains_definition(command):
    sections, parser = COMMANDS[command]
    own = definitions(sections, train=False)
    shared = sorted(own.keys() & TRAIN.keys())
    assert {name: own[name] for name in shared} == {name: TRAIN[name] for name in shared}
    train_parser = parser_arguments(build_parser("acc-clip train", "", train_config.sections(), train=True))
    assert {name: parser_arguments(parser())[name] for name in shared} == {name: train_parser[name] for name in shared}
    if command == "eval":  # what the comparison covers: the data, model, objective, evaluation and device flags
        assert {
            "batch_size",
            "workers",
            "csv_separator",
            "model",
            "force_quick_gelu",
            "image_mean",
            "siglip",
            "val_data",
            "zeroshot_data",
            "device",
            "precision",
        } <= set(shared)
        assert set(own) - set(shared) == {"checkpoint", "out"}  # eval's own flags
    else:  # export takes no training flag today; one it takes later must be training's
        assert set(own) == {"checkpoint", "out", "format", "ema"}


def test_eval_takes_trainings_device_workers_and_precision_defaults():
    """No `auto` device (training's --device: unset picks the machine's), 4 loader workers, amp."""
    config = eval_command.parse_eval_config(["--checkpoint", "model.pt", "--model", "RN50", "--val-data", "v.csv"])
    assert (config.value("device"), config.value("workers"), config.value("precision")) == (None, 4, "amp")
    with pytest.raises(UsageError, match="--device 'auto': must be"):
        eval_command.parse_eval_config(
            ["--checkpoint", "model.pt", "--model", "RN50", "--val-data", "v.csv", "--device", "auto"]
        )

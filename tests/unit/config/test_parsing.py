"""A command's configuration from its sections (acc_clip/config/parsing.py), on a toy command: defaults, a
YAML file and flags, later wins; a value outside its domain is one line naming flag, value and domain,
from either source; unknown flags and keys name the closest; a command built with train=False refuses the
training-only options (a YAML key of one says so); `given` records what flags and YAML set; positional and
REQUIRED options. The train command's own config is tests/unit/train/test_config.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from acc_clip.config.parsing import Config, build_parser, from_values, parse, to_yaml
from acc_clip.config.schema import POSITIVE, POSITIVE_FINITE, REQUIRED, UNIT_INTERVAL, Section, option
from acc_clip.errors import UsageError


@dataclass
class Reading(Section):
    title: ClassVar[str] = "reading"
    batch_size: int = option(4, "samples per batch", domain=POSITIVE)
    max_bad_fraction: float = option(0.01, "bad samples allowed", domain=UNIT_INTERVAL)
    image_mean: list[float] | None = option(None, "per-channel mean")
    mode: str = option("fast", "how to read", choices=("fast", "slow"))
    verbose: bool = option(False, "say more")
    pin: bool | None = option(None, "pin memory (default: the device decides)", tristate=True)
    aug: dict = option({}, "key=value pairs")

    def check(self) -> None:
        if self.mode == "slow" and self.batch_size > 64:
            raise UsageError(f"--mode slow takes --batch-size 64 at most, got {self.batch_size}")


@dataclass
class Training(Section):
    title: ClassVar[str] = "training"
    epochs: int = option(3, "training epochs", domain=POSITIVE, train_only=True)
    lr: float | None = option(None, "learning rate", domain=POSITIVE_FINITE, train_only=True)


@dataclass
class Files(Section):
    title: ClassVar[str] = "files"
    path: str = option(REQUIRED, "the input", positional=True)
    out: str = option(REQUIRED, "where to write")


SECTIONS = [Reading, Training]


def run(argv, *, train=True, sections=SECTIONS, defaults=None) -> Config:
    return parse(argv, sections, prog="toy", description="a toy command", train=train, defaults=defaults)


def yaml_file(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def one_line_error(argv, **kwargs) -> str:
    with pytest.raises(UsageError) as error:
        run(argv, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_defaults_then_yaml_then_flags_later_wins(tmp_path):
    config = run([])
    assert (config[Reading].batch_size, config[Training].epochs, config[Training].lr) == (4, 3, None)
    path = yaml_file(tmp_path, "batch-size: 8\nepochs: 5\nlr: 1\nimage_mean: 0.5\n")
    config = run(["--config", path, "--batch-size", "16"])
    assert (config[Reading].batch_size, config[Training].epochs) == (16, 5)
    # YAML's int for a float option, and a scalar for a list, take the option's type.
    assert config[Training].lr == 1.0 and isinstance(config[Training].lr, float)
    assert config[Reading].image_mean == [0.5]


def test_yaml_scientific_notation_without_a_dot_is_a_float(tmp_path):
    """YAML 1.1 reads `5e-4` as a string; it is the float open_clip_train's flag gives."""
    assert run(["--config", yaml_file(tmp_path, "lr: 5e-4\n")])[Training].lr == 5e-4


@pytest.mark.parametrize(
    "flags, yaml_text, message",
    [
        (["--batch-size", "0"], "batch_size: 0\n", "--batch-size 0: must be at least 1"),
        (["--max-bad-fraction", "2.0"], "max-bad-fraction: 2.0\n", "--max-bad-fraction 2.0: must be within [0, 1]"),
        (["--lr", "-1"], "lr: -1\n", "--lr -1.0: must be a finite number above 0"),
        (["--epochs", "0"], "epochs: 0\n", "--epochs 0: must be at least 1"),
    ],
)
def test_a_domain_violation_is_one_line_naming_flag_value_and_domain_from_flags_and_yaml(
    tmp_path, flags, yaml_text, message
):
    assert one_line_error(flags) == message
    assert one_line_error(["--config", yaml_file(tmp_path, yaml_text)]) == message


def test_a_value_outside_the_choices_or_of_the_wrong_type_is_one_line_from_either_source(tmp_path):
    assert one_line_error(["--mode", "medium"]).startswith("argument --mode: invalid choice: 'medium' (choose from ")
    assert (
        one_line_error(["--config", yaml_file(tmp_path, "mode: medium\n")])
        == "--mode 'medium': expected one of fast, slow"
    )
    assert one_line_error(["--batch-size", "two"]) == "argument --batch-size: invalid int value: 'two'"
    assert (
        one_line_error(["--config", yaml_file(tmp_path, "batch_size: two\n")])
        == "option 'batch_size': expected int, got 'two'"
    )
    # YAML's yes/no and 0/1 are not taken for each other: a bool option wants a bool, a number a number.
    assert one_line_error(["--config", yaml_file(tmp_path, "verbose: 1\n")]) == "option 'verbose': expected bool, got 1"
    assert (
        one_line_error(["--config", yaml_file(tmp_path, "batch_size: yes\n")])
        == "option 'batch_size': expected int, got True"
    )


def test_a_section_s_own_rule_is_checked_whatever_the_source(tmp_path):
    message = "--mode slow takes --batch-size 64 at most, got 128"
    assert one_line_error(["--mode", "slow", "--batch-size", "128"]) == message
    assert one_line_error(["--config", yaml_file(tmp_path, "mode: slow\nbatch_size: 128\n")]) == message
    assert run(["--mode", "slow", "--batch-size", "64"])[Reading].batch_size == 64


def test_an_unknown_flag_names_the_closest(tmp_path):
    assert one_line_error(["--batch-szie", "8"]) == "unknown option '--batch-szie'; did you mean '--batch-size'?"
    assert one_line_error(["--epoch=3"]) == "unknown option '--epoch'; did you mean '--epochs'?"
    assert one_line_error(["stray"]) == "unexpected argument 'stray'"


def test_an_unknown_yaml_key_names_the_file_and_the_closest(tmp_path):
    path = yaml_file(tmp_path, "batch_size: 8\nmax_bad_fractoin: 0.1\n")
    assert (
        one_line_error(["--config", path])
        == f"{path}: unknown key 'max_bad_fractoin'; did you mean 'max-bad-fraction'?"
    )


def test_a_yaml_file_that_is_missing_broken_or_not_a_mapping_is_named(tmp_path):
    missing = tmp_path / "none.yaml"
    assert one_line_error(["--config", str(missing)]) == f"{missing}: config file not found"
    broken = yaml_file(tmp_path, "batch_size: [8\n")
    assert one_line_error(["--config", broken]).startswith(f"{broken}: not valid YAML: ")
    listed = yaml_file(tmp_path, "- batch_size\n")
    assert one_line_error(["--config", listed]) == f"{listed}: expected a mapping of option: value at the top level"


def test_a_command_built_with_train_false_refuses_training_options(tmp_path):
    assert run(["--epochs", "5"], train=True)[Training].epochs == 5
    message = one_line_error(["--epochs", "5"], train=False)
    assert message == "--epochs is a training option, which this command does not take"
    assert "--epochs" not in build_parser("toy", "", SECTIONS, train=False).format_help()
    # A YAML key of one (a training run's config.yaml given to an evaluation, say) says what it is.
    path = yaml_file(tmp_path, "batch_size: 8\nepochs: 5\n")
    assert (
        one_line_error(["--config", path], train=False)
        == f"{path}: 'epochs' is a training option, which this command does not take"
    )
    # The section is still there, at its defaults.
    config = run(["--batch-size", "8"], train=False)
    assert config[Reading].batch_size == 8 and config[Training].epochs == 3
    with pytest.raises(UsageError, match="unknown option 'lr'"):
        from_values(SECTIONS, {"lr": 0.1}, train=False)


def test_given_records_flags_and_yaml_keys_not_defaults(tmp_path):
    assert run([]).given == frozenset()
    path = yaml_file(tmp_path, "max-bad-fraction: 0.5\nepochs: 3\n")  # epochs at its default value: still given
    config = run(["--config", path, "--lr", "0.1", "--no-pin"], defaults={"batch_size": 32})
    assert config.given == {"max_bad_fraction", "epochs", "lr", "pin"}
    assert config[Reading].batch_size == 32 and config[Reading].pin is False  # a default that stands in: not given
    assert from_values(SECTIONS, {"epochs": 7}).given == {"epochs"}


def test_flag_kinds_store_true_tristate_list_and_key_values():
    config = run(
        ["--verbose", "--pin", "--image-mean", "0.5", "0.4", "0.3", "--aug", "scale=(0.9,1.0)", "re_prob=0.25"]
    )
    reading = config[Reading]
    assert reading.verbose is True and reading.pin is True and reading.image_mean == [0.5, 0.4, 0.3]
    assert reading.aug == {"scale": (0.9, 1.0), "re_prob": 0.25}
    assert run([])[Reading].pin is None and run(["--no-pin"])[Reading].pin is False
    assert one_line_error(["--aug", "foo"]).startswith("--aug foo: expected key=value pairs")


def test_positional_and_required_options(tmp_path):
    config = run(["in.csv", "--out", "o"], sections=[Files])
    assert (config[Files].path, config[Files].out) == ("in.csv", "o")
    assert one_line_error(["in.csv"], sections=[Files]) == "--out is required"
    assert one_line_error(["--out", "o"], sections=[Files]) == "PATH is required"
    # YAML may give either; the command line still wins.
    path = yaml_file(tmp_path, "path: from_yaml.csv\nout: o\n")
    assert run(["--config", path], sections=[Files])[Files].path == "from_yaml.csv"
    assert run(["--config", path, "given.csv"], sections=[Files])[Files].path == "given.csv"
    with pytest.raises(UsageError, match=r"^--out is required$"):
        from_values([Files], {"path": "in.csv"})


def test_two_sections_may_not_define_the_same_option():
    @dataclass
    class Clash(Section):
        batch_size: int = option(1, "again")

    with pytest.raises(RuntimeError, match=r"options defined in two sections: \['batch_size'\]"):
        run([], sections=[Reading, Clash])


def test_from_values_coerces_and_checks_as_the_command_line_does():
    assert from_values(SECTIONS, {"lr": 1, "image_mean": 0.5})[Training].lr == 1.0
    with pytest.raises(UsageError, match=r"^--batch-size 0: must be at least 1$"):
        from_values(SECTIONS, {"batch_size": 0})
    with pytest.raises(UsageError, match=r"^unknown option 'batch_szie'; did you mean '--batch-size'\?$"):
        from_values(SECTIONS, {"batch_szie": 8})


def test_config_reaches_sections_by_class_and_options_by_flat_name():
    config = run(["--lr", "0.5"])
    assert Reading in config and Files not in config
    assert [type(s) for s in config.sections()] == SECTIONS
    with pytest.raises(KeyError, match="this command has no Files section"):
        config[Files]
    assert config.value("lr") == 0.5 and config.value("batch_size") == 4
    with pytest.raises(KeyError):
        config.value("nothing")
    assert list(config.flat()) == [
        "batch_size",
        "max_bad_fraction",
        "image_mean",
        "mode",
        "verbose",
        "pin",
        "aug",
        "epochs",
        "lr",
    ]


def test_to_yaml_writes_what_parsing_it_reads_back(tmp_path):
    """A run's config.yaml, given back with --config, is the same configuration (tuples become lists)."""
    config = run(["--aug", "scale=(0.9,1.0)", "--image-mean", "0.5", "--lr", "0.01", "--no-pin"])
    to_yaml(config, str(tmp_path / "config.yaml"))
    again = run(["--config", str(tmp_path / "config.yaml")])
    assert again.flat() == {**config.flat(), "aug": {"scale": [0.9, 1.0]}}

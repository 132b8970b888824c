"""Generated from the schema: every option of `acc-clip train` that declares a domain or choices refuses a value
outside it, on the command line and in a YAML file alike: exit status 2, one line naming the flag, no traceback,
and nothing built (the model is never created). The count of options covered is asserted, so an option that loses
its domain shows."""

from __future__ import annotations

import pytest
import yaml

from acc_clip.config.parsing import command_options
from acc_clip.train.config import sections

OPTIONS = [option for option in command_options(sections(), train=True) if option.refused_values()]
CASES = [(option, value) for option in OPTIONS for value in option.refused_values()]
# Options without a domain of their own (booleans, free text, paths a source checks when it reads them).
COVERED_AT_LEAST = 50


def flag_values(option, value: str) -> list[str]:
    return [f"--{option.flag}", *([value] if option.kind is not list else value.split())]


@pytest.fixture
def nothing_built(monkeypatch):
    """The model, the data and the run folder are never made when a value is refused."""
    import acc_clip.train.loop as loop

    def built(*args, **kwargs):
        raise AssertionError("built something for a refused value")

    for name in ("create_model", "build_train_data", "start_run"):
        monkeypatch.setattr(loop, name, built)


def test_the_schema_declares_domains_for_the_options_that_need_them():
    assert len(OPTIONS) >= COVERED_AT_LEAST, [option.name for option in OPTIONS]
    print(f"{len(OPTIONS)} options with a domain or choices, {len(CASES)} values tried")


@pytest.mark.parametrize("option, value", CASES, ids=[f"{o.name}={v!r}" for o, v in CASES])
def test_a_value_outside_the_domain_is_one_line_and_status_2_on_the_command_line(
    option, value, train_in_process, nothing_built
):
    status, errors = train_in_process(["--train-data", "train.csv", *flag_values(option, value)])
    assert status == 2
    assert len(errors) == 1 and f"--{option.flag}" in errors[0], errors


@pytest.mark.parametrize("option, value", CASES, ids=[f"{o.name}={v!r}" for o, v in CASES])
def test_a_value_outside_the_domain_is_one_line_and_status_2_in_yaml(
    option, value, train_in_process, nothing_built, tmp_path
):
    config = tmp_path / "config.yaml"
    yaml_value = value.split() if option.kind is list else value
    config.write_text(yaml.safe_dump({"train_data": "train.csv", option.name: yaml_value}))
    status, errors = train_in_process(["--config", str(config)])
    assert status == 2
    assert len(errors) == 1 and (f"--{option.flag}" in errors[0] or repr(option.name) in errors[0]), errors

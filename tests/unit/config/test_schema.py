"""The options schema (acc_clip/config/schema.py): what `options_of` reads from a section, the domains, and
the one line `Option.check` gives for a value outside its domain or choices."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest

from acc_clip.config.schema import (
    FINITE,
    NON_EMPTY,
    NON_NEGATIVE,
    PLAIN_NAME,
    POSITIVE,
    POSITIVE_FINITE,
    REQUIRED,
    UNIT_INTERVAL,
    Section,
    flag,
    option,
    options_of,
)
from acc_clip.errors import UsageError


@dataclass
class Sample(Section):
    title: ClassVar[str] = "sample"
    source: str = option(REQUIRED, "the input", positional=True)  # required options come first (a dataclass)
    count: int = option(1, "how many", domain=POSITIVE)
    ratio: float = option(0.5, "a fraction", domain=UNIT_INTERVAL)
    mode: str = option("fast", "how", choices=("fast", "slow"))
    sizes: list[int] | None = option(None, "one or two sizes", domain=POSITIVE)
    label: str = option("x", "a label", domain=NON_EMPTY)
    extra: dict = option({}, "key=value pairs", train_only=True)
    pinned: bool | None = option(None, "on, off or the run's choice", tristate=True)


def by_name() -> dict:
    return {o.name: o for o in options_of(Sample)}


def test_options_of_reads_each_field_in_declaration_order():
    options = options_of(Sample)
    assert [o.name for o in options] == ["source", "count", "ratio", "mode", "sizes", "label", "extra", "pinned"]
    o = by_name()
    assert (o["count"].kind, o["count"].optional, o["count"].default, o["count"].help) == (int, False, 1, "how many")
    assert (o["sizes"].kind, o["sizes"].element, o["sizes"].optional) == (list, int, True)
    assert o["mode"].choices == ("fast", "slow") and o["ratio"].domain is UNIT_INTERVAL
    assert o["extra"].kind is dict and o["extra"].train_only and not o["count"].train_only
    assert o["pinned"].kind is bool and o["pinned"].tristate and o["pinned"].optional
    assert o["source"].positional and o["source"].required and not o["count"].required
    assert all(option.section is Sample for option in options)


def test_a_dict_or_list_default_is_a_fresh_copy_for_each_instance():
    first, second = Sample(source="a"), Sample(source="b")
    first.extra["k"] = 1
    assert second.extra == {} and by_name()["extra"].default == {}


def test_flag_is_the_name_with_dashes():
    assert flag("train_data_upsampling_factors") == "train-data-upsampling-factors"
    assert by_name()["count"].flag == "count"


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("count", 0, "--count 0: must be at least 1"),
        ("ratio", 1.5, "--ratio 1.5: must be within [0, 1]"),
        ("ratio", math.nan, "--ratio nan: must be within [0, 1]"),
        ("sizes", [224, 0], "--sizes 224 0: must be at least 1"),  # a list: every element, shown as typed
        ("label", "", "--label '': must be not empty"),  # a string: shown quoted, so an empty one shows
        ("mode", "medium", "--mode 'medium': expected one of fast, slow"),
    ],
)
def test_a_value_outside_its_domain_or_choices_is_one_line_naming_flag_value_and_domain(name, value, message):
    with pytest.raises(UsageError) as error:
        by_name()[name].check(value)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "name, value",
    [
        ("count", 1),
        ("ratio", 0.0),
        ("ratio", 1),
        ("sizes", None),
        ("sizes", [1, 2]),
        ("mode", "slow"),
        ("label", "y"),
        ("pinned", None),
    ],
)
def test_values_within_the_domain_and_none_for_an_optional_option_pass(name, value):
    by_name()[name].check(value)


@pytest.mark.parametrize(
    "domain, accepted, refused",
    [
        (POSITIVE, [1, 7, 1.0], [0, -1, 0.5]),
        (NON_NEGATIVE, [0, 0.0, 3], [-1, math.nan, math.inf]),
        (FINITE, [-3.5, 0], [math.nan, math.inf, -math.inf]),
        (POSITIVE_FINITE, [1e-9, 2], [0, -1, math.inf, math.nan]),
        (UNIT_INTERVAL, [0, 1, 0.5], [-0.1, 1.01, math.nan]),
        (PLAIN_NAME, ["run", "run-1.2", "..x"], ["", ".", "..", "a/b", "a\0b"]),
    ],
)
def test_each_domain_accepts_what_its_text_says(domain, accepted, refused):
    assert all(domain.accepts(value) for value in accepted), domain.text
    assert not any(domain.accepts(value) for value in refused), domain.text

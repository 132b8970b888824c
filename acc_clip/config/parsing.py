"""A command's configuration from its sections, three sources, later wins: the defaults, a YAML file
(`--config FILE`, keys as flags, `-` or `_`), command-line flags. Unknown keys and flags are errors that
name the closest valid one; a value of the wrong type or outside its domain is one line naming the flag.
The parser, the YAML keys and `Config.flat()` (what config.yaml holds) all come from the sections, so
a flag shared by two commands is the same flag in both."""

from __future__ import annotations

import argparse
import ast
import difflib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from acc_clip.config.schema import Option, Section, SectionT, flag, options_of
from acc_clip.errors import UsageError


class Config:
    """One instance of each section a command takes; `config[SectionClass]` is that section's options.
    `given` holds the names of the options set by a YAML file or a flag (not left at their default)."""

    def __init__(self, sections: Iterable[Section], given: Iterable[str] = ()):
        self._sections = {type(section): section for section in sections}
        self.given = frozenset(given)

    def __getitem__(self, kind: type[SectionT]) -> SectionT:
        section = self._sections.get(kind)
        if section is None:
            raise KeyError(f"this command has no {kind.__name__} section")
        return section  # type: ignore[return-value]

    def __contains__(self, kind: type) -> bool:
        return kind in self._sections

    def sections(self) -> list[Section]:
        return list(self._sections.values())

    def flat(self) -> dict[str, Any]:
        """Every option by its flat name, section by section."""
        return {
            option.name: getattr(section, option.name)
            for section in self._sections.values()
            for option in options_of(type(section))
        }

    def changed(self, option: Option) -> bool:
        """Whether `option` was given (flag or YAML) at another value than its default: a choice the user made."""
        return option.name in self.given and self.value(option.name) != option.default

    def value(self, name: str) -> Any:
        """An option's value by its flat name."""
        for section in self._sections.values():
            if name in {option.name for option in options_of(type(section))}:
                return getattr(section, name)
        raise KeyError(name)


def command_options(sections: Sequence[type], *, train: bool) -> list[Option]:
    """The options a command takes from its sections; `train=False` leaves out the training-only ones."""
    options = [option for section in sections for option in options_of(section) if train or not option.train_only]
    names = [option.name for option in options]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:  # a programming error: two sections may not define the same flag
        raise RuntimeError(f"options defined in two sections: {duplicates}")
    return options


def _key_values_action() -> type:
    class KeyValues(argparse.Action):
        """key=value pairs with open_clip's meaning (its ParseKwargs, for --aug-cfg): a value is a Python
        literal, else the text itself; also text where open_clip's parser would raise (a glob such as *.bias
        is no Python), and one line for an item without a key."""

        def __call__(self, parser, namespace, values, option_string=None):
            parsed = {}
            for item in values:
                key, equals, text = item.partition("=")
                if not equals or not key:
                    raise UsageError(
                        f"{option_string} {item}: expected key=value pairs, e.g. scale=(0.9,1.0) re_prob=0.25"
                    )
                try:
                    parsed[key] = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    parsed[key] = text
            setattr(namespace, self.dest, parsed)

    return KeyValues


def _argument(option: Option) -> dict[str, Any]:
    """argparse's keywords for one option."""
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": option.help}
    if option.positional:
        # Optional for argparse even when REQUIRED: a YAML file may give it, and a missing one is then
        # build_sections' "NAME is required".
        return {**kwargs, "default": None, "nargs": "?"}
    kwargs["dest"] = option.name
    if option.kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if option.tristate else "store_true"
    elif option.kind is list:
        kwargs.update(type=option.element, nargs="+")
    elif option.kind is dict:
        kwargs.update(nargs="*", action=_key_values_action())
    else:
        kwargs["type"] = option.kind
        if option.kind is str:
            # open_clip's run_demo.py prints empty values as nothing: `--pretrained --next-flag`.
            kwargs.update(nargs="?", const="")
        if option.choices is not None:
            kwargs["choices"] = option.choices
    return kwargs


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors (a bad value, a missing argument) are one line, status 2, like every
    other usage error, instead of its usage text and message."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser(prog: str, description: str, sections: Sequence[type], *, train: bool) -> argparse.ArgumentParser:
    """The command's argparse parser: --config, then each section's options as a group."""
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of options (keys as flags, - or _)")
    taken = {option.name for option in command_options(sections, train=train)}
    for section in sections:
        options = [option for option in options_of(section) if option.name in taken]
        if not options:
            continue
        group = parser.add_argument_group(getattr(section, "title", "") or section.__name__)
        for option in options:
            names = [option.name] if option.positional else [f"--{flag(n)}" for n in (option.name, *option.aliases)]
            group.add_argument(*names, **_argument(option))
    return parser


def closest(name: str, options: Sequence[Option]) -> str:
    matches = difflib.get_close_matches(name.replace("-", "_").lstrip("_"), [o.name for o in options], n=1, cutoff=0.0)
    return flag(matches[0]) if matches else ""


def read_yaml(path: str, options: Sequence[Option], every_option: Sequence[Option] = ()) -> dict[str, Any]:
    """The YAML file's options by name. A key the command does not take is an error naming the closest it
    does; `every_option` (all options of the sections, training ones included) lets that error say when a
    key is a training option the command does not take."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: config file not found")
    with open(path) as file:
        try:
            values = yaml.safe_load(file) or {}
        except yaml.YAMLError as error:
            raise UsageError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of option: value at the top level")
    known = {option.name for option in options}
    training = {option.name for option in every_option} - known
    alias_of = {alias: option.name for option in every_option or options for alias in option.aliases}
    result = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        name = alias_of.get(name, name)
        if name in training:
            raise UsageError(f"{path}: {key!r} is a training option, which this command does not take")
        if name not in known:
            raise UsageError(f"{path}: unknown key {key!r}; did you mean {closest(str(key), options)!r}?")
        result[name] = value
    return result


def coerce(option: Option, value: Any) -> Any:
    """A YAML or resumed value as the option's type: YAML gives ints for floats (`lr: 1`) and strings for
    scientific notation without a dot (`5e-4`)."""
    if value is None:
        if option.optional:
            return None
        raise UsageError(f"option {option.name!r}: expected {option.kind.__name__}, got None")
    if option.kind is str and isinstance(value, str):
        return value
    try:
        if option.kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if option.kind is list:
            return [option.element(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if option.kind is dict:
            if isinstance(value, dict):
                return dict(value)
            raise ValueError
        if isinstance(value, bool):  # YAML's yes/no is not a number
            raise ValueError
        if option.kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError  # 1.7 is not an int, whatever int() makes of it
        if option.kind is str and not isinstance(value, (str, int, float)):
            raise ValueError  # a list or mapping where text belongs
        return option.kind(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"option {option.name!r}: expected {option.kind.__name__}, got {value!r}") from None


def _unknown_argument(unknown: list[str], options: Sequence[Option], every_option: Sequence[Option]) -> UsageError:
    bad = next((token for token in unknown if token.startswith("-")), unknown[0])
    if bad.startswith("-"):
        name = bad.split("=")[0]
        if name.lstrip("-").replace("-", "_") in {option.name for option in every_option}:
            return UsageError(f"{name} is a training option, which this command does not take")
        return UsageError(f"unknown option {name!r}; did you mean '--{closest(name, options)}'?")
    return UsageError(f"unexpected argument {bad!r}")


def build_sections(sections: Sequence[type], values: dict[str, Any], options: Sequence[Option]) -> list[Section]:
    """Each section from its options' values (coerced, checked against their domains), then its own rules."""
    by_name = {option.name: option for option in options}
    built = []
    for section in sections:
        own = {}
        for option in options_of(section):
            if option.name in values:
                own[option.name] = coerce(by_name.get(option.name, option), values[option.name])
            elif option.required and option.name in by_name:
                raise UsageError(
                    f"--{option.flag} is required" if not option.positional else f"{option.name.upper()} is required"
                )
            if option.name in own or not option.required:
                option.check(own.get(option.name, option.default))
        instance = section(**own)
        instance.check()
        built.append(instance)
    return built


def parse(
    argv: Sequence[str],
    sections: Sequence[type],
    *,
    prog: str,
    description: str,
    train: bool,
    defaults: dict[str, Any] | None = None,
) -> Config:
    """The command's Config from its command line (and the YAML file --config names). `defaults` are
    values that stand in for the sections' own defaults (below YAML and flags), e.g. those a checkpoint
    recorded."""
    options = command_options(sections, train=train)
    parser = build_parser(prog, description, sections, train=train)
    namespace, unknown = parser.parse_known_args(list(argv))
    if unknown:
        raise _unknown_argument(unknown, options, command_options(sections, train=True))
    given: dict[str, Any] = {}
    config_path = getattr(namespace, "config", None)
    if config_path:
        given.update(read_yaml(config_path, options, command_options(sections, train=True)))
    positional = {option.name for option in options if option.positional}
    given.update({k: v for k, v in vars(namespace).items() if k != "config" and not (k in positional and v is None)})
    values = {**(defaults or {}), **given}
    return Config(build_sections(sections, values, options), given)


def from_values(sections: Sequence[type], values: dict[str, Any], *, train: bool = True) -> Config:
    """A Config from option values by name (a saved config.yaml, tests), through the same coercion and
    checks as the command line."""
    options = command_options(sections, train=train)
    unknown = sorted(set(values) - {option.name for option in options})
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r}; did you mean '--{closest(unknown[0], options)}'?")
    return Config(build_sections(sections, values, options), values)


def unmet_needs(config: Config) -> list[str]:
    """One line for each option given (at another value than its default) whose section lacks what the option
    needs to have an effect (schema.Needs): such a flag is announced, never silently dropped."""
    lines = []
    for section in config.sections():
        for option in options_of(type(section)):
            if option.needs is None or not config.changed(option):
                continue
            if not option.needs.holds(section):
                lines.append(f"--{option.flag} has no effect without {option.needs.text}")
    return lines


def to_yaml(config: Config, path: str) -> None:
    """config.yaml: every option with the value the run used."""
    from acc_clip.io.atomic import write_atomically

    write_atomically(path, yaml.safe_dump(_plain(config.flat()), sort_keys=False))


def _plain(value: Any) -> Any:
    """YAML's safe dumper takes lists, not tuples (--aug-cfg scale=(0.9,1.0))."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value

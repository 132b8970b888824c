"""Options in sections. Each component declares its options as a `Section` (a dataclass) in its own
module; a command takes a list of sections, and its parser, its YAML keys and the config.yaml a run
writes all come from them. Flag names stay open_clip_train's flat names (`--batch-size`, YAML
`batch_size`), so an option's name is unique across all sections: one name, one definition, one
default and one help text, wherever a command takes it.

An option's domain (`Domain`) is declared with it and checked wherever a value comes from (flags,
YAML, a resumed config): the error is one line naming the flag, the value and the domain. Rules
between options of one section are the section's `check`; rules across sections belong to the
command that composes them (e.g. train/config.py)."""

from __future__ import annotations

import dataclasses
import math
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

from acc_clip.errors import UsageError

REQUIRED: Any = dataclasses.MISSING  # an option without a default: the command needs it


@dataclass(frozen=True)
class Domain:
    """The values an option accepts besides its type: `accepts(value)`, described as `text`. `outside` holds
    values it refuses (as the command line would give them): what the generated tests try for every option."""

    text: str
    accepts: Callable[[Any], bool]
    outside: tuple[str, ...] = ()


@dataclass(frozen=True)
class Needs:
    """The setting without which an option has no effect, e.g. --lock-image for --lock-image-unlocked-groups:
    `holds(section)` on the option's own section, described as `text`. An option given (at another value than
    its default) where its need does not hold is announced at start-up, never silently dropped."""

    text: str
    holds: Callable[[Any], bool]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


POSITIVE = Domain("at least 1", lambda v: v >= 1, ("0", "-1"))
NON_NEGATIVE = Domain("0 or more", lambda v: _finite(v) and v >= 0, ("-1",))
FINITE = Domain("a finite number", _finite, ("nan", "inf"))
POSITIVE_FINITE = Domain("a finite number above 0", lambda v: _finite(v) and v > 0, ("0", "-1", "inf", "nan"))
UNIT_INTERVAL = Domain("within [0, 1]", lambda v: _finite(v) and 0 <= v <= 1, ("-0.5", "1.5", "nan"))
NON_EMPTY = Domain("not empty", lambda v: bool(v), ("",))
# A run's name is one folder under --logs: no separators, not '.' or '..', not empty.
PLAIN_NAME = Domain(
    "a plain folder name (no '/', not empty, '.' or '..')",
    lambda v: bool(v) and v not in (".", "..") and os.sep not in v and "/" not in v and "\0" not in v,
    ("../escaped", "/absolute", "", "."),
)


def _writable_folder(path: str) -> bool:
    """A folder that is there and writable, or could be made: its nearest existing ancestor is a writable folder."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


WRITABLE_FOLDER = Domain("a folder this process can write, or make", _writable_folder, ("/dev/null/runs",))


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    domain: Domain | None = None,
    tristate: bool = False,
    train_only: bool = False,
    positional: bool = False,
    needs: Needs | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A dataclass field that is also a command-line flag and a YAML key.

    - choices: the accepted values (for str options);
    - domain: what numbers, paths or names are accepted (None: any value of the type; None values
      are always accepted for Optional options);
    - tristate: a bool with --X and --no-X, whose default None lets the run decide;
    - train_only: a training option: commands that only read a model (eval) do not take it;
    - positional: given without its flag name (export's CHECKPOINT);
    - needs: the setting of its section without which it has no effect (announced when missing);
    - aliases: other names for the same option (open_clip's second flag names, e.g. --visual-layer-decay),
      taken as flags and YAML keys alike."""
    metadata = {
        "needs": needs,
        "help": help,
        "choices": choices,
        "domain": domain,
        "tristate": tristate,
        "train_only": train_only,
        "positional": positional,
        "aliases": aliases,
    }
    if isinstance(default, (dict, list)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    return field(default=default, metadata=metadata)


class Section:
    """Base of every options section: a dataclass whose fields are `option`s.

    `title` names the section (the group in --help); `check` holds the rules between its own options,
    each broken rule one line (UsageError)."""

    title: ClassVar[str] = ""

    def check(self) -> None:
        """Rules between this section's options; raise UsageError in one line."""


SectionT = TypeVar("SectionT", bound=Section)


@dataclass(frozen=True)
class Option:
    """One option of a section, as the parsers and checks see it."""

    name: str  # the field name, also the YAML key; the flag is --name-with-dashes
    section: type
    kind: Any  # int, float, str, bool, list or dict
    element: Any  # a list's element type
    optional: bool  # None is a valid value
    default: Any
    help: str
    choices: tuple | None
    domain: Domain | None
    tristate: bool
    train_only: bool
    positional: bool
    needs: Needs | None
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return flag(self.name)

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def refused_values(self) -> list[str]:
        """Values this option refuses, as the command line gives them: its domain's examples, or a choice
        it does not offer. Empty when it declares neither."""
        if self.choices is not None:
            return ["not-a-choice"]
        return list(self.domain.outside) if self.domain is not None else []

    def check(self, value: Any) -> None:
        """One line naming the flag, the value and what it accepts, for a value outside the domain or choices."""
        if value is None and self.optional:
            return
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"--{self.flag} {value!r}: expected one of {', '.join(map(str, self.choices))}")
        if self.domain is None:
            return
        values = value if self.kind is list else [value]
        if not all(self.domain.accepts(v) for v in values):
            shown = " ".join(map(str, values)) if self.kind is list else repr(value) if self.kind is str else value
            raise UsageError(f"--{self.flag} {shown}: must be {self.domain.text}")


def flag(name: str) -> str:
    return name.replace("_", "-")


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """(X, True) for Optional[X] or X | None; (kind, False) otherwise."""
    args = get_args(kind)
    if get_origin(kind) in (Union, types.UnionType) and type(None) in args:
        return next(arg for arg in args if arg is not type(None)), True
    return kind, False


def options_of(section: type) -> list[Option]:
    """The options a section declares, in declaration order."""
    hints = get_type_hints(section)
    result = []
    for f in dataclasses.fields(section):
        kind, optional = _unwrap_optional(hints[f.name])
        origin = get_origin(kind) or kind
        element = get_args(kind)[0] if origin is list else None
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        meta = f.metadata
        result.append(
            Option(
                f.name,
                section,
                origin,
                element,
                optional,
                default,
                meta["help"],
                meta["choices"],
                meta["domain"],
                meta["tristate"],
                meta["train_only"],
                meta["positional"],
                meta["needs"],
                meta.get("aliases", ()),
            )
        )
    return result

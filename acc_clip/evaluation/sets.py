"""Which validation and zero-shot sets a run evaluates, and the name each is reported under.

`--val-data` and `--zeroshot-data` take PATH items (one set, today's keys) or NAME=PATH items (several
held-out sources, each reported under its name: `NAME/val_loss`, `NAME/zeroshot_top1` in results.jsonl
and the trackers, a group `NAME` in `acc-clip eval`'s output). `--zeroshot-classnames` and
`--zeroshot-templates` take FILE (for every zero-shot set) or NAME=FILE (for set NAME).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from acc_clip.errors import UsageError

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
UNNAMED_VAL = "retrieval"  # the group of a --val-data PATH without a name: its keys are unprefixed
UNNAMED_ZEROSHOT = "zeroshot"  # and of a --zeroshot-data PATH: keys zeroshot_*
FEWSHOT = "fewshot"  # the --fewshot-data probe's group: keys fewshot_*
IMAGENET_GROUPS = ("imagenet-zeroshot", "imagenetv2-zeroshot")  # open_clip_train's names, keys renamed alike
RESERVED = (UNNAMED_VAL, UNNAMED_ZEROSHOT, FEWSHOT, *IMAGENET_GROUPS)


def split_name(item: str) -> tuple[str | None, str]:
    """NAME=VALUE when the text before the first '=' is a plain name, else (None, the item): a path that
    holds '=' elsewhere (`/data/a=b.csv`) stays a path."""
    name, equals, value = item.partition("=")
    if equals and value and NAME.match(name):
        return name, value
    return None, item


def named(items: list[str] | None, flag: str) -> dict[str | None, str]:
    """--flag's items by name (None for the one item without a NAME=)."""
    result: dict[str | None, str] = {}
    for item in items or []:
        name, value = split_name(item)
        if name in RESERVED:
            raise UsageError(
                f"--{flag} {item}: {name!r} is the name of an unnamed, few-shot or ImageNet set; choose another"
            )
        if name in result:
            if name is None:
                raise UsageError(
                    f"--{flag}: {result[None]!r} and {value!r} have no name; several sets need NAME=PATH "
                    "(all but one of them at least), each reported under its name"
                )
            raise UsageError(f"--{flag}: the name {name!r} is given twice")
        result[name] = value
    return result


@dataclass(frozen=True)
class ZeroShotSource:
    group: str
    data: str
    classnames: str | None
    templates: str | None


def val_sources(val_data: list[str] | None) -> list[tuple[str, str]]:
    """(group, path) of each --val-data set, in the order given."""
    return [(name or UNNAMED_VAL, path) for name, path in named(val_data, "val-data").items()]


def zeroshot_sources(
    zeroshot_data: list[str] | None, classnames: list[str] | None, templates: list[str] | None
) -> list[ZeroShotSource]:
    """Each --zeroshot-data set with its class names and templates files (its own NAME=FILE, else the
    FILE given for every set, else None)."""
    sets = named(zeroshot_data, "zeroshot-data")
    files = {"zeroshot-classnames": named(classnames, "zeroshot-classnames")}
    files["zeroshot-templates"] = named(templates, "zeroshot-templates")
    for flag, by_name in files.items():
        unknown = [name for name in by_name if name is not None and name not in sets]
        if unknown:
            raise UsageError(
                f"--{flag} {unknown[0]}=...: no --zeroshot-data set is named {unknown[0]!r} "
                f"(named sets: {', '.join(repr(n) for n in sets if n) or 'none'})"
            )
    names, templates_by = files["zeroshot-classnames"], files["zeroshot-templates"]
    return [
        ZeroShotSource(
            name or UNNAMED_ZEROSHOT,
            data,
            names.get(name, names.get(None)),
            templates_by.get(name, templates_by.get(None)),
        )
        for name, data in sets.items()
    ]


def check_groups(groups: list[str]) -> None:
    """Every set's results need their own name: a validation and a zero-shot set may not share one."""
    seen: set[str] = set()
    for group in groups:
        if group in seen:
            raise UsageError(
                f"two evaluation sets are named {group!r}: give each --val-data and --zeroshot-data set its own NAME="
            )
        seen.add(group)


def flat_key(group: str, key: str) -> str:
    """A set's metric as results.jsonl and the trackers name it."""
    if group in (UNNAMED_VAL, FEWSHOT):
        return key
    if group in (UNNAMED_ZEROSHOT, *IMAGENET_GROUPS):
        return key.replace("zeroshot", group, 1)
    return f"{group}/{key}"

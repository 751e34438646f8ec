"""Type checks of the fields data_prep's JSON records hold (``manifest.json``, a split's ``plan.json``, a
shard's done-record), said the same way for all: a record that parses but is of the wrong shape (a hand edit, a
copy cut short at a place that still parses) is one line naming the field, where its readers raised KeyError or
TypeError, or used a wrong value as is.

Kept free of heavy imports: ``format.load_manifest`` (the loaders' import) uses it.
"""
from __future__ import annotations

import json
from typing import Callable


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


COUNT = "a count (an integer >= 0)"
# kind (as the message says it) -> test
KINDS: dict[str, Callable[[object], bool]] = {
    "a string": lambda v: isinstance(v, str),
    COUNT: _count,
    "a list": lambda v: isinstance(v, list),
    "an object": lambda v: isinstance(v, dict),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}


def shown(value: object) -> str:
    """A field's value as JSON, cut to a length a one-line message can hold."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def field_problem(obj: dict, key: str, kind: str, where: str, required: bool = True) -> str | None:
    """What is wrong with field `key` of `obj` (`where` names it in the record, e.g. ``splits.train.samples``),
    or None; a field that is not `required` may be missing."""
    if key not in obj:
        return f"has no field {where!r}" if required else None
    if not KINDS[kind](obj[key]):
        return f"field {where!r} is {shown(obj[key])}, not {kind}"
    return None


def first_problem(obj: dict, fields: dict[str, str], prefix: str = "", optional: tuple[str, ...] = ()) -> str | None:
    """The first problem of `fields` (key -> kind) in `obj`, keys named after `prefix`; those in `optional` may
    be missing."""
    for key, kind in fields.items():
        problem = field_problem(obj, key, kind, prefix + key, key not in optional)
        if problem is not None:
            return problem
    return None

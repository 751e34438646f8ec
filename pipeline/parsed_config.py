"""What jsonargparse lets through a parse, refused before anything is built.

A config file's ``null`` passes for any setting (``data.batch_size: null``), typed ``int`` or not; on the
command line the same value is refused. Left alone it surfaced as a ``TypeError`` traceback from the first
comparison (``'>=' not supported between instances of 'NoneType' and 'int'``) or deep inside Lightning.
A section given a value that is not a mapping (``checkpoint: [1]``) and a seed numpy cannot take failed the
same way. Each is a ``ConfigError`` naming the setting.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from pipeline.errors import ConfigError

SECTIONS = ("trainer", "model", "data", "tracking", "checkpoint")
SEED_MAX = 2**32 - 1  # numpy's seed range, which seed_everything checks after it was parsed


def allows_none(hint: Any) -> bool:
    """Whether a setting of type ``hint`` may be null (``Optional[...]``, ``X | None``, ``Any``, untyped)."""
    if hint is None or hint is Any or hint is type(None):
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(allows_none(arg) for arg in typing.get_args(hint))
    return False


def type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_parsed(parser: ArgumentParser, cfg: Namespace) -> None:
    """Refuse a null for a setting whose type and default say it has a value, a section that is not a
    mapping, and a seed outside numpy's range (``parser``: the subcommand's, ``cfg``: its namespace)."""
    for section in SECTIONS:
        value = cfg.get(section)
        if section in cfg and value is not None and not hasattr(value, "items"):
            raise ConfigError(f"{section}: expected a mapping of settings ({section}.KEY: VALUE), got {value!r}")
    for action in parser._actions:
        hint = getattr(action, "_typehint", None)
        dest = action.dest
        if hint is None or action.default is None or allows_none(hint) or "." not in dest:
            continue
        try:
            value = cfg.get(dest, default=...)
        except (KeyError, TypeError):
            continue
        if value is None:
            name = type_name(hint)
            article = "an" if name[:1].lower() in "aeiou" else "a"
            from pipeline.arg_parser import _config_with_key  # the file that set it (a null comes from a file)

            where = f"--config {path}: " if (path := _config_with_key(dest)) else ""
            raise ConfigError(f"{where}{dest} must be {article} {name}, got null (its default: {action.default!r})")
    seed = cfg.get("seed_everything")
    if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed_everything must be in [0, {SEED_MAX}] (or true: a random seed, false: none), "
                          f"got {seed}")

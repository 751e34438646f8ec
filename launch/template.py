"""A deliberately tiny template language for sbatch scripts: ``{{name}}`` inserts a value verbatim,
``{{q:name}}`` inserts it shell-quoted (shlex.quote), ``{{#name}}`` drops the whole line when the value
is empty. Bash's own ``${...}`` syntax passes through untouched, and a missing or unused value is an
error, so a template and its renderer cannot silently drift apart.
"""

from __future__ import annotations

import re
import shlex
from importlib import resources

from launch.errors import LaunchError

_FIELD = re.compile(r"\{\{(q:|#)?([a-z_]+)\}\}")


def load(name: str) -> str:
    """Text of a template shipped in launch/templates/."""
    return resources.files("launch").joinpath("templates", name).read_text()


def render(text: str, values: dict[str, str | int | None], name: str = "template") -> str:
    """Fill a template; every placeholder must have a value and every value must be used."""
    used: set[str] = set()
    out_lines = []
    for line in text.splitlines(keepends=True):
        drop = False

        def sub(m: re.Match[str]) -> str:
            nonlocal drop
            kind, key = m.group(1) or "", m.group(2)
            if key not in values:
                raise LaunchError(f"{name}: no value for placeholder {{{{{kind}{key}}}}}")
            used.add(key)
            value = values[key]
            if kind == "#":
                if value in (None, ""):
                    drop = True
                return ""
            if value is None:
                value = ""
            return shlex.quote(str(value)) if kind == "q:" else str(value)

        new = _FIELD.sub(sub, line)
        if not drop:
            out_lines.append(new)
    unused = set(values) - used
    if unused:
        raise LaunchError(f"{name}: values never used: {', '.join(sorted(unused))}")
    return "".join(out_lines)

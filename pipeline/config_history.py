"""``RUN/config-history/``: the configs a run trained with before a resume changed its settings.

A resume may change settings (``--model.lr`` after a plateau, another ``trainer.devices`` after a
preemption onto fewer nodes); ``RUN/config.yaml`` is then rewritten with the new ones. The earlier file is
kept as ``config-history/config-until-stepN.yaml`` (N: the step the new settings start from), so the run's
whole recipe can be read back. A restart with the same settings keeps nothing: only ``ckpt_path``, which a
launcher's restarts change, is not compared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

HISTORY_DIR = "config-history"
NOT_COMPARED = ("ckpt_path",)
NAMED = 4  # changed settings named in the log line; more are counted


def _settings(path: Path) -> object:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return path.read_bytes() if path.is_file() else None  # not ours to read: compared as bytes
    if isinstance(doc, dict):
        for key in NOT_COMPARED:
            doc.pop(key, None)
        model = doc.get("model")
        if isinstance(model, dict) and isinstance(model.get("arch_kwargs"), dict):
            # a config written before the CLI saved `--model.arch_kwargs.plain false` as a boolean holds the word
            from pipeline.models.registry import typed_options

            model["arch_kwargs"] = typed_options(str(model.get("arch")), model["arch_kwargs"])
    return doc


def recorded_setting(path: Path, dotted: str) -> object:
    """One setting of a config file (``tracking.project``); None when the file or the key is not there."""
    node = _settings(path)
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def keep_earlier_config(current: Path, new: Path, step: int) -> Path | None:
    """Before ``new`` replaces ``current``: copy ``current`` into the history when its settings differ.
    Returns the copy's path (None: nothing to keep)."""
    if not current.is_file() or _settings(current) == _settings(new):
        return None
    history = current.parent / HISTORY_DIR
    history.mkdir(exist_ok=True)
    kept = history / f"config-until-step{step:07d}.yaml"
    n = 2
    while kept.exists():  # a second change at the same step (a resume refused before its first step, retried)
        kept = history / f"config-until-step{step:07d}-{n}.yaml"
        n += 1
    shutil.copy2(current, kept)
    return kept


def _flat(doc: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(doc, dict):
        return {prefix.rstrip("."): doc}
    out: dict[str, object] = {}
    for key, value in doc.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value})
    return out


def _shown(value: object) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str).replace('"', "")  # None -> null, True -> true, lists compact


def changed_settings(current: Path, new: Path) -> str:
    """The settings that differ between two config files, as the command line names them
    (``model.lr 0.1 -> 0.05, trainer.max_steps 10 -> 30``); "" when either is not a YAML mapping."""
    old, now = _settings(current), _settings(new)
    if not isinstance(old, dict) or not isinstance(now, dict):
        return ""
    old, now = _flat(old), _flat(now)
    missing = object()
    changes = [f"{key} {_shown(old.get(key))} -> {_shown(now.get(key))}" if key in old and key in now else
               f"{key} {'added' if key in now else 'removed'}"
               for key in sorted(old.keys() | now.keys()) if old.get(key, missing) != now.get(key, missing)]
    more = len(changes) - NAMED
    return ", ".join(changes[:NAMED]) + (f" and {more} more" if more > 0 else "")

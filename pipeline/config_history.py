"""``RUN/config-history/``: the configs a run trained with before a resume changed its settings.

A resume may change settings (``--model.lr`` after a plateau, another ``trainer.devices`` after a
preemption onto fewer nodes); ``RUN/config.yaml`` is then rewritten with the new ones. The earlier file is
kept as ``config-history/config-until-stepN.yaml`` (N: the step the new settings start from), so the run's
whole recipe can be read back. A restart with the same settings keeps nothing: only ``ckpt_path``, which a
launcher's restarts change, is not compared.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

HISTORY_DIR = "config-history"
NOT_COMPARED = ("ckpt_path",)


def _settings(path: Path) -> object:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return path.read_bytes() if path.is_file() else None  # not ours to read: compared as bytes
    if isinstance(doc, dict):
        for key in NOT_COMPARED:
            doc.pop(key, None)
    return doc


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

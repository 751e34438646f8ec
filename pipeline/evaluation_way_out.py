"""What ``validate``/``test`` advise when a checkpoint was trained on another dataset than ``data.root``'s.

``fit``'s way out is a new run directory (or ``data.root`` pointed back); an evaluation has no run to start:
it either scores the checkpoint on the data it was trained on (the ``data.root`` of the run that saved it,
which that run's ``config.yaml`` records), or scores its weights on this data on purpose (``--ckpt_path null
--model.init_weights CKPT``: the network alone, no dataset record checked).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.run_layout import CHECKPOINTS_DIR, CONFIG_FILE


def saving_run_config(ckpt: str | Path) -> Path | None:
    """The config of the run that saved ``ckpt`` (``RUN/checkpoints/X``: ``RUN/config.yaml``); None where
    ``ckpt`` is not in a run's checkpoints folder or that run has no config file."""
    ckpt = Path(ckpt)
    config = ckpt.parent.parent / CONFIG_FILE
    return config if ckpt.parent.name == CHECKPOINTS_DIR and config.is_file() else None


def trained_root(ckpt: str | Path) -> tuple[str, Path] | None:
    """The ``data.root`` in the config of the run that saved ``ckpt`` (``saving_run_config``) and that
    config's path; None where there is no such readable record."""
    config = saving_run_config(ckpt)
    if config is None:
        return None
    try:
        doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    root = doc.get("data", {}).get("root") if isinstance(doc, dict) and isinstance(doc.get("data"), dict) else None
    return (root, config) if isinstance(root, str) and root else None


def way_out(subcommand: str, ckpt: str | Path | None, root: str | Path, weights_on_this_data: bool) -> str:
    """The advice, in parentheses. ``weights_on_this_data``: whether scoring the weights on this data can mean
    anything (not with other classes: the labels would mean other classes)."""
    ways = []
    recorded = trained_root(ckpt) if ckpt is not None else None
    if recorded and Path(recorded[0]).absolute() != Path(root).absolute():
        ways.append(f"{subcommand} it on the data it was trained on: --data.root {recorded[0]} ({recorded[1]}'s)")
    elif not recorded:
        ways.append(f"{subcommand} it with the data.root it was trained on")
    if weights_on_this_data and ckpt is not None:
        ways.append(f"score its weights on this data on purpose: --ckpt_path null --model.init_weights {ckpt}")
    elif recorded and not ways:  # its run's data.root is this one, prepared again since
        ways.append(f"its run's data.root is this one, prepared again since: {subcommand} it on the data it was "
                    f"trained on")
    return f"({'; or '.join(ways)})"

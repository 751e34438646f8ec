"""A run directory moved (or reached by another path) between two starts keeps its best k.

Lightning's ``ModelCheckpoint`` restores its best-k bookkeeping (``best_k_models``, ``best_model_score``,
``kth_value``) only where the checkpoint's ``dirpath`` is the folder it saves to now; else it starts over, with a
warning the CLI silences for branches: after a move (the documented way on after ``fit`` stopped because its run
directory was moved), the first validation was saved as best whatever its score and the earlier best files were
never removed (``save_top_k`` 1 kept two). A resume of a checkpoint of this run's own ``checkpoints/`` folder
has that bookkeeping rewritten to the folder's present path first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


class MovedRunCheckpoints(Callback):
    """Before the callbacks' states load: ``ModelCheckpoint`` states of another ``dirpath`` are moved to ``ckdir``
    when the checkpoint being resumed lies in ``ckdir`` (not a branch's origin, whose best k stay its own)."""

    def __init__(self, ckdir: str | Path) -> None:
        self.ckdir = Path(os.path.abspath(ckdir))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        resumed = getattr(trainer, "ckpt_path", None)
        if resumed is None or Path(os.path.realpath(resumed)).parent != Path(os.path.realpath(self.ckdir)):
            return
        for key, state in (checkpoint.get("callbacks") or {}).items():
            if key.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("dirpath"):
                moved_state(state, self.ckdir)


def moved_state(state: dict, ckdir: Path) -> None:
    """``state`` (a ``ModelCheckpoint.state_dict``) with its folder and file paths in ``ckdir``, as if the run had
    been there all along (a file gone since is as it would be in the unmoved folder)."""
    if Path(state["dirpath"]) == ckdir:
        return
    state["dirpath"] = str(ckdir)
    state["best_k_models"] = {str(ckdir / Path(path).name): score
                              for path, score in (state.get("best_k_models") or {}).items()}
    for key in PATH_KEYS:
        if state.get(key):
            state[key] = str(ckdir / Path(state[key]).name)

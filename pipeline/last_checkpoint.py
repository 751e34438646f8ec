"""``last.ckpt``: every N optimizer steps and at every epoch end, one file, overwritten atomically.

Lightning's ``ModelCheckpoint(save_last=True)`` only refreshes ``last`` when it also saved a top-k
checkpoint at that step, and a second callback with ``save_last`` writes ``last-v1.ckpt`` beside the
first. This one owns ``last.ckpt`` alone; the best-k callback saves no ``last``.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 0) -> None:
        super().__init__(
            dirpath=str(dirpath), save_top_k=0, save_last=True,
            every_n_train_steps=every_n_train_steps if every_n_train_steps > 0 else None,
            save_on_train_epoch_end=True, enable_version_counter=False,
        )

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resumed run's step is saved already (in the checkpoint it resumed from): a start that trains
        no step (the run had reached its end) rewrote ``last.ckpt`` at train end with the epoch count one
        ahead, and a later extension of the run trained its next epoch in the wrong order."""
        self._last_global_step_saved = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # saved at the epoch end, after validation

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """No second save of a step already saved. Lightning saves ``last`` here when this callback has not
        saved in this process, even when another save holds this step (the preemption's): by now the epoch
        count has moved on, so that copy placed the loader's mid-epoch position in the next epoch."""
        if not self._should_skip_saving_checkpoint(trainer):
            super().on_train_end(trainer, pl_module)

"""The best-k checkpoints (``best-epochE-stepS-top1=T.ckpt``): only of weights a validation scored.

Lightning's ``ModelCheckpoint`` ranks at the end of each training epoch (where a validation runs every
epoch), by the ``val/top1`` the trainer last logged. An epoch that ran no validation (a run ending at
``trainer.max_steps`` mid-epoch, ``trainer.check_val_every_n_epoch`` above 1) still ranked, by the previous
validation's score: a file of weights no validation had seen, named with another step's score, which
``--ckpt_path best`` picked on a tie, and which a resumed run did or did not write depending on where its
last start began.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class BestCheckpoints(ModelCheckpoint):
    """``ModelCheckpoint`` whose save at a training epoch's end happens only after a validation of that step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._validated_step: int | None = None  # the global step the last validation of this start scored

    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s own key: the best-k bookkeeping of checkpoints saved before this class loads."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_step = trainer.global_step
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validated_step != trainer.global_step:  # no validation since this epoch's last step
            return
        super().on_train_epoch_end(trainer, pl_module)

"""``last.ckpt``: every N optimizer steps and at every epoch end, one file, overwritten atomically. A step
that a validation follows (an epoch's last, or one of ``trainer.val_check_interval``) is saved after that
validation; a stop asked for between two optimizer steps (gradient accumulation) waits for the next step,
so every save holds whole steps.

Lightning's ``ModelCheckpoint(save_last=True)`` only refreshes ``last`` when it also saved a top-k
checkpoint at that step, and a second callback with ``save_last`` writes ``last-v1.ckpt`` beside the
first. This one owns ``last.ckpt`` alone; the best-k callback saves no ``last``.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from pipeline.resume_geometry import epoch_finished, validation_follows
from pipeline.run_layout import LAST_CHECKPOINT


class LastCheckpoint(ModelCheckpoint):
    CHECKPOINT_NAME_LAST = Path(LAST_CHECKPOINT).stem  # Lightning's own "last" (it adds FILE_EXTENSION, .ckpt)

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 0) -> None:
        super().__init__(
            dirpath=str(dirpath), save_top_k=0, save_last=True,
            every_n_train_steps=every_n_train_steps if every_n_train_steps > 0 else None,
            save_on_train_epoch_end=True, enable_version_counter=False,
        )
        self._stop_waiting = False  # a stop was asked for between two optimizer steps
        self._after_validation = False  # this step's periodic save waits for the validation that follows it
        self._save_after_validation = False  # ... and is due whatever the period (a preemption's)

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resumed run's step is saved already (in the checkpoint it resumed from): a start that trains
        no step (the run had reached its end) rewrote ``last.ckpt`` at train end with the epoch count one
        ahead, and a later extension of the run trained its next epoch in the wrong order."""
        self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        """The periodic save, after the validation when one follows this batch: an epoch's last batch is
        saved at the epoch's end, another one (``trainer.val_check_interval``) at the validation's end.
        Lightning resumes a checkpoint of an epoch's last batch in the next epoch, and one of another batch
        that a validation follows past that validation, so a job killed during the validation after such a
        save never ran it (nor ranked that step best-k)."""
        self._stop_on_a_step(trainer)
        if epoch_finished(trainer):
            return
        if validation_follows(trainer):
            self._after_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def save_after_validation(self) -> None:
        """Save this step after the validation that follows it, whatever ``every_n_train_steps`` says."""
        self._after_validation = self._save_after_validation = True

    def _stop_on_a_step(self, trainer: pl.Trainer) -> None:
        """A stop asked for between two optimizer steps waits for the next step. Lightning's ``max_time``
        timer (and any ``should_stop``) ends training after any micro-batch; the save at the end then holds
        weights without the accumulated micro-batches. Checkpoint callbacks run after all others (Lightning
        orders them last), so this sees the timer's request of this batch."""
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done % max(1, trainer.accumulate_grad_batches) and not epoch_finished(trainer):
            if trainer.should_stop:
                trainer.should_stop, self._stop_waiting = False, True
        elif self._stop_waiting:
            trainer.should_stop, self._stop_waiting = True, False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The save of a step that a validation inside the epoch followed (an epoch's last step is saved at
        the epoch's end). The best-k callback, ahead of this one, has ranked the step by now."""
        if not self._after_validation or trainer.sanity_checking:
            return
        self._after_validation = False
        if self._save_after_validation:
            self._save_after_validation = False
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_batch_end(trainer, pl_module, None, None, trainer.fit_loop.epoch_loop.batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """No second save of a step already saved. Lightning saves ``last`` here when this callback has not
        saved in this process, even when another save holds this step (the preemption's): by now the epoch
        count has moved on, so that copy placed the loader's mid-epoch position in the next epoch."""
        if not self._should_skip_saving_checkpoint(trainer):
            super().on_train_end(trainer, pl_module)

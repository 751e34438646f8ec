"""Resuming with another world size: keep the global batch, continue the epoch where it stopped.

The checkpoint records the loader geometry it was trained with (world size, per-rank batch, gradient
accumulation). A restarted job with a different world size (fewer nodes were free, a node died) keeps
the global batch -- and so the learning-rate schedule and the optimisation -- by accumulating gradients
over more micro-batches of the configured size, or by changing the per-rank batch when accumulation
cannot make up the difference. The data contract re-splits the rest of the epoch for the new world.

Lightning's batch counter of the epoch (which decides where gradient accumulation ends) is restored in
the checkpoint's micro-batch units; ``LoopPosition`` restates it in the new ones, so each optimizer step
after the resume again takes ``accumulate`` whole micro-batches.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch

from pipeline.errors import ConfigError
from pipeline.trainer_devices import devices_per_node
from pipeline.wording import plural

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    world_size: int
    batch_size: int
    accumulate: int = 1

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accumulate

    def describe(self) -> str:
        return (f"world {self.world_size} x batch {self.batch_size} x accumulate {self.accumulate}"
                f" (global {self.global_batch})")


def expected_world_size(num_nodes: int | None, devices: Any) -> int:
    """The world size the job will have, known before the trainer exists (launcher env first).

    Slurm's task count only where Lightning takes its ranks from Slurm: not in a shell that ``srun --pty
    bash`` (or ``salloc``) started, job name ``bash`` or ``interactive``, where Lightning starts
    ``trainer.devices`` processes itself (``SLURM_NTASKS`` there is the shell's 1, and the resumed run got
    4 times the checkpoint's global batch with 4 devices)."""
    slurm = "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        v = os.environ.get(var)
        if v and v.isdigit() and int(v) > 0 and (var == "WORLD_SIZE" or slurm):
            return int(v)
    nodes = int(num_nodes or 1)
    per = devices_per_node(devices)
    if per is None:  # "auto", -1
        per = max(1, torch.cuda.device_count())
    return nodes * per


def adapt(saved: Geometry, world_size: int, batch_size: int, accumulate: int) -> Geometry:
    """The geometry for ``world_size`` ranks that keeps ``saved.global_batch``.

    Prefers the configured per-rank batch with more (or less) accumulation; else a per-rank batch that
    divides the global batch with the configured accumulation; else the error names both geometries."""
    now = Geometry(world_size, batch_size, accumulate)
    g = saved.global_batch
    if now.global_batch == g:
        return now
    if g % (world_size * batch_size) == 0:
        return Geometry(world_size, batch_size, g // (world_size * batch_size))
    # the configured accumulation first: then world x batch, and so the epoch's length, stay as saved
    for acc in dict.fromkeys((accumulate, 1)):
        if g % (world_size * acc) == 0:
            return Geometry(world_size, g // (world_size * acc), acc)
    raise ConfigError(
        f"cannot keep the global batch of the checkpoint ({saved.describe()}) with {plural(world_size, 'rank')}:"
        f" {g} is not divisible by {world_size}; pick a world size (trainer.num_nodes x trainer.devices) that"
        f" divides it"
    )


def epoch_finished(trainer: pl.Trainer) -> bool:
    """Whether the trainer has run the current epoch's last batch: all of the loader's, or as many as
    ``trainer.limit_train_batches`` allows. Not when ``max_steps``, ``max_time`` or ``should_stop`` ended
    the run mid-epoch, although Lightning then runs its epoch-end hooks."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return done >= trainer.num_training_batches > 0


def validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates right after the training batch that just ended, inside the epoch
    (``trainer.val_check_interval``) or at its end. Ask before setting ``trainer.should_stop`` at this batch:
    Lightning also validates before a requested stop. Lightning's own decision, read early."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):  # another Lightning: save as before, ahead of the validation
        return False


class LoopPosition(pl.Callback):
    """Keeps Lightning's loop and the loader's position in step.

    After a resume mid-epoch: set Lightning's batch counters of the epoch to the samples consumed in
    the current micro-batch size (``ShardDataModule.resume_batches``). Without it, a checkpoint of 3
    batches of 64 resumed as batches of 32 with accumulation 2 would step after the first micro-batch
    (Lightning steps when its counter is a multiple of the accumulation) and every step after would
    straddle two global batches.

    At every epoch start: the train order is that of ``trainer.current_epoch``. Lightning's own
    ``set_epoch`` passes its count of processed epochs, which after a resume from a checkpoint saved at
    an epoch's end (``last.ckpt`` is) is one ahead in runs with ``trainer.max_steps``: Lightning re-enters
    the finished epoch and counts it processed again. Every epoch after such a resume then ran in the
    next epoch's order, and the run was not the uninterrupted one (a different sample order and
    augmentation for the rest of training).

    At the start of training: that re-entered epoch is counted processed once, not twice (see
    ``on_train_start``); Lightning compares the count with ``trainer.max_epochs`` right after it.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # an epoch starts with every finished epoch processed and completed; the re-entered one was counted
        # processed twice, and a checkpoint of this epoch would carry that on: its resume would count as
        # one "on the epoch's end" and skip this hook (the next epoch's order again, from mid-epoch on)
        progress = trainer.fit_loop.epoch_progress
        for tracker in (progress.current, progress.total):
            tracker.processed = min(tracker.processed, tracker.completed)
        dm = getattr(trainer, "datamodule", None)
        if hasattr(dm, "set_train_epoch"):
            dm.set_train_epoch(trainer.current_epoch)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """A save at the end of an epoch the trainer cut short is a mid-epoch checkpoint, and says so.

        When ``max_steps``, ``max_time`` or any ``should_stop`` ends a run mid-epoch, Lightning counts the
        epoch processed and then runs the epoch-end hooks, where ``last.ckpt`` is saved. A resume with
        ``max_steps`` re-enters that epoch, but one without (the run continued to its ``max_epochs``) took
        the checkpoint for an epoch's end and started the next epoch while the loader went on mid-epoch:
        the rest of the interrupted epoch's order and the whole next one were lost. The saved counters
        are made those of a save between two batches of the epoch."""
        if epoch_finished(trainer):
            return
        epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
        for tracker in (epochs or {}).values():
            tracker["processed"] = min(tracker["processed"], tracker["completed"])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        """The logs' step is the optimizer steps done (one optimizer: Lightning's ``_batches_that_stepped``,
        the step of every logger's rows, equals ``global_step`` at a batch's start in a run never stopped).
        Lightning adds one to it on a restart, right for a save inside a batch's end hooks, where it had not
        counted the step yet, but also for our saves at an epoch's end, where it had: each resume from such
        a ``last.ckpt`` (every ``kill -9``, every ``max_epochs`` extension) moved every later row of CSV,
        TensorBoard and W&B one step on (step 12 missing, 13 twice after a kill). Restated before any row of
        the batch (the lr monitor comes after this callback)."""
        loop = trainer.fit_loop.epoch_loop
        if loop._batches_that_stepped != trainer.global_step:
            loop._batches_that_stepped = trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first batch: the re-entered epoch counted once, and the loop's batch position restated.

        A resume with ``trainer.max_steps`` from a checkpoint saved at an epoch's end (the epoch processed,
        not yet completed) re-enters that epoch: Lightning runs its end again and counts it processed a
        second time, then stops when that count reaches ``trainer.max_epochs``. A checkpoint at the end of
        epoch 0 resumed with ``max_epochs`` 2 and ``max_steps`` (added, raised) stopped at once, "max_epochs=2
        reached", and trained nothing of epoch 1. The count is taken back to the completed epochs here, so
        the re-entered end counts the epoch once, as the run without a stop had."""
        fit_loop = trainer.fit_loop
        if getattr(fit_loop, "restarted_on_epoch_end", False):
            for tracker in (fit_loop.epoch_progress.current, fit_loop.epoch_progress.total):
                tracker.processed = min(tracker.processed, tracker.completed)
        dm = getattr(trainer, "datamodule", None)
        target = dm.resume_batches(trainer.current_epoch) if hasattr(dm, "resume_batches") else None
        progress = trainer.fit_loop.epoch_loop.batch_progress
        # "processed" is the position (a save in on_train_batch_end has not counted the batch "completed"
        # yet; Lightning completes it on restart); all four counters move together
        if target is None or progress.current.processed == target:
            return
        shift = target - progress.current.processed
        if trainer.is_global_zero:  # once, not by every rank
            log.info("loop position restated in the new micro-batch size: batch %d -> %d",
                     progress.current.processed, target)
        for tracker in (progress.current, progress.total):
            tracker.ready += shift
            tracker.started += shift
            tracker.processed += shift
            tracker.completed += shift

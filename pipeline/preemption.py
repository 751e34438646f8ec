"""Preemption: on SIGUSR1/SIGTERM save ``last.ckpt`` at the next batch boundary, requeue, stop cleanly.

The signal handler only sets a flag (nothing else is safe inside a handler: a collective or a file write
there can deadlock or tear a checkpoint) and, on SIGTERM, detaches the W&B logger: Slurm sends SIGTERM to
every process of the job step, W&B's service process included, and a later log call to the dead service
would raise before the checkpoint is saved. After every optimizer step all ranks all-reduce the flag (MAX),
so they agree on the step at which to stop even when only some of them got the signal (with gradient
accumulation: at the end of an accumulation, never between micro-batches). Then all ranks
save ``last.ckpt`` (rank 0 writes the file; DeepSpeed writes every rank's shard), rank 0 calls
``scontrol requeue $SLURM_JOB_ID`` once when running under Slurm, and the trainer stops without a
validation pass and without further checkpoints at that step.

Lightning's own SLURM auto-requeue is switched off by the CLI (``SLURMEnvironment(auto_requeue=False)``)
so that only this callback acts; its SIGTERM handler is replaced while training runs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

log = logging.getLogger(__name__)


class Preemption(Callback):
    """Args:
        last_path: where to save (``RUN/checkpoints/last.ckpt``).
        signals: names of the signals that mean "the job is about to end".
        requeue: call ``scontrol requeue`` when ``SLURM_JOB_ID`` is set.
    """

    def __init__(self, last_path: str | Path, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"),
                 requeue: bool = True) -> None:
        self.last_path = str(last_path)
        self.signals = [getattr(signal, s) for s in signals]
        self.requeue = requeue
        self.received: int | None = None
        self.preempted = False
        self._previous: dict[int, object] = {}
        self._trainer: pl.Trainer | None = None

    # ---- the handler: a flag (and no more W&B after SIGTERM) ------------------------------------------
    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if signum == signal.SIGTERM and self._trainer is not None:
            self._trainer.loggers = [lg for lg in self._trainer.loggers if not isinstance(lg, WandbLogger)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its handlers just before the run stage; ours replace them while training.
        self._trainer = trainer
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
                pass

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, h in self._previous.items():
            try:
                signal.signal(s, h)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    # ---- the decision at a batch boundary -----------------------------------------------------------
    def _agreed(self, trainer: pl.Trainer) -> bool:
        flag = 1 if self.received is not None else 0
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor([flag], dtype=torch.int32, device=trainer.strategy.root_device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag > 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.preempted or not _at_optimizer_step(trainer) or not self._agreed(trainer):
            return
        self.preempted = True
        name = signal.Signals(self.received).name if self.received is not None else "a peer's signal"
        if trainer.is_global_zero:
            log.warning("preemption (%s): saving %s at step %d, then stopping", name, self.last_path,
                        trainer.global_step)
        trainer.save_checkpoint(self.last_path)
        for cb in trainer.checkpoint_callbacks:  # no second save of this step, no validation on the way out
            if isinstance(cb, ModelCheckpoint):
                cb._last_global_step_saved = trainer.global_step
        trainer.limit_val_batches = 0
        trainer.should_stop = True
        trainer.strategy.barrier("preemption-saved")
        if trainer.is_global_zero and self.requeue:
            job = os.environ.get("SLURM_JOB_ID")
            if job:
                requeue_slurm_job(job)


def _at_optimizer_step(trainer: pl.Trainer) -> bool:
    """Whether this batch ended with an optimizer step. With gradient accumulation a save between two
    micro-batches would drop the gradients accumulated so far (they are not in the checkpoint) while the
    loader position counts their samples as consumed; so a signal waits for the end of the accumulation,
    at most ``accumulate_grad_batches - 1`` batches. Every rank counts the same batches, so all agree."""
    loop = trainer.fit_loop.epoch_loop
    return loop._accumulated_batches_reached() or loop._num_ready_batches_reached()


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue JOB``; the job comes back PENDING and resumes from ``last.ckpt``."""
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("requeue of Slurm job %s failed: %s", job_id, e)
        return False
    if proc.returncode != 0 and "pending" in proc.stderr.lower():
        # a hard requeue (scontrol requeue from outside, SIGTERM) got there first: the job is back already
        log.warning("Slurm job %s is already pending again: %s", job_id, proc.stderr.strip())
        return True
    if proc.returncode != 0:
        log.error("requeue of Slurm job %s failed (exit %d): %s", job_id, proc.returncode, proc.stderr.strip())
        return False
    log.warning("requeued Slurm job %s", job_id)
    return True

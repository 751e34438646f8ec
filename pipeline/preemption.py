"""Preemption: on SIGUSR1/SIGTERM (and Ctrl-C's SIGINT) save ``last.ckpt`` at the next batch boundary, requeue
(not after a Ctrl-C), stop cleanly.

The signal handler only sets a flag (nothing else is safe inside a handler: a collective or a file write
there can deadlock or tear a checkpoint) and, on SIGTERM, detaches the W&B logger: Slurm sends SIGTERM to
every process of the job step, W&B's service process included, and a later log call to the dead service
would raise before the checkpoint is saved (what W&B misses from then on is kept in the checkpoint and
logged when the run resumes: ``pipeline/wandb_backlog.py``). After every optimizer step all ranks all-reduce the flag (MAX),
so they agree on the step at which to stop even when only some of them got the signal (with gradient
accumulation: at the end of an accumulation, never between micro-batches). The all-reduce of one step is
read at the next one (a single process reads its flag at once): reading it at once would make the host
wait for the GPU to finish the step at every step, and the GPU would then idle while the host prepares
the next one. So a multi-rank run stops one optimizer step after the signal. Then all ranks
save ``last.ckpt`` (rank 0 writes the file; DeepSpeed writes every rank's shard) and the trainer stops
without a validation pass and without further checkpoints at that step. When a validation is due after
that step (the epoch's last, or ``trainer.val_check_interval``), it still runs before the stop, with its
best-k checkpoint and ``last.ckpt`` saved again after it: Lightning resumes a checkpoint of an epoch's
last batch in the next epoch, and one of another step past its validation, so that validation would never
run. A signal during the validation (or one whose vote is still in flight at the epoch's end) stops the
run at the epoch's end, with its checkpoint. At the end, once everything is saved and every rank has
passed the process group's last barrier (``pipeline.cli.main``), rank 0 calls ``scontrol requeue
$SLURM_JOB_ID`` once when running under Slurm (Slurm then cancels the running step at once), unless
accounting says the job is being cancelled (``scancel``: a requeue would bring it back).

The handlers hold from the fit's setup to its teardown, start-up and the sanity check included (a USR1
there killed the process, a SIGTERM ended it with exit 0 and no requeue); before the setup (imports,
config, model), ``pipeline.early_signals`` records USR1 and it is taken over here (SIGTERM keeps its
default there: it means "go now"). A signal before the first training step stops the run after that
step. Lightning's own SLURM auto-requeue is switched off by the CLI
(``SLURMEnvironment(auto_requeue=False)``) and its SIGTERM handler is never installed during a fit: that
handler broadcasts from inside the handler, on the signalled rank alone.
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

from pipeline import early_signals
from pipeline.last_checkpoint import LastCheckpoint
from pipeline.resume_geometry import epoch_finished, validation_follows
from pipeline.wandb_backlog import WandbBacklog
from pipeline.wandb_service import close_wandb_service

log = logging.getLogger(__name__)


class Preemption(Callback):
    """Args:
        last_path: where to save (``RUN/checkpoints/last.ckpt``).
        signals: names of the signals that mean "the job is about to end".
        requeue: call ``scontrol requeue`` when ``SLURM_JOB_ID`` is set.
        wandb_backlog: takes the W&B logger's place after SIGTERM and keeps what it missed for the resumed
            run (``pipeline/wandb_backlog.py``); without it the W&B logger is only removed.
    """

    def __init__(self, last_path: str | Path, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM", "SIGINT"),
                 requeue: bool = True, wandb_backlog: WandbBacklog | None = None) -> None:
        self.last_path = str(last_path)
        self.wandb_backlog = wandb_backlog
        self.signals = [getattr(signal, s) for s in signals]
        self.requeue = requeue
        self.received: int | None = None
        self.preempted = False
        self.finished = False  # the preemption's step was the run's last: nothing to resume
        self._previous: dict[int, object] = {}
        self._trainer: pl.Trainer | None = None
        self._vote: _Vote | None = None
        self._start_step: int | None = None  # the global step this start began at

    # ---- the handler: a flag (and no more W&B after SIGTERM) ------------------------------------------
    def _handler(self, signum, frame) -> None:
        """Ctrl-C (SIGINT) is a preemption too: a save at the next step, then a stop, which the same command
        resumes (a KeyboardInterrupt wherever it landed saved nothing). A second Ctrl-C stops at once."""
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and self.received is None and self._trainer is not None \
                and self._trainer.is_global_zero:  # os.write: a print here could re-enter a write to stderr
            os.write(2, b"Ctrl-C: saving last.ckpt at the next step, then stopping (Ctrl-C again: stop now, "
                        b"without that save)\n")
        if self.received is None:
            self.received = signum
        if signum == signal.SIGTERM and self._trainer is not None:
            if self.wandb_backlog is not None:
                self.wandb_backlog.detach(self._trainer)
            else:
                self._trainer.loggers = [lg for lg in self._trainer.loggers if not isinstance(lg, WandbLogger)]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        early = early_signals.take()  # before the loop below: its handlers are the ones to restore later
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
                pass
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and self._previous:
            def register_none() -> None:  # Lightning would install its SIGTERM handler over ours
                connector.received_sigterm = False
                connector._original_handlers = {}

            connector.register_signal_handlers = register_none
        if early is not None and early in self.signals:  # said by each rank that got it (the others learn by vote)
            where = f" (rank {trainer.global_rank})" if trainer.world_size > 1 else ""
            log.warning("preemption (%s) received during start-up%s", signal.Signals(early).name, where)
            self._handler(early, None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A signal that came during the epoch's last steps or its validation stops the run here, with the
        epoch-end ``last.ckpt`` (``LastCheckpoint`` runs after this callback: Lightning orders checkpoint
        callbacks last), not one or two steps into the next epoch: the next epoch's loaders and steps need
        not fit in the grace time. One blocking all-reduce per epoch, outside the steps. Not at the end of an
        epoch this start took no step of (a resume of a checkpoint saved at an epoch's last step, which
        Lightning ends again): a signal during start-up stopped it there, saved at the step it began at, and
        each requeue did the same, with no progress; it stops after the first step (``on_train_batch_end``)."""
        if self.preempted or not epoch_finished(trainer) or trainer.global_step == self._start_step:
            return
        agreed = self.received is not None
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([int(agreed)], dtype=torch.int32, device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            agreed = bool(flag.item())
        if not agreed:
            return
        self.preempted = True
        self.finished = run_finished(trainer)
        if trainer.is_global_zero:
            name = signal.Signals(self.received).name if self.received is not None else "a peer's signal"
            log.warning("preemption (%s): saving %s at step %d, then stopping at the end of epoch %d%s", name,
                        self.last_path, trainer.global_step, trainer.current_epoch,
                        " (the run's last step: it is complete, no requeue)" if self.finished else "")
        trainer.should_stop = True
        logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NOT_REACHED)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._vote is not None:  # every rank launched the same all-reduces: let the last one finish
            self._vote.finish()
            self._vote = None
        if self.preempted:  # everything of this step is saved now: the job may go
            trainer.strategy.barrier("preemption-saved")
            job = os.environ.get("SLURM_JOB_ID")
            if self.requeue and job and not self.finished and self.received != signal.SIGINT:
                global _requeue_expected  # every rank: the step will be cancelled under it
                _requeue_expected = True
            if not trainer.is_global_zero or self.finished:
                return
            if self.requeue and job and self.received != signal.SIGINT:  # Ctrl-C: stop, as asked
                if slurm_job_cancelled(job):  # scancel's SIGTERM: a requeue would undo the cancel
                    log.warning("Slurm job %s was cancelled: not requeued; the run stopped at step %d, and submitting "
                                "it again (the same --run-dir) resumes from %s", job, trainer.global_step,
                                self.last_path)
                else:  # after the process group's last barrier (pipeline.cli.main): the requeue cancels
                    global _requeue_pending  # the step, and a rank still at a barrier died with a traceback
                    _requeue_pending = job
                    if not _in_cli:
                        requeue_pending_job()
            else:  # a wrapper sees exit 0 either way: say that this one is not the end
                log.warning("the run is not finished (stopped at step %d): run the same command again to resume"
                            " from %s", trainer.global_step, self.last_path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
        if stage == "fit":
            try:  # USR1's default action would kill the process in what comes after the fit
                signal.signal(signal.SIGUSR1, _after_fit)
            except ValueError:  # not the main thread
                pass
        logging.getLogger("pytorch_lightning.utilities.rank_zero").removeFilter(_NOT_REACHED)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        self._vote = None  # not waited for: a peer may be gone

    def _restore(self) -> None:
        for s, h in self._previous.items():
            try:
                signal.signal(s, h)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    # ---- the decision at a batch boundary -----------------------------------------------------------
    def _agreed(self, trainer: pl.Trainer) -> bool:
        mine = self.received is not None
        if not (trainer.world_size > 1 and dist.is_available() and dist.is_initialized()):
            return mine
        if self._vote is None:
            self._vote = _Vote(trainer.strategy.root_device)
        return self._vote.exchange(mine)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.preempted or not _at_optimizer_step(trainer) or not self._agreed(trainer):
            return
        self.preempted = True
        name = signal.Signals(self.received).name if self.received is not None else "a peer's signal"
        last_batch = epoch_finished(trainer)
        validating = validation_follows(trainer)  # asked before should_stop is set (that alone validates)
        self.finished = run_finished(trainer)
        if trainer.is_global_zero:
            at_end = f" at the end of epoch {trainer.current_epoch}"  # the words of on_train_epoch_end's stop
            after = (at_end + (", after its validation" if validating else "")) if last_batch \
                else " after this validation" if validating else ""
            log.warning("preemption (%s): saving %s at step %d, then stopping%s%s", name, self.last_path,
                        trainer.global_step, after,
                        " (the run's last step: it is complete, no requeue)" if self.finished else "")
        trainer.save_checkpoint(self.last_path, weights_only=False)  # first: safe even if the validation outlasts the grace time
        if validating and not last_batch:  # trainer.val_check_interval: Lightning resuming this save skips it
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, LastCheckpoint):
                    cb.save_after_validation()
        elif not last_batch:
            for cb in trainer.checkpoint_callbacks:  # no second save of this step, no validation on the way out
                if isinstance(cb, ModelCheckpoint):
                    cb._last_global_step_saved = trainer.global_step
            trainer.limit_val_batches = 0
        trainer.should_stop = True
        # Lightning would then say "`Trainer.fit` stopped: `max_epochs=N` reached" (the epoch counts as ended)
        logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NOT_REACHED)


def _after_fit(signum, frame) -> None:
    """USR1 (Slurm's time-limit warning) once the fit has ended: nothing is left to save. Its default action
    killed the process in its last seconds (the weight check, W&B's finish, the last barrier), and the batch
    script took the finished run for a crash: it requeued the job and kept a sound node out of it."""
    os.write(2, b"preemption (SIGUSR1) after the fit ended: nothing left to save; ignored\n")


class _Vote:
    """The ranks' stop flags, all-reduced (MAX) without making the host wait for the current step.

    ``exchange`` reads the result of the previous call's all-reduce, then launches this call's. On a GPU
    the result is copied to pinned host memory behind the all-reduce, in stream order, and an event marks
    when it is there; so reading it waits for the previous step's kernels, never for the step the host has
    just queued. Every rank calls ``exchange`` at the same optimizer steps, so they read the same value at
    the same step. Buffers are reused: each is read before the next launch overwrites it.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.host = torch.zeros(1, dtype=torch.int32, pin_memory=self.cuda)
        self.work = None
        self.ready = torch.cuda.Event() if self.cuda else None

    def exchange(self, mine: bool) -> bool:
        earlier = self._read()
        self.flag.fill_(int(mine))  # a kernel on the GPU: no host-to-device copy to wait for
        self.work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.cuda:
            self.work.wait()  # on NCCL: the current stream waits for the all-reduce; the host does not
            self.host.copy_(self.flag, non_blocking=True)
            self.ready.record()
        return earlier

    def _read(self) -> bool:
        if self.work is None:
            return False
        if self.cuda:
            self.ready.synchronize()
            value = int(self.host[0])
        else:
            self.work.wait()
            value = int(self.flag[0])
        self.work = None
        return value > 0

    def finish(self) -> None:
        self._read()


class _NotReached(logging.Filter):
    """Drops Lightning's "`Trainer.fit` stopped: ... reached": a preempted run reached no limit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("`Trainer.fit` stopped:")


_NOT_REACHED = _NotReached()


def run_finished(trainer: pl.Trainer) -> bool:
    """Whether the step just taken is the run's last: ``trainer.max_steps`` reached, or the last batch of
    epoch ``trainer.max_epochs - 1``. A preemption there saves and stops as the run would anyway, and
    requeueing the job would only queue a start that has nothing to train."""
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    return max_epochs is not None and max_epochs >= 0 and epoch_finished(trainer) and \
        trainer.current_epoch + 1 >= max_epochs


def _at_optimizer_step(trainer: pl.Trainer) -> bool:
    """Whether this batch ended with an optimizer step. With gradient accumulation a save between two
    micro-batches would drop the gradients accumulated so far (they are not in the checkpoint) while the
    loader position counts their samples as consumed; so a signal waits for the end of the accumulation,
    at most ``accumulate_grad_batches - 1`` batches. Every rank counts the same batches, so all agree."""
    loop = trainer.fit_loop.epoch_loop
    return loop._accumulated_batches_reached() or loop._num_ready_batches_reached()


def slurm_job_cancelled(job_id: str) -> bool:
    """Whether the job is being cancelled (``scancel``): Slurm takes a requeue in the kill grace time, and the
    cancelled job came back. Only accounting says so then (``scontrol`` and ``squeue`` show COMPLETING, as for
    a requeue or the time limit); without it the job counts as not cancelled."""
    from launch.errors import LaunchError
    from launch.slurm import SacctUnavailable, sacct

    try:
        rows = sacct([job_id])  # the job's current record: "CANCELLED" from the cancel on
    except (LaunchError, SacctUnavailable):
        return False
    return any(row.state == "CANCELLED" for row in rows)


_requeue_pending: str | None = None  # the Slurm job rank 0 requeues once every rank is done
_requeue_expected = False  # this rank stopped for a requeue (any rank)
_in_cli = False  # pipeline.cli.main runs the fit: it calls requeue_pending_job after its last barrier


def defer_requeue_to_caller() -> None:
    """Called by ``pipeline.cli.main`` at its start: a preempted fit's requeue waits for its end (and
    nothing is left from an earlier run in this process)."""
    global _in_cli, _requeue_pending, _requeue_expected
    _in_cli, _requeue_pending, _requeue_expected = True, None, False


def ignore_sigterm_before_requeue() -> None:
    """Every rank of a fit stopped for a requeue, before the process group's last barrier: the requeue
    makes Slurm SIGTERM the step, and a rank ended by it there (the callbacks' handlers are gone by then)
    broke the barrier for the others (a traceback in a stop that went well)."""
    if _requeue_expected:
        _ignore_sigterm()


def requeue_pending_job() -> None:
    """The requeue a preempted fit left for after the process group's teardown. The requeue makes Slurm
    SIGTERM the step: from here this process only exits, so the signal is ignored (its default would end
    the process as "Terminated" in srun's report, with nothing left to do)."""
    global _requeue_pending
    job, _requeue_pending = _requeue_pending, None
    if job is None:
        return
    _ignore_sigterm()
    close_wandb_service()  # the requeue's SIGTERM reaches W&B's service too
    requeue_slurm_job(job)


def _ignore_sigterm() -> None:
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue JOB``; the job comes back PENDING and resumes from ``last.ckpt``."""
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("requeue of Slurm job %s failed: %s", job_id, e)
        return False
    if proc.returncode != 0 and "pending" in proc.stderr.lower():
        # a hard requeue (scontrol requeue from outside, SIGTERM) got there first: the job is back already
        log.warning("Slurm job %s is already requeued (pending, or held by scontrol requeuehold): %s", job_id,
                    proc.stderr.strip())
        return True
    if proc.returncode != 0:
        log.error("requeue of Slurm job %s failed (exit %d): %s", job_id, proc.returncode, proc.stderr.strip())
        return False
    log.warning("requeued Slurm job %s", job_id)
    return True

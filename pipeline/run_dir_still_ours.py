"""Before every checkpoint, the run directory's lock still names this job (see ``pipeline.run_lock``), and the
run directory is still where it was when this job started.

Apart from the lock itself so that ``pipeline.run_lock`` stays free of Lightning: the launcher reads
locks with it, and importing Lightning made every ``python -m launch`` command take seconds.
"""
from __future__ import annotations

import logging

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger

from pipeline.errors import ConfigError
from pipeline.run_layout import last_checkpoint
from pipeline.run_lock import RunDirLock, Whereabouts, describe

log = logging.getLogger(__name__)


class RunDirStillOurs(Callback):
    """Before every checkpoint: the lock file still names this job (see ``pipeline.run_lock``). The ranks
    agree (only global rank 0 reads the file), so all of them stop, before anything is written.

    Also before every checkpoint, and before the loggers write (a step that logs, a validation's end, an epoch's
    end): ``RUN/.lock`` is still the file this job locked at its start. A run directory moved (renamed) or deleted
    meanwhile stops the job with one line saying where it went: the next save would have made a new ``RUN/
    checkpoints`` at the old path (no config, no lock, and not what a resume of the moved directory reads), and the
    CSV logger's next write was a ``FileNotFoundError`` traceback."""

    def __init__(self, lock: RunDirLock) -> None:
        self.lock = lock
        self._said_lock_replaced = False

    def on_fit_start(self, trainer, pl_module) -> None:
        """Past the start's checks (the checkpoint restored): this job is the run's last holder from now on,
        whatever ends it (``RunDirLock.release`` puts a refused start's predecessor back)."""
        self.lock.fit_started()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._stop_if_moved(trainer)
        other = self.lock.taken_by()
        if not trainer.strategy.reduce_boolean_decision(bool(other), all=False):
            return
        who = describe(other) if other else "see global rank 0's message"
        raise ConfigError(
            f"trainer.default_root_dir: run directory {self.lock.run_dir} was taken by another training job "
            f"({who}) while this one ran: the lock on {self.lock.path} does not reach across nodes on this "
            f"filesystem (or does not work on it). This job stops without saving at step {trainer.global_step}; "
            f"the other one goes on from the checkpoints. Give each job its own run directory")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """A step whose metrics the loggers write next (Lightning does so right after this hook): same cadence
        on every rank (``trainer.log_every_n_steps``)."""
        if trainer.loggers and trainer._logger_connector.should_update_logs:
            self._stop_if_moved(trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.loggers and not trainer.sanity_checking:
            self._stop_if_moved(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.loggers:
            self._stop_if_moved(trainer)

    def _stop_if_moved(self, trainer) -> None:
        where = self.lock.whereabouts()
        if where is not None and where.kind == "lock":  # the directory is here: saving into it is right
            if not self._said_lock_replaced:
                self._said_lock_replaced = True
                log.warning("%s was deleted or replaced while this job ran: a second job in %s is now found only "
                            "at this one's next checkpoint", self.lock.path, self.lock.run_dir)
            where = None
        if not trainer.strategy.reduce_boolean_decision(where is not None, all=False):
            return
        _drop_unwritten_csv_rows(trainer)  # else Lightning's clean-up after the error writes them: a traceback
        raise ConfigError(self._moved_message(trainer, where))

    def _moved_message(self, trainer, where: Whereabouts | None) -> str:
        run, step = self.lock.run_dir, trainer.global_step
        stops = (f"This job stops without saving at step {step}, and writes nothing at {run} again (a save there "
                 f"would start a new directory without the run's config, lock or checkpoints)")
        if where is None:
            return (f"trainer.default_root_dir: run directory {run} was moved or deleted while this job ran (see "
                    f"global rank 0's message). {stops}")
        if where.kind == "moved":
            last = last_checkpoint(where.now)
            if last.exists():
                saved = _last_saved_step(trainer)
                at = f" (step {saved})" if saved is not None else ""
                resume = (f"its last checkpoint is {last}{at}: `fit --trainer.default_root_dir {where.now}` (the same "
                          f"settings) resumes from it")
            else:
                resume = (f"it holds no checkpoint yet: `fit --trainer.default_root_dir {where.now}` starts the run "
                          f"over there")
            return f"trainer.default_root_dir: run directory {run} was moved to {where.now} while this job ran. " \
                   f"{stops}; {resume}"
        if where.kind == "deleted":
            return (f"trainer.default_root_dir: run directory {run} was deleted while this job ran (its lock "
                    f"{self.lock.path} is gone with it). {stops}")
        return (f"trainer.default_root_dir: run directory {run} disappeared or was moved while this job ran (where "
                f"to, this process cannot tell). {stops}; a fit with --trainer.default_root_dir set to where it went "
                f"resumes from its checkpoints/last.ckpt")


def _last_saved_step(trainer) -> int | None:
    """The step of the last ``last.ckpt`` this job wrote or resumed from."""
    from pipeline.last_checkpoint import LastCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, LastCheckpoint):
            return int(callback._last_global_step_saved)
    return None


def _drop_unwritten_csv_rows(trainer) -> None:
    """The CSV logger's rows not yet in ``metrics.csv`` (Lightning's learning-rate monitor logs at a batch's start,
    written at its end): on an error, Lightning's ``finalize`` writes them into ``RUN/csv``, which is gone with the
    run directory (a ``FileNotFoundError`` traceback in place of the error). They are of steps after the last
    checkpoint, which a resume trains and logs again (``rewind_metrics`` drops such rows). The writer's private
    ``_experiment``: its ``experiment`` property would make the directory again."""
    for logger in trainer.loggers:
        writer = getattr(logger, "_experiment", None) if isinstance(logger, CSVLogger) else None
        if writer is not None and isinstance(getattr(writer, "metrics", None), list):
            writer.metrics.clear()

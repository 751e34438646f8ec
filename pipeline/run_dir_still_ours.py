"""Before every checkpoint, the run directory's lock still names this job (see ``pipeline.run_lock``).

Apart from the lock itself so that ``pipeline.run_lock`` stays free of Lightning: the launcher reads
locks with it, and importing Lightning made every ``python -m launch`` command take seconds.
"""
from __future__ import annotations

from pytorch_lightning.callbacks import Callback

from pipeline.errors import ConfigError
from pipeline.run_lock import RunDirLock, describe


class RunDirStillOurs(Callback):
    """Before every checkpoint: the lock file still names this job (see ``pipeline.run_lock``). The ranks
    agree (only global rank 0 reads the file), so all of them stop, before anything is written."""

    def __init__(self, lock: RunDirLock) -> None:
        self.lock = lock

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        other = self.lock.taken_by()
        if not trainer.strategy.reduce_boolean_decision(bool(other), all=False):
            return
        who = describe(other) if other else "see global rank 0's message"
        raise ConfigError(
            f"trainer.default_root_dir: run directory {self.lock.run_dir} was taken by another training job "
            f"({who}) while this one ran: the lock on {self.lock.path} does not reach across nodes on this "
            f"filesystem (or does not work on it). This job stops without saving at step {trainer.global_step}; "
            f"the other one goes on from the checkpoints. Give each job its own run directory")

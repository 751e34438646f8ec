"""A branch: a run started from another run's checkpoint (``fit --ckpt_path OTHER/checkpoints/last.ckpt``
with a new ``trainer.default_root_dir``). Every checkpoint of the branch records the checkpoint it started
from, so that the same command, run again after a stop, resumes the branch's own ``last.ckpt`` instead of
starting the branch over from ``OTHER`` (which trained over, and then overwrote, everything the branch had
done since). Before the branch's first checkpoint, ``RUN/branched_from`` says where it started: a start with
no ``--ckpt_path`` (``fit --config RUN/config.yaml``, whose ``ckpt_path`` is null) starts from ``OTHER``
again, where it trained a new network from scratch under the branch's name. A ``--ckpt_path`` that is not where this run started, into a run directory with a checkpoint
of its own, is refused: which of the two the user means cannot be told, and either guess loses work.
"""

from __future__ import annotations

from pathlib import Path

from pytorch_lightning.callbacks import Callback

from pipeline.errors import ConfigError
from pipeline.branch_record import origin_name, record_origin

KEY = "branched_from"  # in every checkpoint of a branch: the absolute path of the checkpoint it started from


def resume_point(other: Path, own_last: Path, own_meta: dict) -> Path:
    """Where a ``fit --ckpt_path OTHER`` resumes when its run directory has its own ``last.ckpt`` already:
    that file, when the run is a branch of ``OTHER`` (the same command again); else a ``ConfigError``."""
    started = own_meta.get(KEY)
    if started == origin_name(other):
        return own_last
    step = own_meta.get("global_step")
    what = f"{own_last} (step {step}" + (f", a branch of {started})" if started else ")")
    raise ConfigError(
        f"ckpt_path: {other} is another run's checkpoint, and this run directory has its own {what}: resuming "
        f"{other} would train over it and overwrite it. Drop --ckpt_path to resume this run where it stopped, or "
        f"branch into a new trainer.default_root_dir")


class BranchOrigin(Callback):
    """Stores the checkpoint a branch started from in every checkpoint it saves (``checkpoint[KEY]``); on a
    start from that checkpoint (``record_in``: the run directory), also in ``RUN/branched_from``, as training
    starts (with ``RUN/config.yaml``, once the checkpoint is restored): written before the checks, a refused
    start (another network, another world size for a ZeRO save) left it behind, which kept the refused run
    directory and sent every later start to the checkpoint it had refused."""

    def __init__(self, origin: str, record_in: Path | None = None) -> None:
        self.origin = origin
        self.record_in = record_in

    def on_train_start(self, trainer, pl_module) -> None:
        if self.record_in is not None and trainer.is_global_zero:  # one writer (two nodes may share a pid)
            record_origin(self.record_in, self.origin)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[KEY] = self.origin

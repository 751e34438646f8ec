"""Each ``fit`` start's provenance (``pipeline/provenance.py``: the code's git commit, the software, the GPU, the
ranks, the Slurm job) in every checkpoint it saves and, once, in its loggers.

A checkpoint holds the records of every start whose saves lead to it (``checkpoint["provenance"]``: the
resumed checkpoint's list and this start's record; a branch carries its origin's), so a checkpoint resumed
across preemptions says which code trained which steps even when the code changed between two starts. The
record is made once per start on global rank 0 alone (it asks git) and broadcast, so every rank saves the
same (a ZeRO-3 save writes a model-states file per rank); nothing happens per step.
"""

from __future__ import annotations

import sys

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from pipeline.provenance import KEY, code, collect, records, with_start


class ProvenanceRecord(Callback):
    """Records this start's provenance into every checkpoint it saves and into the loggers: W&B's config
    and the CSV logger's ``hparams.yaml`` under ``provenance`` (W&B's is updated at each start, as the rest of
    its config), and TensorBoard's text tab at the step the start resumed from (TensorBoard's hparams tab shows
    only the first start's parameters of a run directory)."""

    def __init__(self) -> None:
        self.record: dict | None = None  # this start's, once set up
        self.earlier: list[dict] = []  # the records of the checkpoint this start resumed

    def setup(self, trainer, pl_module, stage: str) -> None:
        if getattr(stage, "value", stage) != "fit":
            return
        record = None
        if trainer.is_global_zero:  # git is asked by one process of the whole job
            record = collect(trainer.world_size, trainer.num_nodes, trainer.strategy.root_device,
                             trainer.default_root_dir)
        self.record = trainer.strategy.broadcast(record, src=0)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.earlier = records(checkpoint)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.record is None:
            return
        self.record["start_step"] = int(trainer.global_step)  # restored by now
        if not trainer.is_global_zero:
            return
        note = self.record.get("git_note")
        if note and note != "not a git checkout":  # fixable (a refused checkout, a slow file system): said
            print(f"provenance: {code(self.record)}", file=sys.stderr, flush=True)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                rows = "\n".join(f"| {k} | {v} |" for k, v in self.record.items())
                logger.experiment.add_text(KEY, f"| key | value |\n| --- | --- |\n{rows}",
                                           global_step=int(trainer.global_step))
            else:
                logger.log_hyperparams({KEY: dict(self.record)})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.record is not None:
            checkpoint[KEY] = with_start(self.earlier, self.record)
        elif self.earlier:
            checkpoint[KEY] = list(self.earlier)

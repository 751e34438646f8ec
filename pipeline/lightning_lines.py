"""Lightning's console lines that tell this pipeline's users nothing, dropped from every run's log.

Lightning logs its ``rank_zero_info`` lines through one logger. Some are adverts, some say what this CLI's
own lines already say better, one is about hardware this pipeline never runs on (``pipeline/cli.py``
installs the filter at start-up). Warnings go through ``warnings`` and are filtered in ``cli.main``.
"""

from __future__ import annotations

import logging

RANK_ZERO_LOGGER = "pytorch_lightning.utilities.rank_zero"

DROPPED_PREFIXES = (
    # "💡 Tip: ... try installing litlogger/litmodels": adverts, not run information
    "💡 Tip:",
    # the checkpoint a start loads: the CLI's own line names it with its step first ("resuming from PATH at
    # step N", "validate: PATH (step N)"); Lightning's two said the path again, without the step
    "Restoring states from the checkpoint path at ",
    "Restored all states from the checkpoint at ",
    "Loaded model weights from the checkpoint at ",
    # at every start: this pipeline has no TPU path (its accelerators are cpu and gpu); the "GPU available:
    # ..., used: ..." line before it stays
    "TPU available: False, using: 0 TPU cores",
)


class DropLightningLines(logging.Filter):
    """Drops the records of Lightning's rank-zero logger that start with one of ``DROPPED_PREFIXES``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(DROPPED_PREFIXES)


def drop_lightning_lines() -> None:
    """Install the filter (once per process)."""
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    if not any(isinstance(f, DropLightningLines) for f in logger.filters):
        logger.addFilter(DropLightningLines())



LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric")


def quiet_other_ranks(rank_zero: bool) -> None:
    """On every rank but global rank 0, Lightning's info lines off (its warnings stay): each rank logged its
    own "[rank: k] Seed set to N", "Initializing distributed: GLOBAL_RANK: k, MEMBER: k+1/N" and, on GPUs,
    "LOCAL_RANK: k - CUDA_VISIBLE_DEVICES: [...]": three lines per rank in one Slurm log (96 for 4 nodes x 8
    GPUs), where rank 0's say it once ("All distributed processes registered. Starting with N processes")."""
    if not rank_zero:
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

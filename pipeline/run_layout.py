"""The run directory RUN's layout: the names of the files the trainer, ``launch`` and ``launch status`` write
and read there, and the best-k checkpoints' file names, in one place, so a reader never guesses a writer's
name. No torch or Lightning here: the launcher imports it on login nodes.

The train job's script (launch/templates/train.sbatch) gets the names it uses from here when ``launch`` renders
it. Named elsewhere: ``config-history/`` (pipeline/config_history.py) and
``checkpoints/wandb_rows_after_save.json`` (pipeline/wandb_backlog.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"  # in CHECKPOINTS_DIR; the only ``last`` the trainer saves (LastCheckpoint)
# the best-k ModelCheckpoint's ``filename`` (Lightning adds ``.ckpt``, and ``-vN`` for a name already taken)
BEST_FILENAME = "best-epoch{epoch:03d}-step{step:07d}-top1={val/top1:.4f}"
BEST_GLOB = "best-*.ckpt"
CONFIG_FILE = "config.yaml"  # the resolved config of ``fit`` (Lightning's SaveConfigCallback default name)
CSV_DIR = "csv"  # the CSV logger's folder (Lightning's CSVLogger name)
METRICS_CSV = "metrics.csv"  # in CSV_DIR (the file name Lightning's CSV writer gives)
WANDB_DIR = "wandb"  # W&B's own files (the name W&B gives its folder in the logger's save_dir)
# W&B's cache and config folders, in RUN unless the user set these variables (pipeline/tracking.py)
WANDB_ENV_DIRS = {"WANDB_CACHE_DIR": ".wandb-cache", "WANDB_CONFIG_DIR": ".wandb-config"}
TENSORBOARD_DIR = "tensorboard"  # the TensorBoard logger's folder
RUN_ID_FILE = "wandb_run_id"  # pipeline/run_id_file.py reads and writes it
BRANCH_FILE = "branched_from"  # a branch's origin checkpoint, from its first start (pipeline/branch_origin.py)
LOCK_NAME = ".lock"  # pipeline/run_lock.py
JOBS_FILE = "jobs.jsonl"  # launch/rundir.py: the jobs `launch submit` recorded
SLURM_LOG_GLOB = "slurm-*.out"  # each Slurm job's log (slurm_log)
TRAIN_SCRIPT = "train.sbatch"  # the train job's script, as `launch submit train` wrote it: resubmit it as is
TORCHRUN_ERROR_FILE = "torchrun-error"  # a rank's `error:` under launch torchrun: no restart (pipeline/torchrun_stop.py)
FAILURES_FILE = "launch-failures"  # train.sbatch's "JOB COUNT CKPT_STAMP" of the job's last failed attempt

_TOP1 = r"top1=?(\d+(?:\.\d+)?)"  # "=": since 2026-12 (earlier runs: ``-top10.6500``)
# a best-k name as the trainer gives it, whole: no ``-vN``, no other name
BEST_NAME = re.compile(rf"^best-epoch(\d+)-step(\d+)-{_TOP1}\.ckpt$")
# the top-1 at the end of a name: no ``-vN``, whatever comes between ``best-`` and it
BEST_TOP1 = re.compile(rf"-{_TOP1}\.ckpt$")
# the step of a best-k name, also with Lightning's ``-vN`` (anything between the step and ``.ckpt``); a user's
# copy beside them (``copy-of-best-...``) is not one
BEST_STEP = re.compile(r"^best-epoch\d+-step(\d+)-.*\.ckpt$")


class BestName(NamedTuple):
    """What a best-k checkpoint's name says: no checkpoint is opened."""

    epoch: int
    step: int
    top1: float


def checkpoint_dir(run_dir: str | Path) -> Path:
    """``RUN/checkpoints``: ``last.ckpt`` and the best k (files, or directories under DeepSpeed)."""
    return Path(run_dir) / CHECKPOINTS_DIR


def last_checkpoint(run_dir: str | Path) -> Path:
    """``RUN/checkpoints/last.ckpt``: what every start resumes from."""
    return checkpoint_dir(run_dir) / LAST_CHECKPOINT


def metrics_csv(run_dir: str | Path) -> Path:
    """``RUN/csv/metrics.csv``: the training's CSV log, continued across restarts."""
    return Path(run_dir) / CSV_DIR / METRICS_CSV


def slurm_log(run_dir: str | Path, job: str) -> Path:
    """``RUN/slurm-JOB.out``: a job's Slurm log (``job`` ``%j``: sbatch's ``--output`` pattern for it)."""
    return Path(run_dir) / f"slurm-{job}.out"


def best_name(name: str) -> BestName | None:
    """A best-k file name read whole (``BEST_NAME``); None for any other name, also one with ``-vN``."""
    m = BEST_NAME.match(name)
    return BestName(int(m.group(1)), int(m.group(2)), float(m.group(3))) if m else None


def best_top1(name: str) -> float | None:
    """The top-1 at the end of a name (``BEST_TOP1``); None without one, also with ``-vN``."""
    m = BEST_TOP1.search(name)
    return float(m.group(1)) if m else None


def best_step(name: str) -> int | None:
    """The step of a best-k name, also of a ``-vN`` one (``BEST_STEP``); None for any other name."""
    m = BEST_STEP.match(name)
    return int(m.group(1)) if m else None

"""Experiment tracking: one W&B run per run directory (offline unless a key is set), plus CSV/TensorBoard."""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pytorch_lightning.callbacks import Callback, LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from pipeline.checkpoint_io import atomic_write_bytes
from pipeline.errors import ConfigError
from pipeline.run_id_file import RUN_ID_PATTERN, BadRunIdFile, create_run_id, read_run_id
from pipeline.run_layout import CSV_DIR, RUN_ID_FILE, TENSORBOARD_DIR, WANDB_ENV_DIRS, metrics_csv
from pipeline.wandb_lines import drop_wandb_lines
from pipeline.wandb_logger import ServiceSafeWandbLogger

log = logging.getLogger(__name__)


@dataclass
class TrackingConfig:
    """Where metrics go. W&B is online only when WANDB_API_KEY is set (or WANDB_MODE says so).

    Args:
        wandb: log to Weights & Biases (offline into RUN/wandb without WANDB_API_KEY; one run across restarts).
        project: the W&B project.
        name: the W&B run's display name (default: the run directory's name).
        csv: log to RUN/csv/metrics.csv.
        tensorboard: log to RUN/tensorboard.
    """

    wandb: bool = True
    project: str = "resnet-pipeline"
    name: str | None = None
    csv: bool = True
    tensorboard: bool = False


WANDB_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")


def wandb_disabled() -> bool:
    """``WANDB_MODE=disabled``: the user's way to turn W&B off without editing the config. Lightning's W&B logger
    set WANDB_MODE=dryrun over it when offline, and the run still wrote an offline W&B run."""
    return os.environ.get("WANDB_MODE") == "disabled"


def check_wandb_settings(cfg: TrackingConfig) -> None:
    """What W&B would refuse at ``wandb.init`` (a traceback, after the run directory was set up)."""
    if not cfg.wandb or wandb_disabled():
        return
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("tracking.wandb: the wandb package is not installed here (`make setup` installs it); "
                          "install it, or set tracking.wandb false")
    bad = sorted({c for c in "/\\#?%:" if c in cfg.project})
    if bad or not cfg.project or len(cfg.project) > 128:
        raise ConfigError(f"tracking.project: {cfg.project!r} is not a W&B project name (1-128 characters, none "
                          f"of / \\ # ? % :); the entity (team) comes from WANDB_ENTITY")
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={mode!r} is not a W&B mode ({', '.join(WANDB_MODES)}); or set "
                          f"tracking.wandb false")


def run_id(run_dir: str | Path, from_checkpoint: str | None = None) -> str:
    """The W&B run id of a run directory: WANDB_RUN_ID if set, else made once and kept in the directory
    (``pipeline.run_id_file``).

    Every restart of the run (requeue, resume) reads the same id, so W&B continues one run. When the
    directory lost its id file (a checkpoint copied elsewhere, ``--ckpt_path`` from another directory),
    the id recorded in the checkpoint (``from_checkpoint``) is kept instead of starting a new run."""
    env = os.environ.get("WANDB_RUN_ID")
    if env:
        if not RUN_ID_PATTERN.match(env):  # W&B refused it at the first log, in a traceback: Slurm restarted it
            raise ConfigError(f"tracking.wandb: WANDB_RUN_ID={env[:40]!r} is not a W&B run id (1-64 letters, "
                              f"digits, _ . -): unset it (the run directory's {RUN_ID_FILE} file gives the id) or "
                              f"set the run's id")
        # kept in the directory (a later start without the variable continues it); one left over in the shell
        # from another run named another W&B run than the directory's without a word, and split its history
        try:
            kept = create_run_id(run_dir, env)
        except BadRunIdFile as e:
            raise _bad_id_file(e) from None
        if kept != env:
            raise ConfigError(f"tracking.wandb: WANDB_RUN_ID={env!r} is another W&B run than this run directory's "
                              f"({Path(run_dir) / RUN_ID_FILE}: {kept!r}), which every start of it continues: unset "
                              f"WANDB_RUN_ID; a job script of launch's exports the id it was written with: submit "
                              f"it again with `python -m launch submit train`, which writes the file's")
        return env
    try:
        return create_run_id(run_dir, from_checkpoint or secrets.token_hex(4))
    except BadRunIdFile as e:
        raise _bad_id_file(e) from None


def _bad_id_file(e: BadRunIdFile) -> ConfigError:
    return ConfigError(f"tracking.wandb: {e.path} holds {e.text[:40]!r}, not a W&B run id (1-64 letters, digits, "
                       f"_ . -): write the run's id there, or delete the file: the run then continues the W&B run its "
                       f"checkpoint records, or starts a new one when it has no checkpoint")


RUN_ID_KEY = "wandb_run_id"  # the checkpoint's key (the run directory's file: run_layout.RUN_ID_FILE)


class RunIdInCheckpoint(Callback):
    """Stores the W&B run id in every checkpoint (``checkpoint[RUN_ID_KEY]``)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RUN_ID_KEY] = self.run_id


class CheckpointStep(Callback):
    """An evaluation (``validate``, ``test``) of a training checkpoint logs at that checkpoint's step and epoch,
    where its training logged (``trainer/global_step``, the x-axis of the W&B group's charts): evaluations
    of several checkpoints line up with the training's curves instead of all sitting at step 0.

    That step is the checkpoint's ``global_step`` less one: the training logs a batch's rows, and the
    validation that follows it, before it counts the batch's optimizer step in the loggers' step (the
    validation of the weights after step 36 sits at step 35); ``global_step`` counts it."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn in ("validate", "test"):
            # the loops are not restored for an evaluation: these two feed only the logged step and epoch
            trainer.fit_loop.epoch_loop._batches_that_stepped = max(int(checkpoint.get("global_step", 0)) - 1, 0)
            trainer.fit_loop.epoch_progress.current.completed = int(checkpoint.get("epoch", 0))


def wandb_offline() -> bool:
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    return not os.environ.get("WANDB_API_KEY")


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run appends to it instead."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """``RUN/csv/metrics.csv`` continued across restarts (``rewind_metrics`` first drops the rows of the
    steps the resumed run trains again)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def set_aside_metrics(run_dir: str | Path) -> Path | None:
    """At a fresh start (no checkpoint to resume): an existing ``RUN/csv/metrics.csv`` holds the rows of an
    earlier start that saved no checkpoint (killed before its first save); appended to, its steps were
    repeated. It is kept as ``csv/metrics-lost-start-N.csv``; the new start writes a new ``metrics.csv``."""
    path = metrics_csv(run_dir)
    if not path.is_file():
        return None
    aside = _free_name(path, "metrics-lost-start")
    os.replace(path, aside)
    return aside


def _free_name(path: Path, stem: str) -> Path:
    """``STEM-N.csv`` beside ``path``, the first N not taken."""
    n = 1
    while (aside := path.with_name(f"{stem}-{n}.csv")).exists():
        n += 1
    return aside


def rewind_metrics(run_dir: str | Path, step: int) -> int:
    """Before a resume of the run's ``last.ckpt`` at optimizer step ``step``: drop the rows at the end of
    ``RUN/csv/metrics.csv`` logged at ``step`` or later (a row's ``step`` is Lightning's count of optimizer
    steps before it: the training rows of optimizer step ``step + 1`` on, and the learning rate they use). A
    start killed (SIGKILL, the OOM killer, a node failure) after its last checkpoint logged them, and the
    resumed run logs those steps again: each appeared twice. Only the file's last rows, back to one of an
    earlier step: rows of later steps above that are an earlier timeline's (a run taken back by hand to one
    of its checkpoints). The file is replaced atomically; one that cannot be read as CSV (a node crash's
    tail of NUL bytes) is set aside as ``metrics-unreadable-N.csv``. Returns the number of rows dropped."""
    path = metrics_csv(run_dir)
    if not path.is_file():
        return 0
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
    except (csv.Error, UnicodeDecodeError, ValueError) as e:
        aside = _free_name(path, "metrics-unreadable")
        os.replace(path, aside)
        log.warning("%s cannot be read (%s): set aside as %s; this start's rows begin a new file", path, e, aside)
        return 0
    if not header or "step" not in header:
        return 0
    col = header.index("step")

    def later(row: list[str]) -> bool:
        if len(row) != len(header):  # a row cut short by the kill
            return True
        try:
            return int(row[col]) >= step
        except ValueError:
            return False  # a row without a step: not one of the training's

    end = len(rows)
    while end and later(rows[end - 1]):
        end -= 1
    if end == len(rows):
        return 0
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows[:end])
    atomic_write_bytes(text.getvalue().encode("utf-8"), path)
    return len(rows) - end


def make_loggers(cfg: TrackingConfig, run_dir: str | Path, wandb_id: str | None = None,
                 resume_step: int | None = None) -> list[Logger]:
    """W&B (offline unless a key is set), CSV and TensorBoard loggers of a run directory's training.

    ``resume_step``: a resume of the run's ``last.ckpt`` at that optimizer step. TensorBoard's writer then
    starts with a purge at that step (torch's ``purge_step``, a SessionLog START event): TensorBoard drops
    what earlier event files hold at that step or later, the steps a start killed after its last save logged
    and this one logs again (each was there twice; ``rewind_metrics`` does the same for the CSV).

    The API key is read by wandb from the environment and never passed through or written here."""
    run_dir = Path(run_dir)
    loggers: list[Logger] = []
    if cfg.wandb:
        _wandb_dirs(run_dir)
        drop_wandb_lines()
        loggers.append(_quiet(
            ServiceSafeWandbLogger(
                project=cfg.project, name=cfg.name or run_dir.name, id=(rid := wandb_id or run_id(run_dir)),
                resume="allow", save_dir=str(run_dir), offline=wandb_offline(),
                # the group its validate/test runs join (make_eval_loggers); WANDB_RUN_GROUP if the user set one
                group=os.environ.get("WANDB_RUN_GROUP") or rid, job_type="fit",
            )
        ))
    if cfg.csv:
        loggers.append(ResumableCSVLogger(str(run_dir), name=CSV_DIR, version=""))
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(str(run_dir), name=TENSORBOARD_DIR, version="",
                                         **({"purge_step": resume_step} if resume_step is not None else {})))
    return loggers


def make_eval_loggers(cfg: TrackingConfig, run_dir: str | Path, stage: str, ckpt: str | None) -> list[Logger]:
    """Loggers of a ``validate``/``test`` of a run directory, apart from its training's: a new W&B run
    grouped with the training run (``job_type`` the stage), and ``RUN/<stage>/csv/version_N/`` (and
    ``tensorboard/``). In the training's own loggers an evaluation would append a step-0 row to its
    ``metrics.csv`` and a second writer to its W&B run, also while the training is still running."""
    run_dir = Path(run_dir)
    root = run_dir / stage
    what = f"{stage} {Path(ckpt).stem}" if ckpt else stage
    loggers: list[Logger] = []
    if cfg.wandb or cfg.csv or cfg.tensorboard:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"trainer.default_root_dir: cannot write {root} ({e.strerror or e}), where {stage} "
                              f"logs; give a writable trainer.default_root_dir and the checkpoint as --ckpt_path "
                              f"PATH") from None
    if cfg.wandb:
        _wandb_dirs(run_dir)
        drop_wandb_lines()
        try:
            group = os.environ.get("WANDB_RUN_GROUP") or read_run_id(run_dir)  # None before the first start
        except BadRunIdFile as e:
            raise _bad_id_file(e) from None
        root.mkdir(parents=True, exist_ok=True)
        # an id of its own, also where WANDB_RUN_ID names the training's run (the Slurm script exports it)
        loggers.append(_quiet(
            ServiceSafeWandbLogger(project=cfg.project, name=f"{cfg.name or run_dir.name} {what}", group=group,
                        job_type=stage, save_dir=str(root), offline=wandb_offline(), id=secrets.token_hex(4),
                        resume="never")
        ))
    if cfg.csv:
        loggers.append(CSVLogger(str(root), name=CSV_DIR))
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(str(root), name=TENSORBOARD_DIR))
    return loggers


def _quiet(logger: WandbLogger) -> WandbLogger:
    """Without the ``anonymous`` argument Lightning always passes to ``wandb.init`` (None when unused), which
    wandb 0.31 answers with "WARNING The anonymous setting has no effect" in every job log."""
    if getattr(logger, "_wandb_init", {}).get("anonymous", False) is None:
        del logger._wandb_init["anonymous"]
    return logger


def _wandb_dirs(run_dir: Path) -> None:
    for env, name in WANDB_ENV_DIRS.items():
        os.environ.setdefault(env, str(run_dir / name))


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's monitor, one row per optimizer step: it logs at each training batch's start, so with
    gradient accumulation (a resume keeping the global batch with a smaller per-rank batch chooses it) every
    lr row came ``accumulate_grad_batches`` times at the same step."""

    def __init__(self) -> None:
        super().__init__(logging_interval="step")
        self._logged_step = -1

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step == self._logged_step:
            return
        self._logged_step = trainer.global_step
        super().on_train_batch_start(trainer, *args, **kwargs)

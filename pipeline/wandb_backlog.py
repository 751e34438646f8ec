"""Metrics logged after a SIGTERM reach the W&B run when the training resumes.

Slurm's SIGTERM also ends W&B's service process, so ``Preemption`` detaches the W&B logger at once (a log
call to the dead service would raise before the checkpoint is saved). What is still logged before the
run stops (the validation running when the signal came, or due after the stopping step: a point of the
val/top1 curve) reached only CSV and TensorBoard, and the dashboard had a hole there for good: the resumed
run does not validate that epoch again. ``Preemption`` puts a ``Recorder`` in the W&B logger's place; what
it records is saved in the checkpoints written on the way out (this callback's state) and logged to the
resumed W&B run at the next start, at its own ``trainer/global_step`` (the x-axis of the run's charts).

Rows recorded after the last save (the train metrics of the stopping step: Lightning logs them after the
callbacks' ``on_train_batch_end``, where the preemption save happens) are not in any checkpoint. At the
fit's end they go to ``RUN/checkpoints/wandb_rows_after_save.json`` with the step of that save; a resume
from exactly that step logs them too, any other start drops the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger, WandbLogger

from pipeline.wandb_logger import ServiceSafeWandbLogger
from pipeline.wandb_service import close_wandb_service, finish_after_teardown, finish_wandb_run, wandb_service_alive

log = logging.getLogger(__name__)

MAX_HELD = 1000  # rows: a stop comes within a validation of the signal; this only bounds a pathology
AFTER_SAVE = "wandb_rows_after_save.json"  # in the checkpoint folder
LOGGED = "wandb_rows_logged.json"  # in the checkpoint folder: the checkpoint whose held rows a complete start logged


class _NoSendToDeadService(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "socket.send() raised exception."


_NO_SEND_TO_DEAD_SERVICE = _NoSendToDeadService()


class Recorder(Logger):
    """Stands in for the detached W&B logger: keeps each ``log_metrics`` call (global rank 0 only, like
    the W&B logger it replaces) in its ``WandbBacklog``."""

    def __init__(self, backlog: WandbBacklog, is_global_zero: bool) -> None:
        super().__init__()
        self._backlog, self._record = backlog, is_global_zero

    @property
    def name(self) -> str:
        return "wandb-backlog"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the W&B run has the config from its start

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._record:
            self._backlog.hold(metrics, step)


class WandbBacklog(pl.Callback):
    """Holds the metrics W&B missed after a SIGTERM, in the checkpoint, until a resumed run logs them."""

    def __init__(self, checkpoint_dir: str | Path | None = None) -> None:
        self.held: list[dict] = []  # {"step": int | None, "metrics": {name: float}}
        self.detached = False
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._saved = 0  # rows of ``held`` in the last checkpoint written

    @property
    def state_key(self) -> str:
        return "WandbBacklog"

    def detach(self, trainer: pl.Trainer) -> None:
        """Put a ``Recorder`` in place of the trainer's W&B logger (from a signal handler: no I/O here)."""
        if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
            self.detached = True
            # W&B still forwards the console to its service: "socket.send() raised exception." per line
            logging.getLogger("asyncio").addFilter(_NO_SEND_TO_DEAD_SERVICE)
            recorder = Recorder(self, trainer.is_global_zero)
            trainer.loggers = [recorder if isinstance(lg, WandbLogger) else lg for lg in trainer.loggers]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, ServiceSafeWandbLogger):
                logger.on_service_lost = lambda e, metrics, step: self._service_lost(trainer, e, metrics, step)

    def _service_lost(self, trainer: pl.Trainer, error: Exception, metrics: dict | None, step: int | None) -> None:
        """W&B's service is gone: the training goes on, W&B's rows are held as after a SIGTERM."""
        log.warning("W&B: its service process is gone (%s) at step %d; the training goes on, and the W&B run gets "
                    "this start's rows (up to %d) when the run resumes; all are in the CSV log", type(error).__name__,
                    trainer.global_step if step is None else step, MAX_HELD)  # the logs' step of the row it missed
        self.detach(trainer)
        if metrics:
            self.hold(metrics, step)

    def hold(self, metrics: dict[str, Any], step: int | None) -> None:
        numbers = {}
        for k, v in metrics.items():  # numbers (and one-element tensors); a log_image's pictures are not kept
            try:
                numbers[k] = float(v)
            except (TypeError, ValueError, RuntimeError):
                continue
        if numbers and len(self.held) < MAX_HELD:
            self.held.append({"step": None if step is None else int(step), "metrics": numbers})

    def state_dict(self) -> dict:
        self._saved = len(self.held)  # called when a checkpoint is written
        return {"held": list(self.held)}

    def load_state_dict(self, state: dict) -> None:
        self.held = list(state.get("held") or [])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log what the previous run held to the (resumed) W&B run; dropped when this run has no W&B, or when
        a start that found the run complete logged them already (``log_rows_of_complete_run``)."""
        held, self.held = self.held + self._rows_after_save(trainer), []
        if not held or not trainer.is_global_zero or logged_already(trainer.ckpt_path):
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for row in held:
                    logger.log_metrics(row["metrics"], row["step"])
                log.info("W&B: logged the %d metric rows of the previous run after its SIGTERM (last at step %s)",
                         len(held), held[-1]["step"])

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Lightning calls no callback's ``teardown`` after an exception: the run is finished here, failed
        (a requeued job's resume continues it). After a SIGTERM W&B's service is gone: nothing to finish."""
        if not self.detached:
            self._finish_wandb_run(trainer, exit_code=1)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The W&B run ends here. After a SIGTERM, W&B's own exit hook would tell its (killed) service process
        that the run ended, and print a 30-line ``ConnectionResetError`` traceback into every preempted job's
        log: its teardown runs here instead, and a dead service is one line. Otherwise the run is finished
        here (``on_exception`` after an error): left to the exit hook, W&B's service process printed the
        run's footer itself, with terminal colour codes even into a Slurm log file."""
        if not self.detached or stage != "fit":
            if trainer.world_size > 1 and trainer.is_global_zero:
                # after the process group's last barrier (pipeline.cli.main): the other ranks would wait
                # there, under the collective timeout, while this one uploads what W&B has left
                finish_after_teardown()
            else:
                self._finish_wandb_run(trainer, exit_code=0)
            return
        self.detached = False
        self._keep_rows_after_save(trainer)
        if trainer.is_global_zero and wandb_service_alive():
            # the signal reached this process alone (`kill PID`, not a Slurm step's): the service would finish
            # the run in teardown and print its footer itself, with terminal colour codes, into the job's stdout
            finish_wandb_run(exit_code=0)
        close_wandb_service()  # W&B's service may have gone with the signal: then one line, no traceback

    def _finish_wandb_run(self, trainer: pl.Trainer, exit_code: int) -> None:
        if trainer.is_global_zero:
            finish_wandb_run(exit_code)

    def _keep_rows_after_save(self, trainer: pl.Trainer) -> None:
        rows = self.held[self._saved:]
        if not rows or not trainer.is_global_zero or self.checkpoint_dir is None:
            return
        from pipeline.checkpoint_io import atomic_write_bytes

        try:
            atomic_write_bytes(json.dumps({"global_step": trainer.global_step, "rows": rows}).encode(),
                               self.checkpoint_dir / AFTER_SAVE)
        except OSError as e:  # the run stops either way; only these dashboard points are lost
            log.warning("W&B: cannot keep the %d metric rows logged after the last save (%s)", len(rows), e)

    def _rows_after_save(self, trainer: pl.Trainer) -> list[dict]:
        """The rows a stopped run logged after its last save, when this run resumes from that save."""
        if self.checkpoint_dir is None or not trainer.is_global_zero:
            return []
        path = self.checkpoint_dir / AFTER_SAVE
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError):  # none (the usual case), or unreadable: nothing to add
            return []
        finally:
            path.unlink(missing_ok=True)
        if not isinstance(kept, dict) or kept.get("global_step") != trainer.global_step:
            return []  # another start (an older checkpoint, a fresh run): those steps run again
        return [row for row in kept.get("rows", []) if isinstance(row, dict) and "metrics" in row]


def _stamp(path: str | Path) -> str | None:
    """A checkpoint file's identity: it is replaced at every save (a new inode), never rewritten in place."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return f"{st.st_ino}.{st.st_mtime_ns}"


def logged_already(ckpt_path: str | Path | None) -> bool:
    if ckpt_path is None or (stamp := _stamp(ckpt_path)) is None:
        return False
    try:
        return json.loads((Path(ckpt_path).parent / LOGGED).read_text()).get("checkpoint") == stamp
    except (OSError, ValueError, AttributeError):
        return False


def held_rows(checkpoint: dict, checkpoint_dir: Path) -> list[dict]:
    """The W&B rows a stopped start held for the next one: those saved in `checkpoint`, then those it logged
    after that save (``AFTER_SAVE``, when it is of the checkpoint's step)."""
    state = (checkpoint.get("callbacks") or {}).get("WandbBacklog") or {}
    rows = [row for row in state.get("held") or [] if isinstance(row, dict) and "metrics" in row]
    try:
        kept = json.loads((checkpoint_dir / AFTER_SAVE).read_text())
    except (OSError, ValueError):
        return rows
    if isinstance(kept, dict) and kept.get("global_step") == checkpoint.get("global_step"):
        rows += [row for row in kept.get("rows", []) if isinstance(row, dict) and "metrics" in row]
    return rows


def log_rows_of_complete_run(wandb_logger: Logger, ckpt_path: str | Path, checkpoint: dict) -> list[dict]:
    """A start that finds the run complete (nothing to train) logs what its last start held for W&B: a
    SIGTERM in the last validation (Slurm's preemption, whose requeue is this start) left the run's final
    val/top1 in the checkpoint, and no resume would ever log it. Once per checkpoint (``LOGGED``); a resume of
    that checkpoint (a larger max_steps) does not log them again. Returns the rows logged (none: [])."""
    ckdir = Path(ckpt_path).parent
    rows = held_rows(checkpoint, ckdir)
    if not rows or logged_already(ckpt_path):
        return []
    for row in rows:
        wandb_logger.log_metrics(row["metrics"], row["step"])
    finish_wandb_run(exit_code=0)
    from pipeline.checkpoint_io import atomic_write_bytes

    try:
        atomic_write_bytes(json.dumps({"checkpoint": _stamp(ckpt_path)}).encode(), ckdir / LOGGED)
    except OSError as e:  # logged; a later start may log them again
        log.warning("W&B: cannot record that the held rows were logged (%s)", e)
    (ckdir / AFTER_SAVE).unlink(missing_ok=True)
    return rows

"""Callbacks for tests: the process signals itself at a chosen training batch, as Slurm would; a failure."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytorch_lightning as pl


class SignalAtBatch(pl.Callback):
    """Send ``signum`` to this process when training batch ``batch_idx`` (0-based, in the epoch) starts;
    with ``rank`` set, only on that global rank (the others must learn of it from the vote)."""

    def __init__(self, batch_idx: int, signum: int = int(signal.SIGUSR1), rank: int | None = None) -> None:
        self.batch_idx, self.signum, self.rank = batch_idx, signum, rank

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.batch_idx and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class SignalAtSanityCheck(pl.Callback):
    """Send ``signum`` to this process when the sanity-check validation starts (before any training step)."""

    def __init__(self, signum: int = int(signal.SIGUSR1)) -> None:
        self.signum = signum

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module) -> None:
        os.kill(os.getpid(), self.signum)


class FailAtValidationEnd(pl.Callback):
    """Raise at the end of the first validation, in the main process, while the loaders' workers live."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            raise RuntimeError("FailAtValidationEnd: a failure in the training process")


class KillFirstAttempt(pl.Callback):
    """SIGKILL this process when global step ``step`` starts on global rank ``rank``: a crash the launcher
    should recover from. Only in the first attempt (torchrun's ``TORCHELASTIC_RESTART_COUNT`` and Slurm's
    ``SLURM_RESTART_COUNT`` 0 or unset), or in every attempt with ``every_attempt``.
    Under torchrun, in later attempts global rank ``late_rank`` starts ``late_s`` later than the others (the
    CLI builds callbacks before the process group), so they look up its address before it has published a
    new one."""

    def __init__(self, step: int, rank: int = 0, every_attempt: bool = False, late_rank: int = 1,
                 late_s: float = 3.0) -> None:
        self.step, self.rank = step, rank
        first = all(os.environ.get(k, "0") == "0" for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
        self.armed = every_attempt or first
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and os.environ.get("RANK") == str(late_rank):
            time.sleep(late_s)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.armed and trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillAgentAt(pl.Callback):
    """SIGKILL this process's parent (under torchrun: the agent, as a ``kill -9`` of the torchrun pid would)
    when global step ``step`` starts on global rank ``rank``."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getppid(), signal.SIGKILL)


class StopAtBatch(pl.Callback):
    """Set ``trainer.should_stop`` after training batch ``batch_idx`` of the first epoch, whatever the
    gradient accumulation: Lightning's ``max_time`` timer stops after any micro-batch too."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            trainer.should_stop = True


class SignalInValidation(pl.Callback):
    """Send ``signum`` to this process when the validation of epoch ``epoch`` starts (not the sanity check)."""

    def __init__(self, epoch: int = 0, signum: int = int(signal.SIGUSR1)) -> None:
        self.epoch, self.signum, self.sent = epoch, signum, False

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not self.sent and not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class KillInValidation(pl.Callback):
    """SIGKILL this process when the validation of epoch ``epoch`` starts (not the sanity check), in the
    first attempt only (see ``KillFirstAttempt``)."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch
        self.armed = all(os.environ.get(k, "0") == "0" for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self.armed and not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class StopAt(pl.Callback):
    """Set ``trainer.should_stop`` after global step ``step``, as Lightning's ``max_time`` timer does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class CopyLastAt(pl.Callback):
    """Copy ``RUN/checkpoints/last.ckpt`` to ``RUN/last-at-stepN.ckpt`` when it holds global step ``step`` (at
    the next batch's start; with ``checkpoint.every_n_train_steps 1``): the state a later kill goes back to."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            run = Path(trainer.default_root_dir)
            shutil.copy(run / "checkpoints" / "last.ckpt", run / f"last-at-step{self.step}.ckpt")


class TakeRunDirAt(pl.Callback):
    """When global step ``step`` starts, write another job's record into ``RUN/.lock``, as a second job on
    another node writes it where ``flock`` works within a node only (it got the "lock" too)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            import json
            from pathlib import Path

            Path(trainer.default_root_dir, ".lock").write_text(json.dumps(
                {"job": "slurm job 9999 step 0 restart 0", "slurm_job_id": "9999", "restart": 0,
                 "host": "node-b", "pid": 4321, "since": "2026-12-02T10:00:00+00:00"}) + "\n")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (from /proc), as Slurm's process tracking sees a job step's."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


class TermStepInValidation(pl.Callback):
    """SIGTERM to this process and all of its descendants (loader workers, W&B's service process, which
    runs in a session of its own) when the validation of epoch ``epoch`` starts: what Slurm does to a step.
    Sent by another process (``kill``), as by slurmstepd: loader workers end on their parent's SIGTERM."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch, self.sent = epoch, False

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not self.sent and not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            self.sent = True
            subprocess.run(["kill", "-TERM", *map(str, descendants(os.getpid()))], check=False)


class SlowValidation(pl.Callback):
    """Sleep ``seconds`` at the end of each validation (time between two epochs that is not training)."""

    def __init__(self, seconds: float = 5.0) -> None:
        self.seconds = seconds

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            time.sleep(self.seconds)


class KillWandbService(pl.Callback):
    """SIGKILL this process's W&B service process when training batch ``batch_idx`` starts, and wait until
    it is gone (as the OOM killer, or Slurm's SIGTERM reaching it before the trainer's handler ran)."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx != self.batch_idx or not trainer.is_global_zero:
            return
        services = []
        for pid in descendants(os.getpid())[1:]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"wandb-core" in f.read().split(b"\0")[0]:  # W&B's service binary
                        services.append(pid)
            except OSError:
                continue
        assert services, "no W&B service process found"
        for pid in services:
            os.kill(pid, signal.SIGKILL)
        for pid in services:  # a child: reaped by whoever waits for it; gone from /proc or a zombie
            for _ in range(200):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                            break
                except OSError:
                    break
                time.sleep(0.05)

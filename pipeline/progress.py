"""Training progress on the console: tqdm's bar on a terminal, plain lines in a log file (Slurm's).

Both refresh every ``log_every_n_steps`` steps, on the loggers' grid of global steps (and at an epoch's
last batch). Reading a metric on the host waits for the GPU to finish
the step that produced it. Lightning converts every metric logged with ``prog_bar=True`` to a Python
number at each step, whether a bar shows it or not (Lightning-AI/pytorch-lightning#21232), and rich's bar
reads its metrics at every step whatever its refresh rate. So the module logs ``train/loss`` without
``prog_bar`` and these read it from ``trainer.callback_metrics`` (tensors, not converted) only when they
refresh: one synchronisation per ``log_every_n_steps`` steps, when the loggers read the metrics anyway.

In a file, tqdm's carriage returns and cursor codes make one endless line; ``LineProgress`` writes one
line per refresh (``epoch 3 batch 1200/5004 | train/loss 2.314 | 7.71 it/s``: batches of the epoch, micro-batches under
gradient accumulation, as Lightning counts them) and one per validation of a fit.
"""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import _update_n
from pytorch_lightning.trainer.states import TrainerFn

SHOWN = ("train/loss",)


def _shown(trainer: pl.Trainer, keys: tuple[str, ...] = SHOWN) -> dict[str, str]:
    out = {}
    for key in keys:
        value = trainer.callback_metrics.get(key)
        if value is not None:
            out[key] = f"{float(value):.4g}"
    return out


class _EpochBatches:
    """The batches of the epoch, whatever the run's length. Lightning's bars count the steps left instead
    when ``max_epochs`` is unset and ``max_steps`` is (the CIFAR config's 64,000 steps): ``batch 5/5``
    then ``batch 10/0`` in a run of 10 steps, and ``batch 300/40`` near a long run's end."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.num_training_batches


def _on_loggers_grid(trainer: pl.Trainer, every: int) -> bool:
    """This batch ended an optimizer step at which the loggers write a row (every ``every`` global
    steps, a grid that runs on across epochs, and the step a run stops at: a preemption, which the
    progress callback, run last, sees): a refresh there reads the metrics when they do."""
    return (trainer.global_step % every == 0 or trainer.should_stop) and not trainer.fit_loop._should_accumulate()


class StepProgressBar(_EpochBatches, TQDMProgressBar):
    """tqdm's bar with ``train/loss`` read at refreshes only, on the loggers' steps (and an epoch's last)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        return {**super().get_metrics(trainer, pl_module), **_shown(trainer)}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, n = self.train_progress_bar, batch_idx + 1
        if bar is not None and self.is_enabled and (_on_loggers_grid(trainer, self.refresh_rate) or n == bar.total):
            _update_n(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))


class LineProgress(_EpochBatches, ProgressBar):
    """One plain line every ``refresh_rate`` optimizer steps, where the loggers write their rows (and at an
    epoch's last batch), one per validation."""

    def __init__(self, refresh_rate: int = 50) -> None:
        super().__init__()
        self.refresh_rate = max(1, int(refresh_rate))
        self._enabled = True
        self._since: tuple[float, int] | None = None  # (time, batches done) at the last line

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._since is None:  # the epoch's first batch in this process (mid-epoch after a resume)
            self._since = (time.perf_counter(), batch_idx)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        n = batch_idx + 1
        total = self.total_train_batches
        # on the loggers' grid of optimizer steps (they read the metrics there anyway: one synchronisation),
        # which runs on across epochs; and at the epoch's last batch
        if not self._enabled or not (_on_loggers_grid(trainer, self.refresh_rate) or n == total):
            return
        now = time.perf_counter()
        t0, n0 = self._since or (now, n)
        self._since = (now, n)
        parts = [f"epoch {trainer.current_epoch} batch {n}/{total}"]
        parts += [f"{k} {v}" for k, v in _shown(trainer).items()]
        if n > n0 and now > t0:
            parts.append(f"{(n - n0) / (now - t0):.2f} it/s")
        print(" | ".join(parts), flush=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The validations of a fit; ``validate`` ends with Lightning's table of the same metrics, which this
        line repeated just above it."""
        if not self._enabled or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        shown = _shown(trainer, ("val/top1", "val/top5", "val/loss"))
        print(" | ".join([f"epoch {trainer.current_epoch} validation"] + [f"{k} {v}" for k, v in shown.items()]),
              flush=True)


def console_progress(refresh_rate: int, interactive: bool | None = None) -> ProgressBar:
    """The bar for this process's stdout: tqdm's on a terminal, plain lines otherwise."""
    if interactive is None:
        interactive = sys.stdout.isatty()
    return StepProgressBar(refresh_rate=refresh_rate) if interactive else LineProgress(refresh_rate)

"""The training progress bar: tqdm's, refreshed every ``log_every_n_steps`` steps, showing the training loss.

Reading a metric on the host waits for the GPU to finish the step that produced it. Lightning converts
every metric logged with ``prog_bar=True`` to a Python number at each step, whether a bar shows it or not
(Lightning-AI/pytorch-lightning#21232), and rich's bar reads its metrics at every step whatever its refresh
rate. So the module logs ``train/loss`` without ``prog_bar`` and this bar reads it from
``trainer.callback_metrics`` (tensors, not converted) only when it refreshes: one synchronisation per
``log_every_n_steps`` steps, when the loggers read the metrics anyway.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

SHOWN = ("train/loss",)


class StepProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        for key in SHOWN:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                items[key] = f"{float(value):.4g}"
        return items

"""Once per run: an image grid of an augmented training batch, as the model sees it (after crops and
flips, before normalisation), to W&B (``wandb.Image``), TensorBoard (``add_image``) and as a PNG in the
run directory. A look at it catches wrong crops, colour channels or label shuffles in seconds."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image

GRID_FILE = "train_batch_grid.png"
log = logging.getLogger(__name__)


def to_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 batches pass through; normalised float batches (DALI) are mapped back to 0..255."""
    if images.dtype == torch.uint8:
        return images
    x = images.float() * std.to(images.device) + mean.to(images.device)
    return x.clamp(0, 255).round().to(torch.uint8)


class SampleGrid(Callback):
    """Args: max_images: how many images of the first batch go into the grid."""

    def __init__(self, run_dir: str | Path, max_images: int = 32) -> None:
        self.path = Path(run_dir) / GRID_FILE
        self.max_images = max_images
        self._done = False  # checked before the file: no stat() per step on a cluster file system

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._done:
            return
        self._done = True
        if not trainer.is_global_zero or self.path.exists():
            return  # once per run, not once per restart
        images, labels = batch[0][: self.max_images], batch[1][: self.max_images]
        x = to_uint8(images.detach(), pl_module.mean, pl_module.std).cpu()
        grid = make_grid(x.contiguous(), nrow=8, padding=2)  # (3, H, W) uint8
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:  # a picture for the eye: a full disk here must not end the run, nor leave half a PNG
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_image(grid.float() / 255, tmp, format="png")
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.warning("cannot write %s (%s); training goes on", self.path, e.strerror or e)
        caption = "labels: " + " ".join(str(int(v)) for v in labels.tolist())
        for logger in trainer.loggers:
            try:  # W&B writes the image as a PNG in the system's temporary directory first
                if isinstance(logger, WandbLogger):
                    logger.log_image("samples/train_batch", [grid.permute(1, 2, 0).numpy()],
                                     step=trainer.global_step, caption=[caption])
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image("samples/train_batch", grid, trainer.global_step)
            except OSError as e:
                log.warning("cannot log the sample grid to %s (%s); training goes on",
                            "W&B" if isinstance(logger, WandbLogger) else "TensorBoard", e.strerror or e)

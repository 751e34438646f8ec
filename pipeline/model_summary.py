"""The model summary at the start of ``fit``, with the network's FLOPs.

Lightning counts FLOPs only by running an ``example_input_array`` through the model (a compiled model
would then be compiled for a batch of one); without one its summary prints 0. Here the same module class
is built on the meta device (shapes only: no memory, no compute) and one image of the training size goes
through it under a ``FlopCounterMode`` that then becomes the summary's: the FLOPs of one image's forward pass, per layer
and in total, as torch counts them (2 per multiply-add: ResNet-50 8.2 B, i.e. the 4.1 G multiply-adds of
docs/models.md).
"""

from __future__ import annotations

import inspect
import logging

import torch
from pytorch_lightning.callbacks import ModelSummary, RichModelSummary
from pytorch_lightning.utilities.model_summary import ModelSummary as Summary
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)


def count_flops(summary: Summary, pl_module: torch.nn.Module, size: int) -> None:
    """Give ``summary`` the FLOP counts of one ``size`` x ``size`` image through a meta twin of ``pl_module``
    (in eval mode: BatchNorm in training mode refuses a batch of one at a 1x1 feature map). On an error
    the summary keeps its empty counter: no partial count."""
    hparams = {**pl_module.hparams, "compile": False, "init_weights": None}
    counter = FlopCounterMode(display=False, depth=summary._flop_counter.depth)
    with torch.device("meta"):
        # hparams also hold what LightningCLI adds (``_instantiator``): the init arguments only
        twin = type(pl_module)(**{k: v for k, v in hparams.items() if k in _init_args(pl_module)}).eval()
        with counter, torch.no_grad():
            twin(torch.empty(1, 3, size, size))
    summary._flop_counter = counter


def _init_args(pl_module) -> set[str]:
    return set(inspect.signature(type(pl_module).__init__).parameters) - {"self"}


class _WithFlops:
    def _summary(self, trainer, pl_module):
        summary = super()._summary(trainer, pl_module)
        size = getattr(getattr(trainer.datamodule, "augment", None), "train_size", None)
        if isinstance(summary, Summary) and pl_module.example_input_array is None and size:
            try:
                count_flops(summary, pl_module, int(size))
            except Exception as e:  # only the summary's numbers depend on it
                log.warning("model summary: FLOPs not counted (%s: %s)", type(e).__name__, e)
        return summary


class FlopsModelSummary(_WithFlops, ModelSummary):
    """Lightning's plain-text summary with FLOPs."""


class FlopsRichModelSummary(_WithFlops, RichModelSummary):
    """Lightning's rich summary with FLOPs."""

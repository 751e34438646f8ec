"""RNG states (torch CPU/CUDA, numpy, python) in the checkpoint, restored on resume.

The CPU loader needs none (its augmentation is a pure function of seed, epoch and position), but anything
else drawing random numbers during training (dropout, stochastic depth, random erasing on the device)
continues the same stream after a restart, which bit-exact resume requires. Each rank stores its own
states under its rank in the checkpoint that rank 0 writes (gathered), so a rank restores its own.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


def collect() -> dict[str, Any]:
    """States as tensors, ints and tuples only, so checkpoints still load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


class RNGState(Callback):
    """Saves every rank's RNG states; each rank restores its own (or rank 0's when the world grew)."""

    def __init__(self) -> None:
        self._loaded: dict[int, dict] | None = None

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        mine = collect()
        if trainer is None or trainer.world_size == 1:
            return {"ranks": {0: mine}}
        gathered = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, mine)
        return {"ranks": dict(enumerate(gathered))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("ranks")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded:
            restore(self._loaded.get(trainer.global_rank, self._loaded[0]))
            self._loaded = None

    _trainer: pl.Trainer | None = None

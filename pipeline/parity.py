"""At the end of a multi-rank fit, check that every rank holds bit-identical parameters (DDP's promise).

A divergence (a rank that skipped an all-reduce, non-deterministic buffers, a broken SyncBN setup) would
otherwise go unnoticed until evaluation. The check hashes the parameters on each rank (not the buffers: see ``weights_digest``), gathers
the digests and raises if they differ; it logs one line either way.
"""

from __future__ import annotations

import hashlib
import logging

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the parameters. Buffers are left out: without SyncBN each rank's BN running stats
    follow its own last batch (DDP re-broadcasts rank 0's at the next forward; rank 0's are saved)."""
    h = hashlib.sha256()
    for name, t in sorted(module.named_parameters()):
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class WeightParity(Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size < 2 or not dist.is_initialized() or "deepspeed" in type(trainer.strategy).__name__.lower():
            return
        mine = weights_digest(pl_module.model)
        digests: list[str | None] = [None] * trainer.world_size
        dist.all_gather_object(digests, mine)
        if len(set(digests)) != 1:
            raise RuntimeError(f"weights differ across ranks after training: {digests}")
        if trainer.is_global_zero:
            log.info("weight parity: identical on %d ranks (sha256 %s)", trainer.world_size, mine[:16])

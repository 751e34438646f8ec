"""Speed telemetry: images/s per rank and in total, the share of step time spent waiting for data, and
peak GPU memory, logged every ``log_every_n_steps`` over the window since the previous log (and at the
step a run stops at, where Lightning logs too). Lightning writes no row at an epoch's last step: the
window goes on into the next epoch, less the time between the two (validation, checkpoints).

Waiting for data is the wall time between the end of one training batch and the start of the next (the
loader's ``next()`` plus Lightning's transfer to the device); on a GPU the device may still be busy with
queued kernels during that time, so the share is an upper bound of what the device itself lost. A share
near 0 means the loader keeps up; a rising share means the step is input-bound (more workers, DALI).
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class Throughput(Callback):
    def __init__(self) -> None:
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.window_start = now
        self.last_end: float | None = None
        self.wait = 0.0
        self.images = 0
        self.steps = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.perf_counter()
        if self.steps and self.last_end is not None:  # the last epoch's steps since its last row: kept,
            self.window_start += now - self.last_end  # without the time between the epochs
            self.last_end = now
        else:
            self._reset(now)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        self.wait += now - (self.last_end if self.last_end is not None else self.window_start)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        self.last_end = now
        images = batch[0]
        self.images += int(images.shape[0])
        if trainer.fit_loop._should_accumulate():  # inside an accumulation group: no optimizer step, no log row
            return
        self.steps += 1
        # Lightning also logs the step where the run stops (a preemption): that row gets this window's own
        # values, where it repeated the previous row's (callback metrics stay in Lightning's step results)
        due = trainer.global_step % max(1, trainer.log_every_n_steps) == 0
        if not (due or trainer.should_stop):
            return
        elapsed = max(now - self.window_start, 1e-9)
        per_rank = self.images / elapsed
        total = per_rank
        if trainer.world_size > 1:
            total = float(trainer.strategy.reduce(torch.tensor(per_rank, device=pl_module.device),
                                                  reduce_op="sum"))
        metrics = {
            "perf/img_per_s_per_rank": per_rank,
            "perf/img_per_s_total": total,
            "perf/data_wait_share": min(1.0, self.wait / elapsed),
            "perf/step_time_s": elapsed / max(1, self.steps),  # per optimizer step (all its micro-batches)
        }
        if pl_module.device.type == "cuda":
            metrics["perf/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            metrics["perf/gpu_mem_reserved_gib"] = torch.cuda.memory_reserved(pl_module.device) / 2**30
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        for k, v in metrics.items():
            pl_module.log(k, float(v), on_step=True, on_epoch=False, rank_zero_only=True)
        self._reset(now)
        self.last_end = now

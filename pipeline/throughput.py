"""Speed telemetry: images/s per rank and in total, the share of step time spent waiting for data, and
peak GPU memory, logged every ``log_every_n_steps`` over the window since the previous log (and at the
step a run stops at, where Lightning logs too). Lightning writes no row at an epoch's last step: the
window goes on into the next epoch, less the time between the two (validation, checkpoints).

Waiting for data is the wall time between the end of one training batch and the start of the next (the
loader's ``next()`` plus Lightning's transfer to the device); on a GPU the device may still be busy with
queued kernels during that time, so the share is an upper bound of what the device itself lost. A share
near 0 means the loader keeps up; a rising share means the step is input-bound (more workers, DALI).

Stragglers. With more than one rank, each rank's window (images, wall time, data wait) is gathered at every
row, in one ``all_gather`` of three floats per rank (it replaces the sum that ``perf/img_per_s_total`` took;
no collective at the steps between rows). Under DDP (and DeepSpeed) every rank's step ends at the same
gradient all-reduce, so the window's wall time, and with it images/s over the window, is the same on every
rank: a slow rank sets every rank's pace and is not the one with the lowest images/s. What differs per rank
is how that wall time splits into waiting for data and time inside the training step (compute plus waiting
inside the all-reduce for the last rank to arrive). A rank whose loader is slow (slow local disk, too few CPU
cores for its workers, a noisy neighbour) waits for data longest, and the others spend that time waiting for
it inside their step; so:

* ``perf/data_wait_share_max`` and ``perf/data_wait_share_max_rank``: the largest data-wait share over the
  ranks and which rank has it: the input-bound straggler when it stands out from the others.
* ``perf/img_per_s_in_step_min``: the lowest, over the ranks, of a rank's images per second of the time it
  spent inside its training steps (its window less its own data wait). With ``d_i`` rank i's data wait and
  ``T`` the window, that is ``images / (T - min_i d_i)``: the rate the run would reach if the data wait that
  every rank has were gone (a loader too slow on every node). A straggler's own extra wait stays in it (the
  other ranks spend it inside their steps, waiting for the straggler), so with one input-bound rank it stays
  close to ``perf/img_per_s_per_rank``, and its ``data_wait_share_max_rank`` is the one to fix.

A rank slow in its compute (a throttled GPU) waits for data no longer than the others and shortens no one's
step: these host timers cannot name it (that needs the time each rank waits inside the all-reduce, which on
a GPU the host sees only with a sync at every step); it shows as every rank's lower rate.

Rank 0 also prints one ``input-bound:`` line when one rank's share exceeds the median of the other ranks'
by ``INPUT_BOUND_OVER_MEDIAN`` and is ``INPUT_BOUND_RATIO`` times it, naming the rank and its host (gathered
once, at the fit's start); again only when another rank is the straggler or after ``INPUT_BOUND_REPEAT_S``.
"""

from __future__ import annotations

import logging
import socket
import statistics
import time

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)

INPUT_BOUND_OVER_MEDIAN = 0.20  # a rank's data-wait share this far above the other ranks' median (share points)
INPUT_BOUND_RATIO = 3.0  # and this many times it: one input-bound rank, not every rank's loader too slow
INPUT_BOUND_REPEAT_S = 600.0  # the same straggler is named again at most this often


def window_metrics(windows: list[tuple[float, float, float]]) -> dict[str, float]:
    """The ``perf/*`` over the ranks of one row from each rank's window ``(images, wall seconds, data-wait
    seconds)``, listed by rank: rank 0's own rate and share, the total, the largest share and its rank, and
    the lowest rate in the training step (module docstring)."""
    shares = [min(1.0, wait / max(elapsed, 1e-9)) for _, elapsed, wait in windows]
    in_step = [images / max(elapsed - wait, 1e-9) for images, elapsed, wait in windows]
    worst = max(range(len(shares)), key=lambda r: (shares[r], -r))
    images, elapsed, _ = windows[0]
    return {
        "perf/img_per_s_per_rank": images / max(elapsed, 1e-9),
        "perf/img_per_s_total": sum(i / max(e, 1e-9) for i, e, _ in windows),
        "perf/data_wait_share": shares[0],
        "perf/data_wait_share_max": shares[worst],
        "perf/data_wait_share_max_rank": float(worst),
        "perf/img_per_s_in_step_min": min(in_step),
    }


def input_bound_rank(shares: list[float]) -> tuple[int, float] | None:
    """``(rank, median of the other ranks' shares)`` when one rank waits for data much more than the others
    (``INPUT_BOUND_OVER_MEDIAN``, ``INPUT_BOUND_RATIO``), else None; None with one rank."""
    if len(shares) < 2:
        return None
    rank = max(range(len(shares)), key=lambda r: (shares[r], -r))
    median = statistics.median(shares[:rank] + shares[rank + 1:])
    if shares[rank] - median >= INPUT_BOUND_OVER_MEDIAN and shares[rank] >= INPUT_BOUND_RATIO * median:
        return rank, median
    return None


def input_bound_line(rank: int, host: str, share: float, median: float, steps: int) -> str:
    return (f"input-bound: rank {rank} ({host}) waited for data {share:.0%} of the last {steps} steps, the "
            f"median of the other ranks {median:.0%}: its loader (more data.num_workers, a local copy of the "
            f"shards, DALI)")


class Throughput(Callback):
    def __init__(self) -> None:
        self._reset(time.perf_counter())
        self.hosts: list[str] = [socket.gethostname()]
        self._named: tuple[int, float] | None = None  # the straggler last named, and when

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Each rank's host, once (rows name a straggler's node without gathering strings every row)."""
        self.hosts = [socket.gethostname()]
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            hosts: list[str | None] = [None] * trainer.world_size
            dist.all_gather_object(hosts, self.hosts[0])
            self.hosts = [str(h) for h in hosts]

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
        mine = (float(self.images), max(now - self.window_start, 1e-9), self.wait)
        windows = [mine]
        if trainer.world_size > 1:  # the row's one collective: three floats per rank
            # torch.distributed's own (Lightning's strategy.all_gather goes through torch.distributed.nn, whose
            # FutureWarning each rank printed into the job log)
            local = torch.tensor(mine, dtype=torch.float64, device=pl_module.device)
            gathered = [torch.empty_like(local) for _ in range(trainer.world_size)]
            dist.all_gather(gathered, local)
            windows = [tuple(row) for row in torch.stack(gathered).cpu().tolist()]  # one copy to the host
        metrics = window_metrics(windows)
        metrics["perf/step_time_s"] = mine[1] / max(1, self.steps)  # per optimizer step (all its micro-batches)
        if trainer.world_size < 2:  # the straggler keys only where there are ranks to compare
            for key in ("perf/data_wait_share_max", "perf/data_wait_share_max_rank", "perf/img_per_s_in_step_min"):
                del metrics[key]
        elif trainer.is_global_zero:
            self._name_straggler([min(1.0, w / e) for _, e, w in windows])
        if pl_module.device.type == "cuda":
            metrics["perf/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            metrics["perf/gpu_mem_reserved_gib"] = torch.cuda.memory_reserved(pl_module.device) / 2**30
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        for k, v in metrics.items():
            pl_module.log(k, float(v), on_step=True, on_epoch=False, rank_zero_only=True)
        self._reset(now)
        self.last_end = now

    def _name_straggler(self, shares: list[float]) -> None:
        found = input_bound_rank(shares)
        if found is None:
            return
        rank, median = found
        now = time.monotonic()
        if self._named is not None and self._named[0] == rank and now - self._named[1] < INPUT_BOUND_REPEAT_S:
            return
        self._named = (rank, now)
        host = self.hosts[rank] if rank < len(self.hosts) else "?"
        log.info("%s", input_bound_line(rank, host, shares[rank], median, self.steps))

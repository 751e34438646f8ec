"""The sharding and epoch contract that every loader backend obeys.

One function of (shard sizes, seed, epoch, world size, rank, batch size, accumulation, position) decides
which samples each rank reads and in what order. Backends (cpu, dali, dali-cpu) only turn these sample ids into pixels,
so they cannot disagree about coverage, order, epoch length or resume position.

Sample ids are global within a split: shard 0's samples are 0..n0-1, shard 1's follow, and so on.

Train epoch: a seeded, shard-aware permutation (shards are shuffled, then samples are shuffled inside
windows of a few consecutive shards, so a rank touches few shards at a time). Batch ``s`` consumes
``order[s*G:(s+1)*G]`` with ``G = world_size * batch_size``; rank ``r`` takes the ``r``-th block of
``batch_size`` in it. The tail that does not fill a global batch of the optimizer (``G * accumulate``
samples, with gradient accumulation) is left out, and it is different every epoch because the permutation
is.

Resume: the position is the number of samples of the epoch's order already consumed. The rest of the
epoch is re-split for whatever world size and batch size the restarted job has, so nothing is repeated
and nothing skipped.

Validation: the unshuffled ids are cut into ``world_size`` contiguous runs of ``ceil(N / W)``; short runs
are padded with masked entries, so every sample is evaluated exactly once and all ranks run the same
number of batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

PAD = -1  # id of a padding entry in a validation batch (masked out of the metrics)


@dataclass(frozen=True)
class Position:
    """Where training stands inside an epoch: ``consumed`` samples of ``epoch``'s order are done, in
    ``batches`` steps (the trainer's own count, which the progress bar and epoch length continue from).

    ``seed`` and ``window_shards`` are those of the order the epoch was started with (None: the sampler's
    own); a resume with another seed finishes that epoch in its order, or it would repeat and skip samples.
    """

    epoch: int = 0
    consumed: int = 0
    batches: int = 0
    seed: int | None = None
    window_shards: int | None = None


def train_order(
    shard_sizes: Sequence[int], seed: int, epoch: int, window_shards: int = 4
) -> np.ndarray:
    """The epoch's permutation of all sample ids (int64), shard-aware for I/O locality."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    if sizes.ndim != 1 or (sizes < 0).any():
        raise ValueError(f"shard_sizes must be non-negative counts, got {shard_sizes!r}")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    shard_perm = rng.permutation(len(sizes))
    window = max(1, int(window_shards))
    parts = []
    for w in range(0, len(shard_perm), window):
        ids = np.concatenate(
            [np.arange(starts[s], starts[s] + sizes[s], dtype=np.int64) for s in shard_perm[w : w + window]]
        )
        parts.append(rng.permutation(ids))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def epoch_samples(num_samples: int, world_size: int, batch_size: int, accumulate: int = 1) -> int:
    """The samples an epoch trains on: the whole global batches (``world_size * batch_size * accumulate``)
    that fit in the split. So every optimizer step takes a full global batch, and the epoch's length (and
    with it the learning-rate schedule) depends on the global batch alone, not on how ranks, per-rank batch
    and accumulation split it: a resume on another world size that keeps the global batch keeps both."""
    _check_geometry(world_size, 0, batch_size)
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    step = world_size * batch_size * accumulate
    return num_samples // step * step


def steps_in_epoch(
    num_samples: int, world_size: int, batch_size: int, consumed: int = 0, accumulate: int = 1
) -> int:
    """Batches (per rank; micro-batches under accumulation) left in an epoch after ``consumed`` samples.

    Whole optimizer steps of the rest: fewer than ``world_size * batch_size * accumulate`` samples left out.
    A position inside an accumulation group of this geometry (``consumed`` a whole number of micro-batches
    that is not a whole number of steps) first completes its group. A position from another global batch
    (the contract used directly; the CLI keeps the global batch on a resume) counts steps from itself: the
    end counted from the epoch's start could leave out almost two global batches, or all of the rest."""
    epoch_samples(num_samples, world_size, batch_size, accumulate)  # checks the geometry
    micro = world_size * batch_size
    done = (consumed // micro) % accumulate if consumed % micro == 0 else 0  # micro-batches of the open group
    return max(0, (max(0, num_samples - consumed) // micro + done) // accumulate * accumulate - done)


def train_batches(
    order: np.ndarray, world_size: int, rank: int, batch_size: int, consumed: int = 0, accumulate: int = 1
) -> np.ndarray:
    """This rank's batches for the rest of the epoch: int64 array of shape (steps, batch_size).

    Row ``i`` is what this rank trains on at the ``i``-th step after the position ``consumed``.
    """
    _check_geometry(world_size, rank, batch_size)
    if consumed < 0 or consumed > len(order):
        raise ValueError(f"consumed={consumed} is outside the epoch of {len(order)} samples")
    steps = steps_in_epoch(len(order), world_size, batch_size, consumed, accumulate)
    g = world_size * batch_size
    rest = order[consumed : consumed + steps * g].reshape(steps, world_size, batch_size)
    return np.ascontiguousarray(rest[:, rank, :])


def val_batches(num_samples: int, world_size: int, rank: int, batch_size: int) -> np.ndarray:
    """This rank's validation batches, shape (steps, batch_size); ``PAD`` marks masked entries."""
    _check_geometry(world_size, rank, batch_size)
    per_rank = -(-num_samples // world_size)
    steps = -(-per_rank // batch_size)
    ids = np.full(steps * batch_size, PAD, dtype=np.int64)
    lo, hi = min(rank * per_rank, num_samples), min((rank + 1) * per_rank, num_samples)
    ids[: hi - lo] = np.arange(lo, hi, dtype=np.int64)
    return ids.reshape(steps, batch_size)


def _check_geometry(world_size: int, rank: int, batch_size: int) -> None:
    if world_size < 1 or batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"invalid loader geometry: world_size={world_size}, rank={rank}, batch_size={batch_size}"
        )


class TrainSampler:
    """One rank's train batches, epoch after epoch, starting from a resume ``Position``.

    Yields int64 arrays of shape (3, batch_size): row 0 the sample ids, row 1 their positions in the
    epoch's order, row 2 the epoch (backends derive per-sample augmentation seeds from (seed, epoch, position), so the
    augmentation of a sample does not depend on world size, worker count or restarts).
    Usable directly as a DataLoader ``sampler`` with ``batch_size=None``; Lightning calls ``set_epoch``.
    """

    def __init__(
        self,
        shard_sizes: Sequence[int],
        seed: int,
        world_size: int,
        rank: int,
        batch_size: int,
        window_shards: int = 4,
        start: Position = Position(),
        accumulate: int = 1,
    ) -> None:
        _check_geometry(world_size, rank, batch_size)
        self.shard_sizes = list(int(s) for s in shard_sizes)
        self.num_samples = sum(self.shard_sizes)
        self.seed, self.world_size, self.rank, self.batch_size = seed, world_size, rank, batch_size
        self.accumulate = int(accumulate)
        self.window_shards = window_shards
        self.start = start
        self.epoch = start.epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _resumed(self) -> bool:
        return self.epoch == self.start.epoch and self.start.consumed > 0

    def _consumed_at_start(self) -> int:
        return self.start.consumed if self._resumed() else 0

    def __len__(self) -> int:
        """Batches of the whole epoch, counting those done before a resume (Lightning's progress)."""
        done = self.start.batches if self._resumed() else 0
        return done + steps_in_epoch(self.num_samples, self.world_size, self.batch_size, self._consumed_at_start(),
                                     self.accumulate)

    def order_params(self) -> tuple[int, int]:
        """(seed, window_shards) of the current epoch's order: a resumed epoch keeps the ones it started with."""
        seed, window = self.seed, self.window_shards
        if self._resumed():
            seed = seed if self.start.seed is None else self.start.seed
            window = window if self.start.window_shards is None else self.start.window_shards
        return seed, window

    def __iter__(self):
        consumed = self._consumed_at_start()
        seed, window = self.order_params()
        order = train_order(self.shard_sizes, seed, self.epoch, window)
        batches = train_batches(order, self.world_size, self.rank, self.batch_size, consumed, self.accumulate)
        g = self.world_size * self.batch_size
        base = consumed + self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        for step, ids in enumerate(batches):
            yield np.stack([ids, base + step * g, np.full_like(ids, self.epoch)])


class ValSampler:
    """One rank's validation batches; rows as ``TrainSampler``'s (``PAD`` ids mark padding)."""

    def __init__(self, num_samples: int, world_size: int, rank: int, batch_size: int) -> None:
        self.batches = val_batches(num_samples, world_size, rank, batch_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for ids in self.batches:
            yield np.stack([ids, ids, np.zeros_like(ids)])

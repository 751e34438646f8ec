"""The sharding and epoch contract: coverage, equal batch counts, exact validation, resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.data.contract import (
    PAD, Position, TrainSampler, ValSampler, epoch_samples, steps_in_epoch, train_batches, train_order, val_batches,
)

SHARDS = [37, 50, 50, 13, 50, 1, 49]  # uneven, like a real last shard
N = sum(SHARDS)


def test_train_order_is_a_seeded_permutation_that_changes_each_epoch():
    a0, a1 = train_order(SHARDS, seed=3, epoch=0), train_order(SHARDS, seed=3, epoch=1)
    assert sorted(a0.tolist()) == list(range(N))
    assert np.array_equal(a0, train_order(SHARDS, seed=3, epoch=0))
    assert not np.array_equal(a0, a1)
    assert not np.array_equal(a0, train_order(SHARDS, seed=4, epoch=0))


def test_train_order_is_shard_aware():
    """With a window of one shard, consecutive samples come from one shard at a time."""
    sizes = [10] * 6
    order = train_order(sizes, seed=0, epoch=0, window_shards=1)
    shards_in_blocks = [set((order[i : i + 10] // 10).tolist()) for i in range(0, 60, 10)]
    assert all(len(s) == 1 for s in shards_in_blocks)
    assert len(set().union(*shards_in_blocks)) == 6


@pytest.mark.parametrize("world,batch", list(itertools.product([1, 2, 3, 4, 7], [1, 5, 16, 64])))
@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_train_epoch_geometry(world, batch, epoch):
    order = train_order(SHARDS, seed=11, epoch=epoch)
    per_rank = [train_batches(order, world, r, batch) for r in range(world)]
    steps = {len(b) for b in per_rank}
    assert steps == {steps_in_epoch(N, world, batch)}, "every rank gets the same number of full batches"
    seen = np.concatenate([b.reshape(-1) for b in per_rank])
    assert len(np.unique(seen)) == len(seen), "no sample twice in an epoch"
    assert N - len(seen) <= world * batch - 1, "at most world*batch-1 samples left out"
    assert all(b.shape[1:] == (batch,) for b in per_rank if len(b))


@pytest.mark.parametrize("world,batch,acc", [(1, 8, 3), (2, 8, 3), (3, 5, 2), (1, 64, 4), (2, 4, 8), (7, 1, 5)])
def test_an_epoch_is_whole_optimizer_batches_under_accumulation(world, batch, acc):
    """With accumulation every optimizer step takes a full global batch (world * batch * acc): the batch
    count is a multiple of acc (no last step on a partial accumulation), at most one global batch - 1 is
    left out, and any split of the same global batch (a resume on another world size) trains the same
    epoch in the same number of steps."""
    order = train_order(SHARDS, seed=2, epoch=1)
    per_rank = [train_batches(order, world, r, batch, accumulate=acc) for r in range(world)]
    steps = steps_in_epoch(N, world, batch, accumulate=acc)
    assert {len(b) for b in per_rank} == {steps} and steps % acc == 0
    used = np.concatenate([b.reshape(-1) for b in per_rank])
    assert len(used) == epoch_samples(N, world, batch, acc) and N - len(used) <= world * batch * acc - 1
    global_batch = world * batch * acc
    for w2, b2, a2 in ((1, global_batch, 1), (global_batch, 1, 1), (1, 1, global_batch)):
        assert epoch_samples(N, w2, b2, a2) == len(used)
        assert steps_in_epoch(N, w2, b2, accumulate=a2) // a2 == steps // acc
    sampler = TrainSampler(SHARDS, 2, world, 0, batch, accumulate=acc)
    sampler.set_epoch(1)
    assert len(sampler) == len(list(sampler)) == steps
    for done in range(steps):  # a stop inside an accumulation group: the resume completes it, same epoch end
        assert steps_in_epoch(N, world, batch, done * world * batch, acc) == steps - done


def test_left_out_samples_differ_between_epochs():
    world, batch = 3, 16
    left = []
    for epoch in range(4):
        order = train_order(SHARDS, seed=0, epoch=epoch)
        used = np.concatenate([train_batches(order, world, r, batch).reshape(-1) for r in range(world)])
        left.append(frozenset(set(range(N)) - set(used.tolist())))
    assert len(set(left)) == 4


@pytest.mark.parametrize("world,batch", list(itertools.product([1, 2, 3, 5, 8], [1, 4, 32, 1000])))
def test_validation_covers_every_sample_exactly_once(world, batch):
    per_rank = [val_batches(N, world, r, batch) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1, "all ranks run the same number of batches"
    ids = np.concatenate([b.reshape(-1) for b in per_rank])
    real = ids[ids != PAD]
    assert sorted(real.tolist()) == list(range(N))


def _global_sequence(sampler_factory, epochs):
    """Sample ids in the order the whole job consumes them: step by step, rank by rank."""
    seq = []
    for epoch in epochs:
        samplers = sampler_factory()
        for s in samplers:
            s.set_epoch(epoch)
        for rows in zip(*[iter(s) for s in samplers]):
            seq.extend(np.concatenate([r[0] for r in rows]).tolist())
    return seq


@pytest.mark.parametrize("old,new", [((2, 8), (2, 8)), ((2, 8), (3, 8)), ((4, 4), (1, 16)), ((1, 10), (3, 7))])
def test_resume_continues_the_key_sequence(old, new):
    """Stop after k steps, restart (maybe with another world size): nothing repeated, nothing skipped."""
    w0, b0 = old
    w1, b1 = new
    epoch = 2
    full = _global_sequence(lambda: [TrainSampler(SHARDS, 5, w0, r, b0) for r in range(w0)], [epoch])
    for k in range(1, steps_in_epoch(N, w0, b0)):  # every stop: (2, 8) -> (3, 8) at k=14 left 26 of 250 out
        _resume_after(k, old, new, full, epoch)


def _resume_after(k: int, old: tuple[int, int], new: tuple[int, int], full: list[int], epoch: int) -> None:
    w0, b0 = old
    w1, b1 = new
    first = full[: k * w0 * b0]
    pos = Position(epoch=epoch, consumed=k * w0 * b0, batches=k)
    rest = _global_sequence(lambda: [TrainSampler(SHARDS, 5, w1, r, b1, start=pos) for r in range(w1)], [epoch])
    order = train_order(SHARDS, 5, epoch).tolist()
    assert first + rest == order[: len(first) + len(rest)], "continues the same permutation"
    assert len(first) + len(rest) >= N - (w1 * b1 - 1)
    if old == new:
        assert first + rest == full
    # the next epoch after a resumed one is a full, fresh epoch
    sampler = TrainSampler(SHARDS, 5, w1, 0, b1, start=pos)
    sampler.set_epoch(epoch + 1)
    assert len(list(sampler)) == steps_in_epoch(N, w1, b1) == len(sampler)


def test_sampler_rows_carry_positions_and_epoch():
    s = TrainSampler(SHARDS, 0, world_size=2, rank=1, batch_size=4)
    s.set_epoch(3)
    rows = list(s)
    order = train_order(SHARDS, 0, 3)
    for step, r in enumerate(rows):
        assert np.array_equal(order[r[1]], r[0]), "position row indexes the epoch's order"
        assert (r[2] == 3).all()
    assert rows[0][1].tolist() == [4, 5, 6, 7]


def test_val_sampler_len_and_padding():
    s = ValSampler(10, world_size=3, rank=2, batch_size=3)
    rows = list(s)
    assert len(rows) == len(s) == 2
    assert rows[0][0].tolist() == [8, 9, PAD]


@pytest.mark.parametrize("bad", [dict(world_size=0, rank=0, batch_size=1), dict(world_size=2, rank=2, batch_size=1),
                                 dict(world_size=1, rank=0, batch_size=0)])
def test_invalid_geometry_is_refused(bad):
    with pytest.raises(ValueError, match="invalid loader geometry"):
        val_batches(10, **bad)


def test_an_evaluation_batch_is_at_most_a_ranks_share_of_the_split():
    """Evaluation batches are padded to full size: ``data.val_batch_size`` 10^9 for a split of 363 samples
    allocated gigabytes until the kernel killed the run."""
    from pipeline.datamodule import eval_batch

    assert eval_batch(10**9, 363, 1) == 363
    assert eval_batch(10**9, 363, 4) == 91
    assert eval_batch(50, 363, 4) == 50
    assert eval_batch(100, 0, 4) == 1

"""Loader edge cases: resuming at an epoch's end with another batch size, resuming with another seed,
a train split smaller than one global batch, a negative seed."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.kill_resume import fit_command, run_to_end
from pipeline.data.contract import Position, TrainSampler, steps_in_epoch, train_order
from pipeline.data.shards import ShardSet
from pipeline.datamodule import ShardDataModule
from pipeline.errors import ConfigError

SIZES = [37, 50, 50, 13, 50, 1, 49]


def _position(run) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["ShardDataModule"]


@pytest.mark.parametrize("every_n", [1, 0], ids=["saved-at-last-batch", "saved-at-epoch-end"])
def test_resume_at_an_epoch_end_with_another_batch_size(digits_shards, tmp_path, every_n):
    """5 steps of batch 256 end epoch 0 (1434 samples); resumed as batch 128 x accumulate 2, one more step
    is the first step of epoch 1: 2 micro-batches, 256 samples of epoch 1. Lightning kept the old count
    (5 batches), which in batches of 128 neither ends epoch 0 nor starts epoch 1 at 0: it re-entered
    epoch 0 (its order from the start) or began epoch 1 at batch 5 with a one-micro-batch step."""
    run = tmp_path / "run"
    every = ["--checkpoint.every_n_train_steps", str(every_n)]
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, run, 5, ["--data.batch_size", "256", *every]), log)
        assert (_position(run)["epoch"], _position(run)["consumed"]) == (1, 0)
        run_to_end(fit_command(digits_shards, run, 6, ["--data.batch_size", "128", *every]), log)
    pos = _position(run)
    assert (pos["epoch"], pos["consumed"], pos["batches"], pos["accumulate"]) == (1, 256, 2, 2), pos


def test_resume_with_another_seed_finishes_the_epoch_in_its_order():
    """A resume mid-epoch with a new seed: the rest of the epoch follows the order it started with (a new
    order would repeat some samples and skip others); the next epoch uses the new seed."""
    epoch, consumed = 2, 3 * 32
    start = Position(epoch, consumed, 3, seed=5, window_shards=2)
    sampler = TrainSampler(SIZES, seed=6, world_size=2, rank=0, batch_size=16, window_shards=4, start=start)
    sampler.set_epoch(epoch)
    ids = np.concatenate([rows[0] for rows in sampler])
    order = train_order(SIZES, 5, epoch, 2)
    steps = steps_in_epoch(sum(SIZES), 2, 16, consumed)
    assert ids.tolist() == order[consumed:consumed + steps * 32].reshape(steps, 2, 16)[:, 0].reshape(-1).tolist()
    sampler.set_epoch(epoch + 1)
    assert np.array_equal(next(iter(sampler))[0], train_order(SIZES, 6, epoch + 1, 4)[:16])


def test_datamodule_resumes_with_the_checkpoints_order(digits_shards):
    """The seed and window of the epoch's order travel in the checkpoint's loader state."""
    dm = ShardDataModule(str(digits_shards), backend="cpu", batch_size=64, num_workers=0, seed=1)
    dm.load_state_dict({"classes_sha256": dm.classes_digest(), "splits_sha256": dm.split_digests(),
                        "epoch": 0, "consumed": 128, "batches": 2,
                        "world_size": 1, "batch_size": 64, "seed": 0, "window_shards": 4})
    first = next(iter(dm.train_dataloader().sampler))[0]
    sizes = ShardSet(digits_shards, "train").shard_sizes
    assert np.array_equal(first, train_order(sizes, 0, 0, 4)[128:192])


def _trainer_at(batch: int, accumulate: int, num_batches: int) -> SimpleNamespace:
    """What ShardDataModule reads of a one-rank trainer after ``batch`` batches of epoch 0."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=batch))
    return SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True, current_epoch=0, global_step=0,
                           accumulate_grad_batches=accumulate, num_training_batches=num_batches,
                           state=SimpleNamespace(fn="fit"),
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def test_a_save_between_two_optimizer_steps_records_the_last_steps_position(digits_shards, caplog):
    """A stop that did not wait for the step (LastCheckpoint makes the timer's and should_stop's wait; one
    from another hook may not): 5 micro-batches of 64 with accumulation 2 hold 2 steps, so the position is
    4 batches, 256 samples; the 5th is trained again after the resume (it was recorded consumed, its
    gradients never applied)."""
    dm = ShardDataModule(str(digits_shards), backend="cpu", batch_size=64, num_workers=0)
    dm.trainer = _trainer_at(5, 2, 22)
    with caplog.at_level(logging.INFO):
        state = dm.state_dict()
    assert (state["epoch"], state["batches"], state["consumed"], state["accumulate"]) == (0, 4, 256, 2), state
    assert ("between two optimizer steps: the last 1 micro-batch of accumulation was not applied and is trained"
            " again after a resume") in caplog.text, caplog.text
    dm.trainer = _trainer_at(6, 2, 22)
    assert (dm.state_dict()["batches"], dm.state_dict()["consumed"]) == (6, 384)


def test_a_checkpoint_past_the_epochs_end_says_the_epoch_goes_unvalidated(digits_shards, caplog):
    """Checkpoints from before epochs were whole optimizer batches: 1 x 64 x 3 could stop epoch 0 at 1344
    samples with a partial step to go. Now that epoch holds 1344 samples, so it ends at once and Lightning
    starts epoch 1 without validating epoch 0: the start says so instead of passing in silence."""
    dm = ShardDataModule(str(digits_shards), backend="cpu", batch_size=64, num_workers=0)
    dm.trainer = _trainer_at(0, 3, 21)
    dm.load_state_dict({"classes_sha256": dm.classes_digest(), "splits_sha256": dm.split_digests(),
                        "epoch": 0, "consumed": 1344, "batches": 21,
                        "world_size": 1, "batch_size": 64, "accumulate": 3, "seed": 0, "window_shards": 4})
    with caplog.at_level(logging.WARNING):
        assert dm.resume_batches(0) == 21
    assert ("the checkpoint stopped epoch 0 after 1344 samples, where the epoch ends (1344 samples: whole"
            " global batches of 1 rank x batch 64 x accumulate 3)") in caplog.text, caplog.text
    assert "without validating epoch 0" in caplog.text


def test_train_split_smaller_than_one_global_batch_is_refused(digits_shards):
    """1434 train samples and a batch of 2048: no step could run, so fit would end at once "successfully"."""
    dm = ShardDataModule(str(digits_shards), backend="cpu", batch_size=2048, num_workers=0)
    with pytest.raises(ConfigError, match="1434 samples, fewer than one global batch"):
        dm.train_dataloader()


def test_checkpoint_keeps_the_interrupted_epochs_seed(digits_shards, tmp_path):
    """2 steps with data.seed 0, resumed to 3 with data.seed 1: the checkpoint still names seed 0 for the
    rest of epoch 0, so a second resume in that epoch keeps its order too."""
    run = tmp_path / "run"
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, run, 2, ["--data.seed", "0"]), log)
        run_to_end(fit_command(digits_shards, run, 3, ["--data.seed", "1"]), log)
    pos = _position(run)
    assert (pos["epoch"], pos["consumed"], pos["seed"]) == (0, 3 * 128, 0), pos
    assert "epoch 0 finishes in the order it started with (the same samples, none repeated or skipped; their crops " \
        "and flips follow the new seed already)" in (tmp_path / "runs.log").read_text()


def test_negative_seed_is_a_config_error(digits_shards):
    """numpy refuses negative seeds; without the check the run stopped at its first epoch with numpy's
    "expected non-negative integer"."""
    with pytest.raises(ConfigError, match="data.seed must be >= 0"):
        ShardDataModule(str(digits_shards), backend="cpu", seed=-1)


def test_a_checkpoint_of_the_whole_manifest_digest(digits_shards, tmp_path, caplog):
    """Checkpoints written before the per-split records hold the whole manifest's digest, which a split added
    since changes too: fit is refused and says so, an evaluation goes on with a warning."""
    import hashlib
    import shutil

    from pipeline.errors import ConfigError

    root = tmp_path / "shards"
    shutil.copytree(digits_shards, root)
    old = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    with open(root / "manifest.json", "a") as f:
        f.write("\n")  # another file, as a split added since makes it
    dm = ShardDataModule(str(root), backend="cpu", batch_size=64, num_workers=0)
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn="validate"))
    with caplog.at_level(logging.WARNING):
        dm.load_state_dict({"manifest_sha256": old})
    assert "written before per-split records" in caplog.text
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    with pytest.raises(ConfigError, match="a checkpoint of before per-split records"):
        dm.load_state_dict({"manifest_sha256": old})
    dm.load_state_dict({"manifest_sha256": hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()})


def test_checkpoints_record_the_dataset_read_at_the_start_even_if_its_manifest_goes(digits_shards, tmp_path):
    """data.root removed during a run (the open shards still read): every later checkpoint recorded the digests
    of no manifest, and its own data, put back at the same path, was "another dataset" to every resume."""
    root = tmp_path / "shards"
    shutil.copytree(digits_shards, root)
    dm = ShardDataModule(str(root), backend="cpu", num_workers=0)
    dm.setup("fit")
    manifest = (root / "manifest.json").read_bytes()
    (root / "manifest.json").unlink()
    state = dm.state_dict()
    (root / "manifest.json").write_bytes(manifest)  # put back: the same data
    ShardDataModule(str(root), backend="cpu", num_workers=0)._check_same_dataset(state)  # no "another dataset"
    assert state["classes_sha256"] == ShardDataModule(str(digits_shards)).classes_digest()

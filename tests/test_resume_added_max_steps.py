"""Resuming with ``trainer.max_steps`` added or raised: a checkpoint saved at an epoch's end trains on.

Lightning re-enters the finished epoch of such a checkpoint when the run has ``max_steps`` and counted it
processed a second time, right before comparing the count with ``trainer.max_epochs``: a run of
``max_epochs`` 1 resumed with ``max_epochs`` 2 and ``max_steps`` 40 said "`max_epochs=2` reached" at once,
exit 0, and trained nothing (``pipeline.resume_geometry.LoopPosition.on_train_start``). Epochs of 3 batches
(``trainer.limit_train_batches``) keep the runs short."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.kill_resume import compare, fit_command
from tests.conftest import run_module

SHORT = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]  # epochs of 3 steps


def _fit(shards: Path, run_dir: Path, steps: int, epochs: int, extra: list[str] = ()):
    cmd = fit_command(shards, run_dir, steps, [*SHORT, "--trainer.max_epochs", str(epochs), *extra])
    return run_module(*cmd[2:], env={"WANDB_MODE": "offline"})  # after `python -m`


def _saved(run_dir: Path) -> tuple[int, int, int]:
    """(global step, epoch of the loader's position, samples of it consumed) of the run's last.ckpt."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    pos = ckpt["ShardDataModule"]
    return int(ckpt["global_step"]), int(pos["epoch"]), int(pos["consumed"])


def test_max_steps_added_or_raised_on_an_epoch_end_checkpoint_trains_on(digits_shards, tmp_path):
    run = tmp_path / "run"
    _fit(digits_shards, run, -1, 1)
    assert _saved(run) == (3, 1, 0)  # epoch 0 finished, without max_steps

    # the user's report: max_steps added, max_epochs raised by one
    out = _fit(digits_shards, run, 5, 2)
    said = out.stdout + out.stderr
    assert "`max_epochs=2` reached" not in said, said[-3000:]
    assert "`max_steps=5` reached" in said, said[-3000:]
    assert _saved(run) == (5, 1, 2 * 128)  # two batches of epoch 1

    # max_steps raised on a run that ended at max_steps mid-epoch: to the end of epoch 1 (an epoch-end save)
    _fit(digits_shards, run, 6, 3)
    assert _saved(run) == (6, 2, 0)

    # max_steps raised on a run that ended at max_steps at an epoch's end, max_epochs one more than it ended
    out = _fit(digits_shards, run, 8, 3)
    said = out.stdout + out.stderr
    assert "`max_epochs=3` reached" not in said, said[-3000:]
    assert _saved(run) == (8, 2, 2 * 128)

    # without max_steps, raising max_epochs trains the rest of epoch 2 and epoch 3
    _fit(digits_shards, run, -1, 4)
    assert _saved(run) == (12, 4, 0)

    # a run that is complete is still refused as such, with max_steps given or not
    last = run / "checkpoints" / "last.ckpt"
    out = _fit(digits_shards, run, 12, 5)
    said = out.stdout + out.stderr
    assert f"the run is complete: {last} is at step 12 and trainer.max_steps is 12" in said, said[-3000:]
    out = _fit(digits_shards, run, -1, 4)
    said = out.stdout + out.stderr
    assert f"the run is complete: {last} ends epoch 3 and trainer.max_epochs is 4" in said, said[-3000:]
    assert _saved(run) == (12, 4, 0)

def test_run_with_max_steps_stopped_at_an_epochs_end_resumes_bit_exact(digits_shards, tmp_path):
    """The same settings throughout (``max_steps`` 5, ``max_epochs`` 2), stopped by a preemption signal at
    epoch 0's last batch: the resume trains epoch 1's two steps (it stopped at once, at step 3) and ends
    where the run never stopped did."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _fit(digits_shards, ref, 5, 2)
    _fit(digits_shards, cut, 5, 2, ["--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch",
                                    "--trainer.callbacks.batch_idx=2"])
    assert _saved(cut) == (3, 1, 0)
    _fit(digits_shards, cut, 5, 2)
    assert _saved(cut) == (5, 1, 2 * 128)
    diffs = compare(ref / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])

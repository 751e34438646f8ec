"""A run directory moved (renamed) or deleted while ``fit`` runs: the job stops with one ``error:`` line saying
where it went, writes nothing at the old path again (a save there made a new ``RUN/checkpoints/last.ckpt``
without config or lock, and the CSV logger's next write was a ``FileNotFoundError`` traceback), and a fit
into the moved directory resumes from its last checkpoint. Real processes; the move is made by a callback at a
chosen step, so no timing is guessed."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl

from pipeline.run_layout import LOCK_NAME


class MoveRunDirAt(pl.Callback):
    """When global step ``step`` starts, rename the run directory to ``to`` (as a user's ``mv`` would)."""

    def __init__(self, step: int, to: str) -> None:
        self.step, self.to = step, to

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and not Path(self.to).exists():
            os.rename(trainer.default_root_dir, self.to)


# (the step the move comes before, the run's settings, the step the job stops at, the step last.ckpt holds):
# checkpoints every 3 steps, logs every 5 (a log step is a batch whose step count reaches a multiple of 5)
CASES = {
    # moved at step 4: the step-5 log (whose learning rate was logged at its start) comes before the step-6 save;
    # with W&B, as the user's trial ran
    "before-a-log": (4, ["--tracking.wandb", "true"], 5, 3),
    # moved at step 7: the step-9 save comes before the step-10 log
    "before-a-save": (7, [], 9, 6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_directory_moved_mid_fit_stops_with_one_line_and_resumes_where_it_went(digits_shards, tmp_path, case):
    import torch

    from bench.kill_resume import _env, fit_command
    from tests import preloaded_python
    from tests.conftest import REPO

    move_at, extra, stops_at, saved = CASES[case]
    run, moved = tmp_path / "run", tmp_path / "run-moved"
    proc = preloaded_python.run(fit_command(digits_shards, run, 12, [
        "--checkpoint.every_n_train_steps", "3", "--trainer.log_every_n_steps", "5", *extra,
        "--trainer.callbacks+=tests.test_run_dir_moved.MoveRunDirAt", f"--trainer.callbacks.step={move_at}",
        f"--trainer.callbacks.to={moved}"]), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    last = moved / "checkpoints" / "last.ckpt"
    assert errors == [
        f"error: trainer.default_root_dir: run directory {run} was moved to {moved} while this job ran. This job "
        f"stops without saving at step {stops_at}, and writes nothing at {run} again (a save there would start a new "
        f"directory without the run's config, lock or checkpoints); its last checkpoint is {last} (step {saved}): "
        f"`fit --trainer.default_root_dir {moved}` (the same settings) resumes from it"], proc.stderr[-3000:]
    assert not run.exists(), sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == saved
    assert (moved / LOCK_NAME).is_file() and (moved / "config.yaml").is_file()

    again = preloaded_python.run(fit_command(digits_shards, moved, 12, extra), env=_env(), cwd=REPO,
                                 capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr, again.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 12
    assert not run.exists()


@pytest.fixture
def lock(tmp_path, monkeypatch):
    from pipeline.run_lock import KEY_ENV, RunDirLock

    for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "SLURM_JOB_ID", KEY_ENV):
        monkeypatch.delenv(k, raising=False)
    held = RunDirLock(tmp_path / "run")
    held.acquire()
    yield held
    held.release()


def test_the_lock_says_where_its_run_directory_went(lock, tmp_path):
    assert lock.whereabouts() is None
    os.rename(lock.run_dir, tmp_path / "elsewhere")
    assert tuple(lock.whereabouts()) == ("moved", tmp_path / "elsewhere")
    (tmp_path / "run").mkdir()  # a new directory of the old name is not the run's
    assert tuple(lock.whereabouts()) == ("moved", tmp_path / "elsewhere")
    os.rename(tmp_path / "elsewhere", tmp_path / "run-2")
    (tmp_path / "run").rmdir()
    os.rename(tmp_path / "run-2", tmp_path / "run")  # back where it was: the run's again
    assert lock.whereabouts() is None


def test_a_relative_run_directory_is_not_moved_by_a_chdir(tmp_path, monkeypatch):
    """`--trainer.default_root_dir runs/x` (relative): a chdir of the process afterwards read as a move."""
    from pipeline.run_lock import KEY_ENV, RunDirLock

    for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "SLURM_JOB_ID", KEY_ENV):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    held = RunDirLock(Path("runs") / "x")
    held.acquire()
    try:
        monkeypatch.chdir("/")
        assert held.whereabouts() is None
    finally:
        held.release()


def test_a_deleted_run_directory_and_a_replaced_lock_file(lock):
    import shutil

    lock.path.unlink()
    lock.path.write_text("{}")  # the directory is still the run's: saving into it is right (a warning)
    assert lock.whereabouts().kind == "lock"
    shutil.rmtree(lock.run_dir)
    assert tuple(lock.whereabouts()) == ("deleted", None)


def test_a_checkpoint_save_never_makes_the_run_directory_again(tmp_path):
    """The run's first save makes ``RUN/checkpoints``; ``RUN`` itself, gone, is not made again."""
    from pipeline.checkpoint_io import AtomicCheckpointIO
    from pipeline.errors import CheckpointWriteError

    run = tmp_path / "run"
    run.mkdir()
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, run / "checkpoints" / "last.ckpt")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    gone = tmp_path / "gone"
    with pytest.raises(CheckpointWriteError, match="No such file or directory"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, gone / "checkpoints" / "last.ckpt")
    assert not gone.exists()


def test_a_moved_run_directory_keeps_its_best_k(digits_shards, tmp_path):
    """Lightning restores its best-k bookkeeping only in the folder the checkpoint names: a resume of a moved run
    directory saved its first validation as best whatever the score and never removed the earlier best file
    (save_top_k 1 kept two, one more at every move)."""
    import torch

    from tests.conftest import REPO, SMALL_NET, run_module

    run, moved = tmp_path / "run", tmp_path / "moved"
    args = ("pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), *SMALL_NET, "--data.root",
            str(digits_shards), "--data.batch_size", "128", "--data.num_workers", "0", "--tracking.wandb", "false",
            "--trainer.num_sanity_val_steps", "0", "--checkpoint.save_top_k", "1")
    run_module(*args, "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "2")
    os.rename(run, moved)
    run_module(*args, "--trainer.default_root_dir", str(moved), "--trainer.max_epochs", "4")
    best = sorted(p.name for p in (moved / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1, best
    state = torch.load(moved / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    (tracked,) = [s for k, s in state.items() if k.startswith("ModelCheckpoint")]
    assert tracked["dirpath"] == str(moved / "checkpoints")
    assert [Path(p).name for p in tracked["best_k_models"]] == best, tracked

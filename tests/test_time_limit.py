"""``trainer.max_time`` counts every start of a run (Lightning's Timer state is in each checkpoint): a resume with
the same ``max_time`` as the start that reached it restored everything, logged "Time limit reached", trained
nothing and exited 0 as if it had resumed. Now it says the run is complete and what trains on; a branch from such
a checkpoint into a new run directory is refused (pipeline/time_limit.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch

from pipeline.time_limit import max_time_seconds, time_limit_reached, trained_seconds
from tests.conftest import REPO, SMALL_NET, run_cli_in_process

CONF = str(REPO / "conf" / "demo.yaml")


def _fit(shards: Path, run_dir: Path, *extra: str):
    return run_cli_in_process("fit", "--config", CONF, *SMALL_NET, "--data.root", str(shards),
                              "--trainer.default_root_dir", str(run_dir), "--data.num_workers", "1",
                              "--data.batch_size", "64", "--trainer.limit_val_batches", "1",
                              "--tracking.wandb", "false", *extra)


def _step(run_dir: Path) -> int:
    return int(torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"])


def test_lightnings_duration_forms_and_the_checkpoints_timer():
    assert max_time_seconds("00:01:02:03") == 3723
    assert max_time_seconds({"minutes": 2}) == 120
    assert max_time_seconds(timedelta(hours=1)) == 3600
    assert max_time_seconds(None) is None and max_time_seconds("5min") is None and max_time_seconds({"x": 1}) is None
    ckpt = {"callbacks": {"ModelCheckpoint{}": {}, "Timer": {"time_elapsed": {"train": 61.5, "validate": 3.0}}}}
    assert trained_seconds(ckpt) == 61.5 and trained_seconds({"callbacks": {}}) is None
    assert time_limit_reached("00:00:01:00", ckpt) == (timedelta(seconds=62), "00:00:01:00")
    assert time_limit_reached({"minutes": 1, "seconds": 2}, ckpt) is None
    assert time_limit_reached("00:00:01:00", {"callbacks": {}}) is None  # no Timer: a run without max_time


def test_a_run_stopped_by_max_time_is_complete_under_it_and_trains_on_under_a_larger_one(digits_shards, tmp_path):
    run = tmp_path / "run"
    first = _fit(digits_shards, run, "--trainer.max_steps", "-1", "--trainer.max_epochs", "50",
                 "--trainer.max_time", "00:00:00:01")
    assert first.returncode == 0, first.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    stopped, stamp = _step(run), last.stat().st_mtime_ns
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert trained_seconds(ckpt) >= 1 and 0 < stopped < 50 * 12  # stopped by the time limit

    again = _fit(digits_shards, run, "--trainer.max_steps", "-1", "--trainer.max_epochs", "50",
                 "--trainer.max_time", "00:00:00:01")
    assert again.returncode == 0, again.stderr[-3000:]
    said = [line for line in again.stderr.splitlines() if line.startswith("fit: ")]
    assert said and said[-1].startswith(f"fit: the run is complete: {last} has trained for 0:00:"), \
        again.stderr[-3000:]
    assert said[-1].endswith("and trainer.max_time is 00:00:00:01; nothing to train (a larger trainer.max_time "
                             "trains on)"), said[-1]
    assert "resuming" not in again.stderr, again.stderr[-3000:]
    assert last.stat().st_mtime_ns == stamp

    branch = tmp_path / "branch"
    refused = _fit(digits_shards, branch, "--trainer.max_steps", "-1", "--trainer.max_epochs", "50",
                   "--trainer.max_time", "00:00:00:01", "--ckpt_path", str(last))
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: trainer.max_time 00:00:00:01: {last} has trained for ") and line.endswith(
        f"already, so a branch from it into {branch} would train nothing; give a larger trainer.max_time"), line
    assert not branch.exists()

    on = _fit(digits_shards, run, "--trainer.max_steps", str(stopped + 2), "--trainer.max_epochs", "50",
              "--trainer.max_time", "00:01:00:00")
    assert on.returncode == 0, on.stderr[-3000:]
    assert _step(run) == stopped + 2

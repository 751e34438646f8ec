"""The console's plain lines come where the loggers write a row: every ``trainer.log_every_n_steps`` steps, at an
epoch's last batch, and at the step a preempted run stops at (the CSV had that row; the log of the job ended a
few steps earlier, at the last step of the grid, so the job's log did not show where the run stopped)."""

from __future__ import annotations

import csv
import re

from tests.conftest import REPO, SMALL_NET, run_module

CONF = str(REPO / "conf" / "demo.yaml")


def test_a_preempted_run_prints_a_line_for_the_step_it_stops_at(digits_shards, tmp_path):
    run = tmp_path / "run"
    out = run_module("pipeline", "fit", "--config", CONF, *SMALL_NET, "--data.root", str(digits_shards),
                     "--trainer.default_root_dir", str(run), "--data.num_workers", "1", "--tracking.wandb", "false",
                     "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "4",
                     "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch", "--trainer.callbacks.batch_idx", "5")
    assert "preemption (SIGUSR1): saving" in out.stderr and "at step 6, then stopping" in out.stderr, out.stderr[-3000:]
    lines = re.findall(r"^epoch 0 batch (\d+)/22 \| train/loss", out.stdout, re.M)
    assert lines == ["4", "6"], out.stdout  # the grid's step 4, and step 6 where it stopped (off the grid)
    with open(run / "csv" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == [3, 5], steps  # the loggers' rows of the same two steps (Lightning's 0-based step axis)

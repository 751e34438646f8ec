"""End-to-end training through the CLI on real shards (digits): fit, validate, resume, clear errors."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_module

CONF = str(REPO / "conf" / "demo.yaml")


def _fit(shards: Path, run_dir: Path, *extra: str, check: bool = True):
    return run_module(
        "pipeline", "fit", "--config", CONF, "--data.root", str(shards),
        "--trainer.default_root_dir", str(run_dir), "--data.num_workers", "1", *extra, check=check,
    )


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_fit_lowers_loss_then_validate_then_resume(digits_shards, tmp_path):
    run = tmp_path / "run"
    first = _fit(digits_shards, run, "--trainer.max_steps", "30", "--trainer.log_every_n_steps", "1",
                 "--checkpoint.every_n_train_steps", "10")
    # stdout is a pipe here, as under Slurm: plain progress lines, no carriage returns or cursor codes
    assert "\r" not in first.stdout and "\x1b[" not in first.stdout
    assert re.search(r"^epoch 0 step 1/22 \| train/loss \d[\d.]* \| [\d.]+ it/s$", first.stdout, re.M), first.stdout
    assert re.search(r"^epoch 0 validation \| val/top1 0\.\d+ \| val/top5 0\.\d+ \| val/loss", first.stdout, re.M)
    losses = [float(r["train/loss"]) for r in _metrics(run) if r.get("train/loss")]
    assert len(losses) >= 25
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, f"loss did not go down: {losses}"

    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 30
    assert ckpt["ShardDataModule"]["consumed"] == (30 - 22) * 64, "loader position: 8 steps into epoch 1"

    out = run_module("pipeline", "validate", "--config", CONF, "--data.root", str(digits_shards),
                     "--trainer.default_root_dir", str(tmp_path / "val"), "--ckpt_path", str(last))
    assert "val/top1" in out.stdout + out.stderr

    resumed = _fit(digits_shards, run, "--trainer.max_steps", "40", "--trainer.log_every_n_steps", "1",
                   "--checkpoint.every_n_train_steps", "10")
    assert "resuming from" in resumed.stderr
    assert "💡 Tip" not in resumed.stdout + resumed.stderr, "Lightning's product adverts in the run's log"
    assert "LeafSpec" not in resumed.stderr
    assert re.search(r"^epoch 1 step 9/22 \| train/loss", resumed.stdout, re.M), "lines go on mid-epoch"
    if shutil.which("srun") and "SLURM_JOB_ID" not in os.environ:  # Slurm's tools here, but not in a job
        assert "`srun` command is available" not in resumed.stderr, "Lightning's srun hint outside a job"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 40, "continued from step 30, not from 0"
    assert ckpt["ShardDataModule"]["consumed"] == (40 - 22) * 64
    steps = [int(r["step"]) for r in _metrics(run) if r.get("train/loss")]
    assert max(steps) == 39 and steps.count(30) == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model.arch", "resnet9000"], "resnet9000"),
        (["--data.root", "/nonexistent/shards"], "/nonexistent/shards"),
        (["--model.no_such_key", "1"], "no_such_key"),
        (["--data.backend", "tpu"], "tpu"),
    ],
)
def test_bad_input_gives_a_clear_error(digits_shards, tmp_path, args, needle):
    proc = _fit(digits_shards, tmp_path / "run", *args, "--trainer.max_steps", "1", check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]

"""A diverged run stops with one clear line before it saves non-finite weights over the last good
checkpoint: a real divergence (an lr far too high), in one process and in two DDP ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, free_port, run_module

DIVERGE = ("--model.lr", "300", "--model.warmup_epochs", "0", "--checkpoint.every_n_train_steps", "2",
           "--trainer.max_steps", "30", "--data.num_workers", "0", "--tracking.wandb", "false")


def _fit_args(shards: Path, run_dir: Path) -> list[str]:
    return ["--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(shards),
            "--trainer.default_root_dir", str(run_dir), *DIVERGE]


def _last_is_finite_and_early(run_dir: Path) -> int:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"last.ckpt holds non-finite weights: {bad[:5]}"
    assert ckpt["global_step"] < 30
    return ckpt["global_step"]


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(digits_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_module("pipeline", "fit", *_fit_args(digits_shards, run_dir), check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("error: training diverged"))
    assert "running_var" in line and "Lower model.lr" in line
    assert "Traceback" not in proc.stderr
    step = _last_is_finite_and_early(run_dir)
    assert step >= 2  # it saved while the weights were finite, then stopped


@pytest.mark.slow
def test_two_ranks_stop_together(digits_shards: Path, tmp_path: Path) -> None:
    port = free_port()
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nnodes=1", "--nproc-per-node=2",
                           f"--master-port={port}", "-m", "pipeline", "fit", *_fit_args(digits_shards, run_dir),
                           "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode != 0
    # each rank diverges at the same step; the first to say so stops torchrun's agent (pipeline/torchrun_stop.py),
    # whose SIGTERM may end the other before its own line
    assert 1 <= proc.stderr.count("error: training diverged") <= 2, proc.stderr[-3000:]
    when = {ln.split(": weights")[0] for ln in proc.stderr.splitlines() if ln.startswith("error: training diverged")}
    assert len(when) == 1, when
    _last_is_finite_and_early(run_dir)

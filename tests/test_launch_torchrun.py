"""`launch torchrun --run` really trains: one node, two gloo processes, the demo config."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_run_trains_two_processes(digits_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_API_KEY"))}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "launch", "torchrun", "--config", str(REPO / "conf" / "demo.yaml"),
                        "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
                        "--run-dir", str(run_dir), "--cpu", "--run", "--",
                        "--data.root", str(digits_shards), "--trainer.max_steps", "6", "--data.num_workers", "0"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Starting with 2 processes" in r.stdout + r.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs and all(p.name.endswith(run_id) for p in runs)

"""Two ranks as two one-rank "nodes" on this machine (gloo), each with its own command line and environment,
as srun or two torchrun agents start them: what a test needs to make one rank differ from the other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SMALL_NET, free_port


def fit_as_two_nodes(args: tuple[list[str], list[str]], env: tuple[dict, dict] = ({}, {}),
                     timeout_s: float = 240) -> list[subprocess.CompletedProcess]:
    """``python -m pipeline fit`` as ranks 0 and 1 (``--trainer.num_nodes 2 --trainer.devices 1``, ddp), rank i
    with ``args[i]`` on its command line and ``env[i]`` in its environment (a ``PYTHONPATH`` there goes before
    the repository's). Both end within ``timeout_s`` or the test fails (a hang); none is left running."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    procs = []
    try:
        for rank in (0, 1):
            cmd = [sys.executable, "-m", "pipeline", "fit", *args[rank], "--trainer.num_nodes", "2",
                   "--trainer.devices", "1", "--trainer.strategy", "ddp"]
            rank_env = {**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "NODE_RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
            for key, value in env[rank].items():
                rank_env[key] = f"{value}{os.pathsep}{rank_env[key]}" if key == "PYTHONPATH" else value
            procs.append(subprocess.Popen(cmd, env=rank_env, cwd=REPO, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        done = []
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return done
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks did not end within {timeout_s} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def demo_args(root: Path, run_dir: Path, *more: str) -> list[str]:
    """The demo config on ``root``'s shards into ``run_dir``: no loader workers, no sanity check, no W&B."""
    return ["--config", str(REPO / "conf" / "demo.yaml"), *SMALL_NET, "--data.root", str(root),
            "--trainer.default_root_dir", str(run_dir), "--data.num_workers", "0", "--trainer.num_sanity_val_steps",
            "0", "--tracking.wandb", "false", *more]

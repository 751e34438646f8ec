"""The torchrun command for clusters without Slurm: one agent per node, c10d rendezvous, and restarts
that resume from ``last.ckpt``."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from launch.errors import LaunchError
from launch.validate import launcher_fit_args, no_launcher_args, positive_int, yaml_config
from pipeline.torchelastic import FRESH_STORE_ENV

_ENDPOINT = re.compile(r"^[A-Za-z0-9_.:\[\]-]+:(\d{1,5})$")


def command(config: Path, nnodes: int, nproc_per_node: int, rdzv_endpoint: str, run_dir: Path,
            rdzv_id: str = "resnet", cpu: bool = False, extra_args: list[str] | None = None,
            max_restarts: int = 3) -> list[str]:
    """argv for `torchrun ... -m pipeline fit ...`; the same on every node. After a failed rank the
    agents restart all ranks (up to ``max_restarts`` times), which resume from ``last.ckpt``."""
    config = yaml_config(config, "--config")
    positive_int(nnodes, "--nnodes")
    positive_int(nproc_per_node, "--nproc-per-node")
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts: {max_restarts} is negative")
    no_launcher_args(extra_args or [], launcher_fit_args("--nnodes", "--nproc-per-node"))
    if not rdzv_id.strip():  # torchrun would take it; the launcher used a fixed "pending" for every run
        raise LaunchError("--rdzv-id: empty; leave it out to use the run's W&B id")
    m = _ENDPOINT.match(rdzv_endpoint)
    if not m or not 0 < int(m.group(1)) < 65536:
        raise LaunchError(f"--rdzv-endpoint: {rdzv_endpoint!r} is not HOST:PORT")
    local = Path(sys.executable).parent / "torchrun"  # this environment's, like `submit`'s default --python
    head = [str(local) if local.is_file() else "torchrun"]
    argv = [*head, f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
            f"--max-restarts={max_restarts}", "-m", "pipeline", "fit", "--config", str(config.resolve()),
            *(extra_args or []),  # before the launcher's own, which win over any --config they add
            "--trainer.default_root_dir", str(run_dir.resolve()),
            "--trainer.num_nodes", str(nnodes), "--trainer.devices", str(nproc_per_node)]
    if cpu:
        argv += ["--trainer.accelerator", "cpu"]
    argv += ["--ckpt_path", "last"]
    return argv


def env(run_dir: Path, run_id: str) -> dict[str, str]:
    """The same W&B resume settings the sbatch script exports, and a fresh rendezvous store per restart
    round (see ``pipeline.torchelastic.restart_warning``)."""
    return {"WANDB_RUN_ID": run_id, "WANDB_RESUME": "allow", "WANDB_DIR": str(run_dir.resolve()),
            FRESH_STORE_ENV: "1"}


def shell_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(prefix + [shlex.quote(a) for a in argv])

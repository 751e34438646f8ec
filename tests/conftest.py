"""Shared fixtures: real-image shard sets built once per session with the project's own data_prep."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_TEST_TAR = SHARED / "data" / "cifar10" / "cifar10-test.tar"


def unavailable_here(reason: str) -> None:
    """Skip on a developer machine that cannot run a test's real service (Slurm, namespaces); fail in CI,
    which must run them (.ci/run installs what they need), so a broken setup never passes as a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick): rendezvous ports of tests that may run at the
    same time as others (``make test`` runs two test files at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` of this repo in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """scikit-learn's digits as 32x32 JPEGs, sharded into train (3 shards) and val (1 shard)."""
    from pipeline.demo_data import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "images")
    out = root / "shards"
    for split in ("train", "val"):
        run_module("data_prep", "imagefolder", str(root / "images" / split), str(out), "--split", split,
                   "--samples-per-shard", "500", "--workers", "1")
    return out

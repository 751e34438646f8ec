"""Real resource exhaustion: a small /dev/shm (a private mount namespace), few file descriptors, a full disk
(a small tmpfs). What a user sees must be one line naming the setting or the path, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, unavailable_here


def _small_shm(size: str) -> list[str]:
    """A command prefix that runs the rest with a ``size`` tmpfs as /dev/shm (Docker's is 64 MB), in a private
    mount namespace (the machine's /dev/shm is untouched)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs /dev/shm"],
                           capture_output=True)
    if probe.returncode != 0:
        unavailable_here("unshare -m and mount are not permitted here (need root)")
    return ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"', "sh"]


def test_a_small_dev_shm_stops_the_cpu_loader_with_one_line_not_a_hang(digits_shards, tmp_path):
    """1 MiB of /dev/shm for 2 workers x 2 prefetched batches of 128 32x32 images (1.5 MiB). Torch copied
    each batch into shared memory in the worker's queue feeder thread, which printed a traceback, dropped
    the batch and left the trainer waiting for it forever."""
    from pipeline.models import build

    weights = tmp_path / "w.pt"
    torch.save(build("cifar_resnet20", num_classes=10).state_dict(), weights)
    proc = subprocess.run(
        [*_small_shm("1M"), sys.executable, "-m", "pipeline", "validate", "--config", "conf/demo.yaml",
         "--data.root", str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "run"),
         "--model.init_weights", str(weights), "--data.num_workers", "2", "--data.val_batch_size", "128",
         "--tracking.wandb", "false"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "out of shared memory" in errors[0] and "/dev/shm: 1.0 MiB" in errors[0]
    assert "--shm-size" in errors[0] and "data.num_workers" in errors[0]
    assert "Traceback" not in proc.stderr

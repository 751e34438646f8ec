"""Distributed validation equals single-process validation exactly (padding masked, counts summed)."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.conftest import REPO, run_module


def _validate(shards: Path, run_dir: Path, devices: int) -> dict[str, float]:
    args = ["pipeline", "validate", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(shards),
            "--trainer.default_root_dir", str(run_dir), "--data.num_workers", "0",
            "--data.val_batch_size", "50", "--tracking.wandb", "false", "--trainer.devices", str(devices)]
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    run_module(*args)
    with open(run_dir / "validate" / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/top1")]
    assert len(rows) == 1
    return {k: float(v) for k, v in rows[0].items() if k.startswith("val/")}


def test_two_process_validation_equals_one_process(digits_shards, tmp_path):
    """363 val samples on 2 ranks x batch 50: rank 1 gets 18 padding entries that must not count."""
    one = _validate(digits_shards, tmp_path / "one", 1)
    two = _validate(digits_shards, tmp_path / "two", 2)
    assert one["val/top1"] == two["val/top1"] and one["val/top5"] == two["val/top5"]
    assert abs(one["val/loss"] - two["val/loss"]) < 1e-6
    correct = one["val/top1"] * 363
    assert abs(correct - round(correct)) < 1e-3, "top-1 is a count over exactly 363 samples"

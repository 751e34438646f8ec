"""tools/cifar10_table.py on real run directories: two seeds of a CIFAR network trained here (the demo's
cifar_resnet20 on scikit-learn's digits), the final test error equal to a separate evaluation of the
final checkpoint, an unfinished run shown with its step and left out of the mean."""

from __future__ import annotations

import csv
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_module

CONF = str(REPO / "conf" / "demo.yaml")
sys.path.insert(0, str(REPO / "tools"))
import cifar10_table  # noqa: E402


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):  # one epoch each (11 steps of 128): the run ends at the epoch's validation
        run_module("pipeline", "fit", "--config", CONF, "--data.root", str(digits_shards), "--seed_everything",
                   str(seed), "--trainer.default_root_dir", str(root / f"cifar_resnet20-seed{seed}"),
                   "--data.batch_size", "128", "--data.num_workers", "0", "--trainer.max_steps", "11",
                   "--trainer.num_sanity_val_steps", "0", "--tracking.wandb", "false")
    return root


def _validate_top1(run: Path) -> float:
    run_module("pipeline", "validate", "--config", str(run / "config.yaml"), "--ckpt_path",
               str(run / "checkpoints" / "last.ckpt"), "--tracking.wandb", "false", "--data.num_workers", "0")
    (metrics,) = (run / "validate" / "csv").glob("version_*/metrics.csv")
    with open(metrics, newline="") as f:
        return float(next(r for r in csv.DictReader(f) if r.get("val/top1"))["val/top1"])


def test_the_table_reports_each_networks_final_errors(runs: Path, tmp_path: Path, capsys) -> None:
    read = [cifar10_table.read_run(runs / f"cifar_resnet20-seed{s}") for s in (0, 1)]
    assert [(r.arch, r.seed, r.step, r.max_steps, r.done) for r in read] == \
        [("cifar_resnet20", 0, 11, 11, True), ("cifar_resnet20", 1, 11, 11, True)]
    # the table's test error is the final model's: an evaluation of last.ckpt scores the same
    assert read[0].test_error == pytest.approx(100 * (1 - _validate_top1(runs / "cifar_resnet20-seed0")), abs=1e-4)
    assert read[0].test_error != read[1].test_error and 0 <= read[1].train_error <= 100

    # a third seed, unfinished: its config asks for more steps than its checkpoint has
    shutil.copytree(runs / "cifar_resnet20-seed1", runs / "cifar_resnet20-seed2")
    cfg_file = runs / "cifar_resnet20-seed2" / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["seed_everything"], cfg["trainer"]["max_steps"] = 2, 30
    cfg_file.write_text(yaml.safe_dump(cfg))
    (runs / "no-logs-yet").mkdir()
    (runs / "no-logs-yet" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert cifar10_table.main([str(runs)]) == 0
    out, err = capsys.readouterr()
    errors = [r.test_error for r in read]
    best, mean, std = min(errors), statistics.fmean(errors), statistics.stdev(errors)
    row = next(line for line in out.splitlines() if line.startswith("| `cifar_resnet20`"))
    assert row.startswith(f"| `cifar_resnet20` | 2 of 3 (seed 2: checkpoint at step 11 of 30) | "
                          f"{best:.2f} ({mean:.2f} ± {std:.2f}) |"), out
    assert row.endswith("| 8.75 |"), row
    assert f"{runs / 'no-logs-yet'}: nothing logged yet; left out" in err

    assert cifar10_table.main([str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err

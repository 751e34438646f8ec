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
import torch
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
    assert [(r.arch, r.seed, r.step, r.planned, r.done) for r in read] == \
        [("cifar_resnet20", 0, 11, 11, True), ("cifar_resnet20", 1, 11, 11, True)]
    # the table's test error is the final model's: an evaluation of last.ckpt scores the same
    assert read[0].test_error == pytest.approx(100 * (1 - _validate_top1(runs / "cifar_resnet20-seed0")), abs=1e-4)
    assert read[0].test_error != read[1].test_error and 0 <= read[1].train_error <= 100

    # a third seed, unfinished: its last.ckpt is of step 6 of the 11 its config asks for
    shutil.copytree(runs / "cifar_resnet20-seed1", runs / "cifar_resnet20-seed2")
    cfg_file = runs / "cifar_resnet20-seed2" / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["seed_everything"] = 2
    cfg_file.write_text(yaml.safe_dump(cfg))
    last = runs / "cifar_resnet20-seed2" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ckpt["global_step"] = 6
    torch.save(ckpt, last)
    (runs / "no-logs-yet").mkdir()
    (runs / "no-logs-yet" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert cifar10_table.main([str(runs)]) == 0
    out, err = capsys.readouterr()
    errors = [r.test_error for r in read]
    best, mean, std = min(errors), statistics.fmean(errors), statistics.stdev(errors)
    row = next(line for line in out.splitlines() if line.startswith("| `cifar_resnet20`"))
    assert row.startswith(f"| `cifar_resnet20` (data.val_split: val) | 2 of 3 (seed 2: checkpoint at step 6 of 11) | "
                          f"{best:.2f} ({mean:.2f} ± {std:.2f}) |"), out
    # the train error beside it is the best run's own (it was the smallest of any run: two runs' numbers paired)
    trains = [r.train_error for r in read]
    assert row.split(" | ")[3] == f"{trains[errors.index(best)]:.2f} ({statistics.fmean(trains):.2f} ± " \
                                  f"{statistics.stdev(trains):.2f})", row
    assert row.endswith("| - (scored on split val, not test) |"), row  # the demo's digits validate on val
    assert f"{runs / 'no-logs-yet'}: nothing logged yet; left out" in err

    assert cifar10_table.main([str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err



def _copy_run(src: Path, dst: Path, **settings: object) -> Path:
    """A copy of a run directory whose config.yaml has ``settings`` (dotted keys) changed."""
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    for dotted, value in settings.items():
        *parents, last = dotted.split(".")
        node = cfg
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def test_rows_are_one_recipe_each_and_the_train_error_is_of_the_validated_epoch(runs: Path, tmp_path: Path,
                                                                                 capsys) -> None:
    """The paper's 64k steps end 40 steps into an epoch that is never validated: the training error beside
    the final error is the validated epoch's, not that stub's. Runs that differ in more than the seed
    (option B, the split scored) get rows of their own, named by what differs; only a row scored on the
    test split has the paper's number beside it; a run ended by max_epochs counts as done."""
    seed0 = _copy_run(runs / "cifar_resnet20-seed0", tmp_path / "cifar_resnet20-seed0")
    epoch0 = cifar10_table.read_run(seed0)
    metrics = seed0 / "csv" / "metrics.csv"
    with open(metrics, newline="") as f:
        logged = list(csv.DictReader(f))
    last_step = max(int(r["step"]) for r in logged if r.get("step"))
    with open(metrics, "a", newline="") as f:  # two logged steps of an unvalidated next epoch, as at 64k steps
        w = csv.DictWriter(f, fieldnames=list(logged[0]))
        for step in (last_step + 1, last_step + 2):
            w.writerow({**{k: "" for k in logged[0]}, "epoch": "1", "step": str(step), "train/top1": "1.0"})
    stub = cifar10_table.read_run(seed0)
    assert stub.train_error == pytest.approx(epoch0.train_error) and stub.train_error > 0, \
        (stub.train_error, epoch0.train_error)
    assert stub.test_error == epoch0.test_error

    seed1 = runs / "cifar_resnet20-seed1"
    _copy_run(seed1, tmp_path / "cifar_resnet20-seed1")
    _copy_run(seed1, tmp_path / "again-seed1")  # seed 1 twice
    _copy_run(seed1, tmp_path / "b-seed1", **{"model.arch_kwargs.shortcut": "B"})
    _copy_run(seed1, tmp_path / "on-test-seed1", **{"data.val_split": "test"})  # the label only: what it says
    by_epochs = _copy_run(seed1, tmp_path / "epochs-seed1", **{"trainer.max_steps": -1, "trainer.max_epochs": 1})
    assert (cifar10_table.read_run(by_epochs).planned, cifar10_table.read_run(by_epochs).done) == (11, True)

    assert cifar10_table.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    rows = {line.split(" | ")[0]: line for line in out.splitlines() if line.startswith("| `cifar_resnet20`")}
    assert len(rows) == 4, out

    def row(*says: str) -> str:
        (found,) = [line for label, line in rows.items() if all(s in label for s in says)]
        return found

    base = row("shortcut: A", "data.val_split: val", "trainer.max_steps: 11")
    assert base.split(" | ")[1] == "3 of 3", base
    assert row("shortcut: B").split(" | ")[1] == "1 of 1"
    assert row("trainer.max_steps: -1", "trainer.max_epochs: 1").split(" | ")[1] == "1 of 1"
    for line in rows.values():
        on_test = "data.val_split: test" in line
        assert line.endswith("| 8.75 |" if on_test else "| - (scored on split val, not test) |"), line
    # a row of option B on the test split: the paper's numbers are option A's
    _copy_run(seed1, tmp_path / "b-on-test-seed1", **{"model.arch_kwargs.shortcut": "B", "data.val_split": "test"})
    assert cifar10_table.main([str(tmp_path)]) == 0
    out, _ = capsys.readouterr()
    (b_row,) = [line for line in out.splitlines() if "shortcut: B" in line and "data.val_split: test" in line]
    assert b_row.endswith("| - (the paper's are option A) |"), b_row
    assert f"{tmp_path / 'cifar_resnet20-seed1'} and {tmp_path / 'again-seed1'}: the same network, recipe and " \
           f"seed 1" in err, err


def test_rows_a_killed_start_logged_again_count_once(runs: Path, tmp_path: Path) -> None:
    """After a kill -9 the steps between the last save and the kill are in metrics.csv twice: the killed
    start's rows, then the resumed run's for the same steps. The train error is of the run's own (the later)
    rows, not the mean over both."""
    import csv

    run = _copy_run(runs / "cifar_resnet20-seed0", tmp_path / "killed-seed0")
    metrics = run / "csv" / "metrics.csv"
    with open(metrics, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    killed = [{**r, "train/top1": "0.0"} for r in rows if r.get("train/top1")][-4:]  # a killed start's last rows
    cut = next(i for i, r in enumerate(rows) if r.get("step") == killed[0]["step"])
    with open(metrics, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows[:cut] + killed + rows[cut:])
    assert cifar10_table.read_run(run).train_error == cifar10_table.read_run(runs / "cifar_resnet20-seed0").train_error


def test_a_run_directory_not_started_yet_is_named(runs: Path, tmp_path: Path, capsys) -> None:
    """A sweep's job that is still pending, or stopped before training (a bad setting, a missing data root),
    has a run directory without config.yaml: named on stderr, not silently dropped (its network's row would
    say "1 of 1" where the sweep submitted two seeds)."""
    _copy_run(runs / "cifar_resnet20-seed0", tmp_path / "cifar_resnet20-seed0")
    pending = tmp_path / "cifar_resnet20-seed1"
    pending.mkdir()
    (pending / "train.sbatch").write_text("#!/bin/bash\n")  # what `launch submit train` leaves before the job starts
    (pending / "jobs.jsonl").write_text('{"job_id": "7", "kind": "train", "script": "train.sbatch"}\n')
    assert cifar10_table.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "| `cifar_resnet20` (data.val_split: val) | 1 of 1 |" in out, out
    assert f"{pending}: no config.yaml, its training has not started" in err, err
    assert f"python -m launch status {pending}" in err, err

    (tmp_path / "cifar_resnet20-seed0" / "config.yaml").unlink()  # every job pending: no table, each named
    assert cifar10_table.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{pending}: no config.yaml" in err and f"{tmp_path / 'cifar_resnet20-seed0'}: no config.yaml" in err, err
    assert "no run directories" in err, err


def test_one_network_written_two_ways_is_one_row_and_a_limited_validation_is_not_the_papers(runs: Path,
                                                                                          tmp_path: Path,
                                                                                          capsys) -> None:
    """``arch_kwargs: {}`` and ``{shortcut: A}`` build the same CIFAR net: they were two rows (shortcut: A, and
    shortcut: unset). A run validated on part of the test set (``trainer.limit_val_batches 2``) was averaged
    with whole ones and set beside the paper's error; it is a row of its own now, without the paper's number."""
    _copy_run(runs / "cifar_resnet20-seed0", tmp_path / "a-seed0", **{"model.arch_kwargs": {"shortcut": "A"},
                                                                        "data.val_split": "test"})
    _copy_run(runs / "cifar_resnet20-seed1", tmp_path / "a-seed1", **{"model.arch_kwargs": {},
                                                                        "data.val_split": "test"})
    _copy_run(runs / "cifar_resnet20-seed1", tmp_path / "a-seed2", **{"model.arch_kwargs": None, "seed_everything": 2,
                                                                        "data.val_split": "test",
                                                                        "trainer.limit_val_batches": 1.0})
    assert cifar10_table.main([str(tmp_path)]) == 0
    out, _ = capsys.readouterr()
    (row,) = [line for line in out.splitlines() if line.startswith("| `cifar_resnet20`")]
    assert row.startswith("| `cifar_resnet20` | 3 of 3 |") and row.endswith("| 8.75 |"), out

    _copy_run(runs / "cifar_resnet20-seed0", tmp_path / "part-seed3", **{"seed_everything": 3, "data.val_split": "test",
                                                                           "trainer.limit_val_batches": 2})
    assert cifar10_table.main([str(tmp_path)]) == 0
    out, _ = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith("| `cifar_resnet20`")]
    assert len(rows) == 2, out
    (part,) = [line for line in rows if "trainer.limit_val_batches: 2" in line]
    assert " | 1 of 1 | " in part and part.endswith(
        "| - (scored on part of the test set: trainer.limit_val_batches 2) |"), part
    (whole,) = [line for line in rows if line is not part]
    assert " | 3 of 3 | " in whole and whole.endswith("| 8.75 |"), whole


def test_one_run_directory_is_a_table_of_that_run(runs: Path, tmp_path: Path, capsys) -> None:
    """A run directory given in place of its parent: its checkpoints/, csv/ were each named as a run "not
    started yet", then "no run directories"; a path that does not exist said only the latter."""
    run = runs / "cifar_resnet20-seed0"
    assert cifar10_table.main([str(run)]) == 0
    out, err = capsys.readouterr()
    assert "| `cifar_resnet20` (data.val_split: val) | 1 of 1 |" in out and err == "", (out, err)
    assert cifar10_table.main([str(tmp_path / "nowhere")]) == 2
    assert f"cifar10_table: {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err

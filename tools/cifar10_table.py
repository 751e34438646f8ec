"""The CIFAR-10 runs' final errors as a table, beside the paper's Table 6 (He et al. 2016).

    python tools/cifar10_table.py [RUNS]          # default runs/cifar10: every RUNS/*/config.yaml

Each run directory is read as training left it: the network and seed from its ``config.yaml``, the test
error from the last ``val/top1`` row of ``csv/metrics.csv`` (the CIFAR config validates on the test set
at each epoch's end; the paper's 64k steps end 40 steps after the last one, at lr 0.001), the training
error from the ``train/top1`` rows of that last epoch (augmented batches, as the paper's curves). A run
that has not reached its ``trainer.max_steps`` is shown with the step it is at and left out of the
network's mean. Runs of one network (any seeds) make one row: best and mean +- std of the final test
error, as the paper reports ResNet-110.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from launch.checkpoints import read_checkpoint
from launch.errors import LaunchError

# Table 6 of the paper: CIFAR-10 test error (%); ResNet-110 is "best (mean +- std)" over 5 runs
PAPER = {"cifar_resnet20": "8.75", "cifar_resnet32": "7.51", "cifar_resnet44": "7.17", "cifar_resnet56": "6.97",
         "cifar_resnet110": "6.43 (6.61 ± 0.16)", "cifar_resnet1202": "7.93"}


@dataclass
class Run:
    path: Path
    arch: str
    seed: object
    step: int  # optimizer steps done: last.ckpt's, else the last logged step's
    max_steps: int
    test_error: float | None  # %, at the last validation
    train_error: float | None  # %, mean over the last epoch's logged training batches

    @property
    def done(self) -> bool:
        return self.max_steps > 0 and self.step >= self.max_steps


def _float(row: dict, key: str) -> float | None:
    v = row.get(key)
    return float(v) if v not in (None, "") else None


def _steps_done(run_dir: Path, rows: list[dict]) -> int:
    last = run_dir / "checkpoints" / "last.ckpt"  # a file, or a DeepSpeed checkpoint directory
    if last.exists() and (step := read_checkpoint(last).global_step) is not None:
        return step
    return 1 + max(int(r["step"]) for r in rows if r.get("step"))


def read_run(run_dir: Path) -> Run | None:
    """The run in ``run_dir``, or None before its first logged row."""
    with open(run_dir / "config.yaml") as f:
        cfg = yaml.safe_load(f)
    metrics = run_dir / "csv" / "metrics.csv"
    if not metrics.is_file():
        return None
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    val = [r for r in rows if _float(r, "val/top1") is not None]
    last_epoch = max(int(r["epoch"]) for r in rows if r.get("epoch"))
    train = [t for r in rows if r.get("epoch") and int(r["epoch"]) == last_epoch
             and (t := _float(r, "train/top1")) is not None]
    return Run(
        path=run_dir, arch=cfg["model"]["arch"], seed=cfg.get("seed_everything"),
        step=_steps_done(run_dir, rows),
        max_steps=int(cfg["trainer"].get("max_steps") or -1),
        test_error=100 * (1 - _float(val[-1], "val/top1")) if val else None,
        train_error=100 * (1 - statistics.fmean(train)) if train else None,
    )


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{min(values):.2f} ({statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f})"


def table(runs: list[Run]) -> str:
    """One markdown row per network, in the paper's order (plain nets after the residual ones)."""
    def order(arch: str) -> tuple:
        depth = "".join(c for c in arch.rsplit("resnet", 1)[-1] if c.isdigit())
        return (arch.startswith("plain_"), int(depth) if depth else 0, arch)

    lines = ["| network | runs done | test error % | train error % (last epoch) | paper's test error % |",
             "| --- | --- | --- | --- | --- |"]
    for arch in sorted({r.arch for r in runs}, key=order):
        mine = [r for r in runs if r.arch == arch]
        done = [r for r in mine if r.done]
        going = ", ".join(f"seed {r.seed}: checkpoint at step {r.step} of {r.max_steps}" for r in mine if not r.done)
        lines.append(f"| `{arch}` | {len(done)} of {len(mine)}" + (f" ({going})" if going else "") +
                     f" | {_cell([r.test_error for r in done if r.test_error is not None])}"
                     f" | {_cell([r.train_error for r in done if r.train_error is not None])}"
                     f" | {PAPER.get(arch, '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="?", default="runs/cifar10", help="parent of the run directories")
    args = p.parse_args(argv)
    root = Path(args.runs)
    configs = sorted(root.glob("*/config.yaml"))
    if not configs:
        print(f"cifar10_table: no run directories (*/config.yaml) in {root}", file=sys.stderr)
        return 2
    runs = []
    for c in configs:
        try:
            run = read_run(c.parent)
        except (OSError, KeyError, ValueError, TypeError, yaml.YAMLError, LaunchError) as e:
            print(f"cifar10_table: {c.parent}: cannot read it ({e}); left out", file=sys.stderr)
            continue
        if run is None:
            print(f"cifar10_table: {c.parent}: nothing logged yet; left out", file=sys.stderr)
        else:
            runs.append(run)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

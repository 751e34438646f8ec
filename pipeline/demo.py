"""``python -m pipeline.demo``: the whole pipeline on a small real dataset, on the CPU, in minutes.

scikit-learn's handwritten digits -> ImageFolder of JPEGs -> data_prep shards -> cifar_resnet20 trained
with the real CLI (``conf/demo.yaml``) -> a summary of where everything is and the reached accuracy.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

from data_prep.format import MANIFEST_NAME
from pipeline.demo_data import write_digits
from pipeline.run_layout import LAST_CHECKPOINT, WANDB_DIR, checkpoint_dir, metrics_csv

TARGET_TOP1 = 0.95


class StepFailed(Exception):
    """A step of the demo exited non-zero; its own output above says why."""


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise StepFailed(f"error: the demo stopped: `python {' '.join(cmd[1:4])} ...` exited {code} (its message is above)")


def wandb_command() -> str:
    """W&B's command as this Python has it: ``.venv/bin/wandb`` after ``make demo`` (a plain ``wandb`` was
    "command not found" outside the virtual environment)."""
    beside = Path(sys.executable).parent / "wandb"
    return str(beside) if beside.is_file() and shutil.which("wandb") != str(beside) else "wandb"


def best_val_top1(run_dir: Path) -> float:
    with open(metrics_csv(run_dir)) as f:
        values = [float(r["val/top1"]) for r in csv.DictReader(f) if r.get("val/top1")]
    return max(values) if values else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo", description=__doc__,
        epilog="Any other argument goes to `python -m pipeline fit` (e.g. --trainer.max_epochs 2; "
               "`python -m pipeline fit --help` lists them).")
    parser.add_argument("--data", default="data/demo", help="where the images and shards go")
    parser.add_argument("--run-dir", default="runs/demo", help="the training run directory (a demo run already "
                        "there resumes, or is said to be complete; `make clean` starts over)")
    parser.add_argument("--config", default="conf/demo.yaml", help="the training config (default conf/demo.yaml)")
    args, extra = parser.parse_known_args()
    if not Path(args.config).is_file():  # the configs are the repository's (conf/), not the installed package's
        print(f"error: --config {args.config}: no such file in {Path.cwd()}: run the demo from the repository's root "
              f"(`make demo`), or pass --config PATH_TO/conf/demo.yaml", file=sys.stderr)
        return 2
    data, run_dir = Path(args.data), Path(args.run_dir)
    counts = write_digits(data / "images")
    print(f"digits: {counts['train']} train / {counts['val']} val images in {data / 'images'}")
    for split in ("train", "val"):
        run([sys.executable, "-m", "data_prep", "imagefolder", str(data / "images" / split), str(data / "shards"),
             "--split", split, "--samples-per-shard", "500"])
    # an earlier demo run there is kept: fit resumes it, or says it is complete (it was deleted, with the offline
    # W&B run the summary had said to upload later)
    os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
    run([sys.executable, "-m", "pipeline", "fit", "--config", args.config, "--data.root", str(data / "shards"),
         "--trainer.default_root_dir", str(run_dir), *extra])
    top1 = best_val_top1(run_dir)
    wandb_runs = sorted((run_dir / WANDB_DIR).glob("*run-*"))
    print("\n== demo summary ==")
    print(f"shards:      {data / 'shards'} ({MANIFEST_NAME}, *.tar, *.idx)")
    print(f"checkpoints: {checkpoint_dir(run_dir)} ({LAST_CHECKPOINT} + best)")
    print(f"metrics:     {metrics_csv(run_dir)}")
    if wandb_runs:
        print(f"W&B run:     {wandb_runs[-1]}  (upload later: {wandb_command()} sync {wandb_runs[-1]})")
    print(f"best val top-1: {top1:.4f} (target {TARGET_TOP1})")
    if top1 < TARGET_TOP1:
        print("demo did NOT reach the target accuracy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StepFailed as e:
        print(e, file=sys.stderr)
        sys.exit(1)

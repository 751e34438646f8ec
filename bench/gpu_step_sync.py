"""GPU check: between logging steps, `python -m pipeline fit` never makes the host wait for the GPU.

Runs a real fit in this process (``PipelineCLI`` with conf/imagenet_resnet50.yaml on one GPU: the module,
every callback of the CLI, the progress bar, the loggers, the DALI loader) over real-photo shards, and
from step ``--from-step`` on turns on ``torch.cuda.set_sync_debug_mode("warn")``: PyTorch then warns at
each CUDA call of its own that synchronises the host with the device (stream synchronisation, a blocking
copy, ``.item()``). Logging steps stay out of the window (``log_every_n_steps`` is beyond it); DALI's own
threads are not PyTorch's, so the window sees only our side of the loader. tests/test_step_sync.py checks
the same on the CPU by the operations themselves; this is the check on the device.

Prints the synchronising calls per watched step with where each kind comes from, and the images/s of the
watched steps. ``--dry-run``: CPU, dali-cpu, tiny sizes, no sync mode (checks the script).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402


class SyncWindow(Callback):
    """Sync debug mode on from global step ``start`` until the end of step ``end - 1``."""

    def __init__(self, start: int, end: int, cuda: bool) -> None:
        self.start, self.end, self.cuda = start, end, cuda
        self.caught: list[warnings.WarningMessage] = []
        self._ctx = None
        self.t0 = self.t1 = 0.0
        self.images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.start:
            if self.cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()
            self._ctx = warnings.catch_warnings(record=True)
            self.caught = self._ctx.__enter__()
            warnings.simplefilter("always")
            if self.cuda:
                torch.cuda.set_sync_debug_mode("warn")
        if self.start <= step < self.end:
            self.images += int(batch[0].shape[0])
        if step == self.end:
            self._close()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def _close(self) -> None:
        if self._ctx is None:
            return
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        self.t1 = time.perf_counter()
        self._ctx.__exit__(None, None, None)
        self._ctx = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/gpu-step-sync")
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--backend", default="dali", help="dali, synthetic, cpu (data.backend)")
    ap.add_argument("--from-step", type=int, default=8, help="first watched step (the ones before warm up)")
    ap.add_argument("--steps", type=int, default=30, help="watched steps")
    ap.add_argument("--compile", action="store_true", help="model.compile true (the config's default)")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    cuda = not args.dry_run
    if args.dry_run:
        args.images, args.batch, args.backend, args.from_step, args.steps = 64, 8, "dali-cpu", 2, 3
        args.work += "-dry"

    from gpu_loader import make_shards

    from pipeline.cli import PipelineCLI
    from pipeline.datamodule import ShardDataModule
    from pipeline.module import ImageClassifier

    shards = make_shards(Path(args.work), args.images, os.cpu_count() or 2)
    shutil.rmtree(Path(args.work) / "run", ignore_errors=True)  # a rerun: the fit refused the old config.yaml
    end = args.from_step + args.steps
    cli_args = [
        "--config", str(REPO / "conf" / "imagenet_resnet50.yaml"), "--data.root", str(shards),
        "--data.val_split", "train", "--data.backend", args.backend, "--data.batch_size", str(args.batch),
        "--data.num_workers", str(min(8, os.cpu_count() or 2)),
        "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.max_steps", str(end + 1),
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", str(end + 10), "--trainer.default_root_dir", str(Path(args.work) / "run"),
        "--checkpoint.every_n_train_steps", "0", "--tracking.wandb", "false",
        "--model.compile", "true" if args.compile else "false",
    ]
    if args.dry_run:
        cli_args += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.augment.train_size",
                     "64", "--model.arch", "resnet18"]
    cli = PipelineCLI(ImageClassifier, ShardDataModule, run=False, auto_configure_optimizers=False,
                      trainer_defaults={"use_distributed_sampler": False}, args=cli_args)
    window = SyncWindow(args.from_step, end, cuda)
    cli.trainer.callbacks.append(window)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    by_place = collections.Counter(f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:80]}"
                                   for w in window.caught if "synchroniz" in str(w.message).lower())
    total = sum(by_place.values())
    rate = window.images / max(window.t1 - window.t0, 1e-9)
    device = torch.cuda.get_device_name() if cuda else "cpu (dry run: sync mode off)"
    print(f"\n{device}, backend {args.backend}, batch {args.batch}, steps {args.from_step}..{end - 1} watched")
    print("| measurement | value |\n|---|---|")
    print(f"| synchronising CUDA calls per watched step | {total / max(1, args.steps):.2f} |")
    print(f"| images/s over the watched steps (fit, uncompiled unless --compile) | {rate:,.0f} |")
    for place, n in by_place.most_common():
        print(f"  {n:5d}x {place}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The training step never makes the host wait for the device.

On a GPU every ``.item()``, boolean-mask index, ``unique`` or Python number turned into a device tensor
inside the step blocks the host until the GPU has finished all queued work; the GPU then idles while the
host prepares the next step. CI has no GPU, so this test watches the operations themselves: a
``TorchDispatchMode`` records every ATen call that synchronises on a CUDA device, from the start of one
training batch to the start of the next (steps 2..7 of a real fit through the CLI: module, callbacks,
progress bar, loggers), with logging steps out of the window.
"""

from __future__ import annotations

import collections
import sys
import traceback

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import REPO

# ATen calls that wait for the device on CUDA (value to host, data-dependent output size) or copy a
# Python number to the device (torch.tensor(x, device=...): a blocking host-to-device copy)
SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten.unique",
           "aten.is_nonzero", "aten.equal", "aten.lift_fresh")


def _bool_index(args) -> bool:
    """Indexing with a boolean mask (x[mask]): the kernel runs nonzero on it, below this mode's view."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


class _Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.where: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNCING) or (name.startswith(("aten.index.", "aten.index_put")) and _bool_index(args)):
            self.calls[name] += 1
            self.where.setdefault(name, "".join(traceback.format_stack(limit=10)[:-1]))
        return func(*args, **(kwargs or {}))


class _Watch(Callback):
    """Records from the start of batch k to the start of batch k+1, for k >= 2 (the first steps set up)."""

    def __init__(self) -> None:
        self.mode: _Record | None = None
        self.calls: collections.Counter = collections.Counter()
        self.where: dict[str, str] = {}
        self.watched = 0

    def _stop(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.calls.update(self.mode.calls)
            for k, v in self.mode.where.items():
                self.where.setdefault(k, v)
            self.mode = None
            self.watched += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._stop()
        if 2 <= trainer.global_step < trainer.max_steps - 1:
            self.mode = _Record()
            self.mode.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()


def _demo_cli(shards, tmp_path, workers: int, steps: int, log_every: int):
    """The CLI of a demo fit without validation, built (run=False): the trainer, model and data to fit."""
    from pipeline.cli import PipelineCLI
    from pipeline.datamodule import ShardDataModule
    from pipeline.module import ImageClassifier

    args = ["--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(shards),
            "--trainer.default_root_dir", str(tmp_path / "run"), "--data.num_workers", str(workers),
            "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
            "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", str(log_every),
            "--tracking.wandb", "false"]
    return PipelineCLI(ImageClassifier, ShardDataModule, run=False, auto_configure_optimizers=False,
                       trainer_defaults={"use_distributed_sampler": False}, args=args)


@pytest.mark.parametrize("terminal", [True, False], ids=["tqdm-bar", "log-lines"])
def test_training_steps_do_not_synchronise(digits_shards, tmp_path, monkeypatch, terminal):
    from pipeline.progress import LineProgress, StepProgressBar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal)
    cli = _demo_cli(digits_shards, tmp_path, workers=1, steps=8, log_every=100)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar if terminal else LineProgress)
    assert bar.refresh_rate == 100
    watch = _Watch()
    cli.trainer.callbacks.append(watch)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert watch.watched == 5
    assert not watch.calls, "host-device synchronisation in the training step:\n" + "\n".join(
        f"{name} x{n}, first at:\n{watch.where[name]}" for name, n in watch.calls.items())


def test_the_terminal_bar_refreshes_on_the_loggers_steps(digits_shards, tmp_path, monkeypatch):
    """tqdm's bar refreshed every 4 batches of the epoch, the loggers every 4 global steps: after epoch 0
    (22 batches) the two read the metrics (a GPU synchronisation each) at different steps."""
    import pytorch_lightning as pl

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    cli = _demo_cli(digits_shards, tmp_path, workers=0, steps=30, log_every=4)
    bar = cli.trainer.progress_bar_callback
    refreshed = []

    class Seen(pl.Callback):  # runs after the bar: its counter moves only when it refreshes
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if bar.train_progress_bar.n == batch_idx + 1:
                refreshed.append(trainer.global_step)

    cli.trainer.callbacks.append(Seen())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert refreshed == [4, 8, 12, 16, 20, 22, 24, 28], refreshed  # 22: epoch 0's last batch


def test_masked_top1_counts_only_valid_samples():
    from torchmetrics.classification import MulticlassAccuracy

    from pipeline.module import masked_top1

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    labels[:20] = logits[:20].argmax(1)  # some right answers
    valid = torch.rand(64, generator=g) > 0.3
    valid[:10] = False  # right answers among the masked ones must not count
    expected = MulticlassAccuracy(10, top_k=1, average="micro")(logits[valid], labels[valid])
    assert torch.isclose(masked_top1(logits, labels, valid), expected)
    assert masked_top1(logits, labels, torch.zeros(64, dtype=torch.bool)) == 0

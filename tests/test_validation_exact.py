"""Distributed validation equals single-process validation exactly (padding masked, counts summed)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from pipeline.data.shards import ShardSet
from tests.conftest import REPO, run_module


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """An untrained network's weights (``validate`` needs a checkpoint or weights to score)."""
    import torch

    from pipeline.models import build

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "init.pt"
    torch.save(build("cifar_resnet20", num_classes=10).state_dict(), path)
    return path


def _validate(shards: Path, run_dir: Path, devices: int, *extra: str, batch: int = 50) -> dict[str, float]:
    args = ["pipeline", "validate", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(shards),
            "--trainer.default_root_dir", str(run_dir), "--data.num_workers", "0",
            "--data.val_batch_size", str(batch), "--tracking.wandb", "false", "--trainer.devices", str(devices),
            *extra]
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    run_module(*args)
    with open(run_dir / "validate" / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/top1")]
    assert len(rows) == 1
    return {k: float(v) for k, v in rows[0].items() if k.startswith("val/")}


def test_two_process_validation_equals_one_process(digits_shards, tmp_path, weights):
    """363 val samples on 2 ranks x batch 50: rank 1 gets 18 padding entries that must not count."""
    one = _validate(digits_shards, tmp_path / "one", 1, "--model.init_weights", str(weights))
    two = _validate(digits_shards, tmp_path / "two", 2, "--model.init_weights", str(weights))
    assert one["val/top1"] == two["val/top1"] and one["val/top5"] == two["val/top5"]
    assert abs(one["val/loss"] - two["val/loss"]) < 1e-6
    correct = one["val/top1"] * 363
    assert abs(correct - round(correct)) < 1e-3, "top-1 is a count over exactly 363 samples"
    assert one["val/samples"] == two["val/samples"] == 363


@pytest.mark.parametrize("backend", ["cpu", "dali-cpu"])
def test_validation_with_skipped_corrupt_samples_and_an_all_padding_batch(digits_shards, tmp_path, backend,
                                                                          weights):
    """Batches of 181: rank 0 validates samples 0-181 (its second batch: sample 181 alone), rank 1 182-362
    (its second batch: padding only); one process has 362 alone in its third batch. Samples 5, 181 and 362
    are zeroed (corrupt) and skipped, so batches with no valid sample come from padding and from corruption
    (they used to crash torchmetrics' top-k). Metrics over the 360 left equal one process's."""
    root = tmp_path / "shards"
    shutil.copytree(digits_shards, root)
    val = ShardSet(root, "val")
    for sid in (5, 181, 362):
        with open(root / val.shard_name(sid), "r+b") as f:
            f.seek(int(val.offsets[sid]))
            f.write(bytes(int(val.sizes[sid])))
    extra = ("--data.on_corrupt", "skip", "--data.backend", backend, "--model.init_weights", str(weights))
    one = _validate(root, tmp_path / "one", 1, *extra, batch=181)
    two = _validate(root, tmp_path / "two", 2, *extra, batch=181)
    assert one["val/samples"] == two["val/samples"] == 360
    assert one["val/top1"] == two["val/top1"] and one["val/top5"] == two["val/top5"]
    assert abs(one["val/loss"] - two["val/loss"]) < 1e-6
    correct = one["val/top1"] * 360
    assert abs(correct - round(correct)) < 1e-3, "top-1 is a count over exactly the 360 good samples"



@pytest.mark.parametrize("num_classes, logged", [(3, False), (5, False), (6, True)])
def test_top5_is_logged_only_with_more_than_five_classes(tmp_path, num_classes, logged):
    """With 5 classes or fewer every sample is in the top 5: a metric that is always 1.0 is left out."""
    import pytorch_lightning as pl
    import torch
    from sklearn.datasets import load_digits

    from pipeline.module import ImageClassifier

    digits = load_digits()
    keep = digits.target < num_classes
    images = torch.from_numpy(digits.images[keep][:64] * 255 / 16).to(torch.uint8)
    images = images[:, None].expand(-1, 3, -1, -1).contiguous()  # 8x8 grey digits as 3-channel uint8
    labels = torch.from_numpy(digits.target[keep][:64]).long()
    batches = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images[:64], labels[:64], torch.ones(64, dtype=torch.bool)), batch_size=32)
    model = ImageClassifier(arch="cifar_resnet20", num_classes=num_classes, channels_last=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    [metrics] = trainer.validate(model, batches, verbose=False)
    assert ("val/top5" in metrics) is logged, sorted(metrics)
    assert 0 <= metrics["val/top1"] <= 1 and metrics["val/samples"] == 64

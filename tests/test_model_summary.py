"""The model summary at the start of ``fit`` shows the network's FLOPs (Lightning's own printed 0)."""
from __future__ import annotations

import torch
from pytorch_lightning.utilities.model_summary.model_summary import get_human_readable_count
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models import build
from tests.conftest import REPO, run_module


def test_fit_prints_the_networks_flops_per_image(digits_shards, tmp_path):
    with FlopCounterMode(display=False) as counter:  # the real network on one real-sized input
        build("cifar_resnet20", num_classes=10).eval()(torch.zeros(1, 3, 32, 32))
    expected = get_human_readable_count(counter.get_total_flops())
    assert expected == "81.1 M"  # 2 x the paper's ~41M multiply-adds of ResNet-20
    proc = run_module("pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root",
                      str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps",
                      "1", "--tracking.wandb", "false", "--trainer.enable_model_summary", "true",
                      "--model.compile", "false")
    out = proc.stdout + proc.stderr
    assert f"Total FLOPs: {expected}" in out, out[-3000:]
    assert "FLOPs not counted" not in out

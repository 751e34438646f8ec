"""The model summary at the start of ``fit`` shows the network's FLOPs (Lightning's own printed 0)."""
from __future__ import annotations

import pytest
import torch
from pytorch_lightning.utilities.model_summary.model_summary import get_human_readable_count
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models import build
from tests.conftest import REPO, run_module


@pytest.mark.parametrize("arch", ["cifar_resnet20", "resnet18"])
def test_fit_prints_the_networks_flops_per_image(digits_shards, tmp_path, arch):
    """resnet18 at the demo's 32 px ends in a 1x1 feature map: a twin in training mode failed there
    (BatchNorm refuses one value per channel) and a partial count was printed as the total."""
    with FlopCounterMode(display=False) as counter:  # the real network on one real-sized input
        build(arch, num_classes=10).eval()(torch.zeros(1, 3, 32, 32))
    expected = get_human_readable_count(counter.get_total_flops())
    if arch == "cifar_resnet20":
        assert expected == "81.1 M"  # 2 x the paper's ~41M multiply-adds of ResNet-20
    proc = run_module("pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root",
                      str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps",
                      "1", "--tracking.wandb", "false", "--trainer.enable_model_summary", "true",
                      "--model.compile", "false", "--model.arch", arch)
    out = proc.stdout + proc.stderr
    assert f"Total FLOPs: {expected}" in out, out[-3000:]
    assert "FLOPs not counted" not in out

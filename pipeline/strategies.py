"""Extra training strategies, registered by name for ``--trainer.strategy``.

``deepspeed_stage_{1,2,3}_cpu``: Lightning's ``DeepSpeedStrategy`` refuses a non-CUDA accelerator; these
variants run DeepSpeed's CPU accelerator over gloo, so CI (and a laptop) exercises the same ZeRO code
path, checkpoint directories and export as the GPU configs (``conf/*deepspeed*.yaml``). They are for
testing, not speed: on CPUs plain DDP is always faster.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from lightning_fabric.utilities.seed import reset_seed

CPU_STRATEGIES = {f"deepspeed_stage_{s}_cpu": s for s in (1, 2, 3)}


def _extensions_dir() -> None:
    """DeepSpeed compiles a small C++ extension on first init (~45 s); cache it across runs."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO on CPU processes (gloo); same checkpoints as on GPUs."""

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:  # skip the CUDA-only check
        _extensions_dir()
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:  # CPU devices have no index to validate
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)

    def _get_process_group_backend(self) -> str:
        return "gloo"


for _name, _stage in CPU_STRATEGIES.items():
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, CPUDeepSpeedStrategy, description=f"DeepSpeed ZeRO-{_stage} on CPU",
                                  stage=_stage)

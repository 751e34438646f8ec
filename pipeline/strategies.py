"""Extra training strategies, registered by name for ``--trainer.strategy``.

Lightning's ``deepspeed*`` names are re-registered with ``AtomicDeepSpeedStrategy``: the same strategy
whose checkpoint directories are written beside the target and swapped in whole
(``checkpoint_io.replace_directory``), so a kill during a save never leaves a half-written ``last.ckpt``.

``deepspeed_stage_{1,2,3}_cpu``: Lightning's ``DeepSpeedStrategy`` refuses a non-CUDA accelerator; these
variants run DeepSpeed's CPU accelerator over gloo, so CI (and a laptop) exercises the same ZeRO code
path, checkpoint directories and export as the GPU configs (``conf/*deepspeed*.yaml``). They are for
testing, not speed: on CPUs plain DDP is always faster.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from lightning_fabric.utilities.seed import reset_seed

from pipeline.checkpoint_io import fsync_tree, partial_path, replace_directory

CPU_STRATEGIES = {f"deepspeed_stage_{s}_cpu": s for s in (1, 2, 3)}


def _extensions_dir() -> Path:
    """DeepSpeed compiles a small C++ extension on first init (~45 s); cache it across runs: in
    ``TORCH_EXTENSIONS_DIR``, else where torch would put it (``$XDG_CACHE_HOME/torch_extensions``, else
    ``~/.cache/torch_extensions``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(cache) / "torch_extensions")))


def check_extensions_dir() -> None:
    """Refuse, before the run starts, an extensions folder this user cannot write (a HOME that is read-only
    or missing, as for a service account or in a container): torch builds and locks there, and the start
    failed in a ``PermissionError`` traceback from ``os.makedirs`` once DeepSpeed initialised."""
    from pipeline.errors import ConfigError
    from pipeline.file_access import describe_owner, unwritable_part

    where = _extensions_dir()
    bad = unwritable_part(where)
    if bad is not None:
        raise ConfigError(f"TORCH_EXTENSIONS_DIR: DeepSpeed's CPU strategies build a C++ extension in {where}, and "
                          f"{bad} is not writable{describe_owner(bad)}: set TORCH_EXTENSIONS_DIR (or XDG_CACHE_HOME, "
                          f"or HOME) to a folder this user can write, e.g. export TORCH_EXTENSIONS_DIR=$PWD/.cache/"
                          f"torch_extensions")


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed whose checkpoint directories appear whole or not at all, and whose ``bf16-mixed`` is the
    DDP runs' (``_format_config``)."""

    def _format_config(self) -> None:
        """``precision: bf16-mixed`` as DeepSpeed's ``torch_autocast`` (fp32 weights, convolutions and the fc
        layer in bf16 under autocast, BatchNorm in fp32: what a DDP run's bf16-mixed does), not its ``bf16``
        mode: that casts the parameters alone to bf16 (DeepSpeed 0.19 keeps buffers fp32), and the first
        convolution met an fp32 input (``Input type (float) and weight type (BFloat16)``), the BatchNorm bf16
        weights fp32 running statistics."""
        super()._format_config()
        if self.precision_plugin.precision == "bf16-mixed" and isinstance(self.config.get("bf16"), dict):
            del self.config["bf16"]
            self.config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}

    def _initialize_deepspeed_inference(self, model) -> None:
        """``validate``/``test``'s engine under the same ``torch_autocast`` as the training: Lightning gives it
        DeepSpeed's ``fp16`` and ``bf16`` settings alone, so a bf16-mixed run's checkpoints were scored in fp32
        (another val/loss and top-1 than the training logged and named its best-k files after)."""
        autocast = self.config.get("torch_autocast")
        if autocast is None:
            return super()._initialize_deepspeed_inference(model)
        import deepspeed

        initialize = deepspeed.initialize

        def with_autocast(*args, config: dict, **kwargs):
            return initialize(*args, config={**config, "torch_autocast": autocast}, **kwargs)

        deepspeed.initialize = with_autocast  # Lightning's method looks it up on the module at the call
        try:
            return super()._initialize_deepspeed_inference(model)
        finally:
            deepspeed.initialize = initialize

    def on_validation_start(self) -> None:
        """Every rank validates with rank 0's BatchNorm running statistics, the ones its checkpoints hold.
        DDP broadcasts the module's buffers from rank 0 at each forward; DeepSpeed does so once, at start: each
        rank's running statistics followed its own batches, so a 2-rank ZeRO run scored half the validation
        split with statistics no checkpoint has (a logged val/top1 of 0.145, and a best-k file named after it,
        for weights that score 0.155). (``sync_batchnorm`` keeps them equal anyway.)"""
        super().on_validation_start()
        if self.world_size > 1:
            for buffer in self.lightning_module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        final = self.broadcast(str(filepath))
        if "://" in final:  # remote stores: no renames there
            return super().save_checkpoint(checkpoint, final, storage_options)
        partial = partial_path(final)
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier("checkpoint_partial_cleared")
        super().save_checkpoint(checkpoint, str(partial), storage_options)
        fsync_tree(partial)  # every rank: a shared file system holds each client's writes until then
        self.barrier("checkpoint_written")
        if self.is_global_zero:
            replace_directory(partial, final)
        self.barrier("checkpoint_swapped")


class CPUDeepSpeedStrategy(AtomicDeepSpeedStrategy):
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


for _name in [n for n in StrategyRegistry.available_strategies() if n.startswith("deepspeed")]:
    _entry = StrategyRegistry[_name]
    if _entry["strategy"] is DeepSpeedStrategy:
        StrategyRegistry.register(_name, AtomicDeepSpeedStrategy, description=_entry["description"],
                                  override=True, **_entry["init_params"])

for _name, _stage in CPU_STRATEGIES.items():
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, CPUDeepSpeedStrategy, description=f"DeepSpeed ZeRO-{_stage} on CPU",
                                  stage=_stage)

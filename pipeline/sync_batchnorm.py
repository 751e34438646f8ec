"""SyncBatchNorm that also runs on CPU processes (gloo), for ``--trainer.sync_batchnorm true`` on CPUs.

torch's ``nn.SyncBatchNorm`` only works on GPUs (and DDP refuses it on CPU modules). With small per-rank
batches BN statistics over the *global* batch matter for accuracy, and CI checks that a multi-process
run with SyncBN matches a one-process run on the same global batch; that needs SyncBN on CPUs. This
layer all-reduces per-channel sums (``_AllReduceSum``, whose backward all-reduces the gradients, giving the
exact global-batch gradient) in two passes (mean, then centred squares, which avoids the E[x^2]-E[x]^2
cancellation). On GPUs the CLI keeps torch's layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_lightning.plugins.layer_sync import LayerSync
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, and the same for the gradient: torch's ``torch.distributed.nn.functional.all_reduce``,
    which torch 2.14 deprecates (a FutureWarning twice per rank; its successor in
    ``_functional_collectives`` is private)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd's signature
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return _AllReduceSum.apply(grad)


class GlooSyncBatchNorm(_BatchNorm):
    """Batch norm over the samples of all ranks (any input rank >= 2, channels in dim 1)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype != torch.float64 else x
        local_n = torch.tensor([x.numel() // x.size(1)], dtype=xf.dtype, device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dims), local_n]))
        count = stats[-1]
        mean = stats[:-1] / count
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(mean.detach() * f)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.mul_(1 - f).add_(unbiased * f)
        return y.to(x.dtype)


def _swap(module: nn.Module, to_sync: bool) -> nn.Module:
    src = _BatchNorm if to_sync else GlooSyncBatchNorm
    out = module
    if isinstance(module, src) and (to_sync != isinstance(module, GlooSyncBatchNorm)):
        cls = GlooSyncBatchNorm if to_sync else nn.BatchNorm2d
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _swap(child, to_sync))
    return out


class GlooSyncBatchNormPlugin(LayerSync):
    """Lightning plugin: every BatchNorm becomes a ``GlooSyncBatchNorm`` for training, and back after."""

    def apply(self, model: nn.Module) -> nn.Module:
        return _swap(model, True)

    def revert(self, model: nn.Module) -> nn.Module:
        return _swap(model, False)

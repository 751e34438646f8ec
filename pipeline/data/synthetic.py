"""Synthetic input: random uint8 images made on the training device, for throughput benchmarks.

It follows the contract's sampler for its length, so epochs, resume and the trainer's progress behave
as with real data; only the pixels and labels are made up.
"""

from __future__ import annotations

import torch

from pipeline.data.contract import TrainSampler, ValSampler


class SyntheticLoader:
    """Random uint8 batches with the sampler's length and validity mask (pixels and labels made up)."""

    batch_sampler = None  # Lightning looks for a sampler or a batch sampler to call set_epoch on

    def __init__(self, sampler: TrainSampler | ValSampler, size: int, num_classes: int,
                 device: str | torch.device | None = None) -> None:
        self.sampler, self.size, self.num_classes = sampler, size, num_classes
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        g = torch.Generator(device=self.device).manual_seed(0)
        for rows in self.sampler:
            n = rows.shape[1]
            images = torch.randint(0, 256, (n, 3, self.size, self.size), dtype=torch.uint8, device=self.device,
                                   generator=g).contiguous(memory_format=torch.channels_last)
            labels = torch.randint(0, self.num_classes, (n,), device=self.device, generator=g)
            valid = torch.from_numpy(rows[0] >= 0)
            if torch.device(self.device).type == "cuda":  # a pageable copy would wait for the GPU each step
                valid = valid.pin_memory().to(self.device, non_blocking=True)
            yield images, labels, valid.to(self.device)

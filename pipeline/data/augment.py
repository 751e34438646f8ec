"""Augmentation recipes and their random parameters, shared by every backend.

The crop parameters follow torchvision's RandomResizedCrop exactly (10 tries of a log-uniform aspect
ratio and uniform area, then a centre-crop fallback), but draw from a generator seeded per sample, so a
sample's augmentation is a function of (seed, epoch, position) alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np

from pipeline.errors import require

MAX_SIDE = 4096  # pixels: 16x the usual 224 (a batch of 256 such images is 12 GiB of uint8)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """What the loaders do to images, the same on every backend.

    Args:
        recipe: "imagenet" (random resized crop + flip; eval resize + centre crop) or "cifar" (the paper's
            4-pixel pad + random crop + flip; eval on the image as is).
        train_size: side of the training crop (pixels).
        val_resize: imagenet recipe: eval resizes the shorter side to this, then crops ``val_size``.
        val_size: side of the eval image (pixels): the imagenet recipe's centre crop; the cifar recipe resizes
            an image of another size to it.
        scale: imagenet recipe: the random crop's area, as a fraction of the image's (min, max).
        ratio: imagenet recipe: the random crop's aspect ratio (min, max).
        pad: cifar recipe: pixels padded on each side before the random crop.
        pad_fill: cifar recipe: the border's colour, "black" (0, as torchvision's RandomCrop(padding) before
            Normalize) or "mean" (the colour ``mean``, 0 once normalised: the paper's zero pad of
            mean-subtracted inputs).
        flip: random horizontal flip in training.
        mean: per-channel mean subtracted, on the 0-1 scale (RGB).
        std: per-channel standard deviation divided by, on the 0-1 scale (RGB).
    """

    recipe: Literal["imagenet", "cifar"] = "imagenet"  # a Literal: the CLI names a typo at parse time
    train_size: int = 224
    val_resize: int = 256
    val_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    pad: int = 4
    pad_fill: Literal["black", "mean"] = "black"
    flip: bool = True
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def pad_rgb(self) -> tuple[int, int, int]:
        """The uint8 RGB colour of the cifar recipe's padded border, as both backends write it."""
        return (0, 0, 0) if self.pad_fill == "black" else tuple(int(round(255 * m)) for m in self.mean)

    def check(self) -> None:
        """Refuse impossible values (``ConfigError`` naming the setting). Called by the datamodule, not from
        ``__post_init__``: jsonargparse would bury the message in a traceback of its own."""
        key = "data.augment."
        require(self.recipe in ("imagenet", "cifar"), key + "recipe", "'imagenet' or 'cifar'", self.recipe)
        for name, default in ((f.name, f.default) for f in fields(self)):  # a config file's null passes the parse
            require(getattr(self, name) is not None, key + name, f"set (its default: {default!r})", None)
        for name in ("train_size", "val_resize", "val_size"):  # an upper bound: a typo must not allocate terabytes
            require(1 <= getattr(self, name) <= MAX_SIDE, key + name, f"in [1, {MAX_SIDE}] (pixels)",
                    getattr(self, name))
        require(0 <= self.pad <= self.train_size, key + "pad", "in [0, data.augment.train_size] (pixels)", self.pad)
        require(self.pad_fill in ("black", "mean"), key + "pad_fill", "'black' or 'mean'", self.pad_fill)
        lo, hi = self.scale
        require(0 < lo <= hi <= 1, key + "scale", "(min, max) with 0 < min <= max <= 1", self.scale)
        lo, hi = self.ratio
        require(0 < lo <= hi, key + "ratio", "(min, max) with 0 < min <= max", self.ratio)
        if self.recipe == "imagenet":  # a centre crop larger than the resized image pads it with black
            require(self.val_resize >= self.val_size, key + "val_resize", f">= data.augment.val_size "
                    f"({self.val_size}): the centre crop would pad the image with black", self.val_resize)
        require(len(self.mean) == 3 and all(0 <= v <= 1 for v in self.mean), key + "mean",
                "3 numbers in [0, 1] (RGB, on the 0-1 scale: 0.485, not 123.675)", self.mean)
        require(len(self.std) == 3 and all(0 < v <= 1 for v in self.std), key + "std",
                "3 numbers in (0, 1] (RGB, on the 0-1 scale: 0.229, not 58.395)", self.std)


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of one sample's augmentation: a pure function of the three, so any backend, worker
    count or restart draws the same crop for the same sample. ``seed`` is used whole (any size: seeds
    that differ only above 32 bits draw different crops)."""
    return np.random.default_rng([int(seed), int(epoch), int(position)])


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop, as torchvision.transforms.RandomResizedCrop.get_params draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_params(
    cfg: AugmentConfig, width: int, height: int, rng: np.random.Generator
) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of one training sample, the draws every backend makes in the same order.

    imagenet: the random-resized-crop box in the image. cifar: the window of the image's own size in the
    image padded by ``cfg.pad`` on each side (zeros, or the mean colour: ``cfg.pad_fill``), given in unpadded coordinates (top/left may be negative).
    """
    if cfg.recipe == "imagenet":
        top, left, h, w = random_resized_crop_box(width, height, cfg.scale, cfg.ratio, rng)
    else:
        p = cfg.pad
        top = int(rng.integers(0, 2 * p + 1)) - p
        left = int(rng.integers(0, 2 * p + 1)) - p
        h, w = height, width
    flip = bool(cfg.flip and rng.random() < 0.5)
    return top, left, h, w, flip

"""Benchmark inputs: ImageNet-sized JPEGs (500x375, one in four portrait) cut from real photos."""

from __future__ import annotations

import numpy as np
from PIL import Image


def photo_variant(src: np.ndarray, i: int, rng: np.random.Generator, resample: int) -> Image.Image:
    """Variant ``i`` of the photo ``src``: a random window of the target aspect, resized, maybe mirrored."""
    size = (375, 500) if i % 4 == 3 else (500, 375)
    h, w = src.shape[:2]
    cw = int(rng.integers(w // 3, w))
    ch = min(h, int(cw * size[1] / size[0]))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = Image.fromarray(src[y : y + ch, x : x + cw]).resize(size, resample)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img

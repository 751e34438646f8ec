"""The CPU backend's augmented images come out channels_last, as the batch they are copied into (a CHW image
was transposed into it, about as long as the resize itself), with the pixels the resize of the plain crop
gives."""
from __future__ import annotations

import io

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pipeline.data.augment import AugmentConfig, sample_rng
from pipeline.data.cpu_backend import augment_train, decode_rgb, resize_and_flip


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_resized_windows_are_channels_last_with_the_same_pixels():
    rng = np.random.default_rng(0)
    cfg = AugmentConfig()
    size = [cfg.train_size, cfg.train_size]
    for k in range(40):
        h, w = int(rng.integers(20, 600)), int(rng.integers(20, 600))
        decoded = decode_rgb(_jpeg(rng, h, w))  # the decoder's HWC pixels, seen as CHW
        chw = decoded.contiguous()  # another layout a window may come in
        for img in (decoded, chw):
            top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
            window = TF.crop(img, top, left, int(rng.integers(1, h - top + 1)), int(rng.integers(1, w - left + 1)))
            flip = bool(k % 2)
            want = TF.resize(window, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            want = TF.horizontal_flip(want) if flip else want
            got = resize_and_flip(window, cfg, flip)
            assert torch.equal(got, want), (h, w, window.shape)
            assert got.unsqueeze(0).is_contiguous(memory_format=torch.channels_last)
        out = augment_train(decoded, cfg, sample_rng(0, 1, k))
        assert out.shape == (3, *size) and out.unsqueeze(0).is_contiguous(memory_format=torch.channels_last)

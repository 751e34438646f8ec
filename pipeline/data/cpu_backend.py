"""The CPU backend: PIL decoding and torchvision resizing in DataLoader worker processes.

Each worker builds whole batches (the sampler hands it a (3, B) array of ids, positions and epochs), so the
per-sample Python here stays on the CPU path; the GPU path is the DALI backend. Images leave as uint8
NCHW tensors in channels_last memory; the LightningModule normalises them on the device.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pipeline.data.augment import AugmentConfig, sample_rng, train_params
from pipeline.data.contract import PAD
from pipeline.data.shards import ShardSet

log = logging.getLogger(__name__)


class CorruptSampleError(RuntimeError):
    """A sample's bytes could not be decoded; the message names the shard and sample id."""


def decode_rgb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", img.size)  # no-op scale; keeps JPEG decoding in RGB
    return img.convert("RGB")


def augment_train(img: Image.Image, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """The training augmentation of ``cfg.recipe`` with the draws of ``train_params`` (as the DALI backend)."""
    top, left, h, w, flip = train_params(cfg, img.width, img.height, rng)
    if cfg.recipe == "imagenet":
        img = img.resize(
            (cfg.train_size, cfg.train_size), Image.BILINEAR, box=(left, top, left + w, top + h)
        )
    else:  # cifar: the window of the original size in the zero-padded image
        p = cfg.pad
        padded = Image.new("RGB", (img.width + 2 * p, img.height + 2 * p))
        padded.paste(img, (p, p))
        img = padded.crop((left + p, top + p, left + p + w, top + p + h))
        if img.size != (cfg.train_size, cfg.train_size):
            img = img.resize((cfg.train_size, cfg.train_size), Image.BILINEAR)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def augment_eval(img: Image.Image, cfg: AugmentConfig) -> Image.Image:
    if cfg.recipe == "imagenet":
        t = TF.resize(img, cfg.val_resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(t, cfg.val_size)
    if img.size != (cfg.val_size, cfg.val_size):
        img = img.resize((cfg.val_size, cfg.val_size), Image.BILINEAR)
    return img


class ShardBatches(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: ``dataset[(3, B) array]`` -> (images, labels, valid).

    The array is what the contract's samplers yield: ids, positions in the epoch, epoch.

    ``on_corrupt``: "fail" raises ``CorruptSampleError`` naming the shard; "skip" logs it, replaces the
    sample by a masked copy of a good one in the batch (valid=False) and counts it in ``corrupt_seen``.
    """

    def __init__(
        self, shards: ShardSet, cfg: AugmentConfig, train: bool, seed: int, on_corrupt: str = "fail"
    ) -> None:
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"data.on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
        self.shards, self.cfg, self.train, self.seed, self.on_corrupt = shards, cfg, train, seed, on_corrupt
        self.corrupt_seen = 0

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, positions, epochs = batch
        size = self.cfg.train_size if self.train else self.cfg.val_size
        images = torch.empty((len(ids), 3, size, size), dtype=torch.uint8)
        labels = torch.zeros(len(ids), dtype=torch.int64)
        valid = torch.ones(len(ids), dtype=torch.bool)
        bad = []
        for j, (sid, pos, epoch) in enumerate(zip(ids.tolist(), positions.tolist(), epochs.tolist())):
            if sid == PAD:
                valid[j] = False
                bad.append(j)
                continue
            try:
                img = decode_rgb(self.shards.read_jpeg(sid))
            except Exception as e:  # PIL raises many types for broken data
                msg = f"corrupt sample {sid} in shard {self.shards.shard_name(sid)!r}: {e}"
                if self.on_corrupt == "fail":
                    raise CorruptSampleError(msg) from None
                log.warning("skipping %s", msg)
                self.corrupt_seen += 1
                valid[j] = False
                bad.append(j)
                continue
            if self.train:
                img = augment_train(img, self.cfg, sample_rng(self.seed, epoch, pos))
            else:
                img = augment_eval(img, self.cfg)
            images[j] = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
            labels[j] = self.shards.read_label(sid)
        good = [j for j in range(len(ids)) if j not in bad]
        if bad:
            if not good:
                images.zero_()
            else:
                for j in bad:  # masked filler, so batch shape and BN statistics stay sane
                    images[j], labels[j] = images[good[0]], labels[good[0]]
        return images.contiguous(memory_format=torch.channels_last), labels, valid

"""The CPU backend: libjpeg-turbo decoding (torchvision.io) and torchvision v2 resizing in DataLoader workers.

Each worker builds whole batches (the sampler hands it a (3, B) array of ids, positions and epochs), so the
per-sample Python here stays on the CPU path; the GPU path is the DALI backend. Pixels stay uint8 tensors
from decode to output: torchvision's antialiased bilinear resize of uint8 images is a vectorised kernel,
about twice as fast as PIL's and as DALI's CPU resize on the same crops (bench/loader.py). Images leave as
uint8 NCHW tensors in channels_last memory; the LightningModule normalises them on the device.
"""

from __future__ import annotations

import io
import logging
import re

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.data.augment import AugmentConfig, sample_rng, train_params
from pipeline.data.contract import PAD
from pipeline.data.dali_source import jpeg_size
from pipeline.data.shared_memory import shared_empty
from pipeline.data.shards import CorruptSampleError, ShardSet

log = logging.getLogger(__name__)


def _reason(error: Exception) -> str:
    """Why a sample failed, without PIL's ``<_io.BytesIO object at 0x...>``."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error)).strip()
    return text or type(error).__name__


def decode_rgb(data: bytes) -> torch.Tensor:
    """(3, H, W) uint8 RGB pixels of an encoded image; raises on bytes that are not a whole image.

    Whole JPEGs (``jpeg_size``: SOI, frame header, EOI) go to libjpeg-turbo through ``decode_jpeg`` (torchvision
    0.29 calls it deprecated in favour of torchcodec, whose wheels must match torch's build exactly; the NGC
    image's torch has no matching torchcodec, so the pinned torchvision's decoder is used); anything
    else (a truncated JPEG, another format) and anything it refuses goes to PIL, which decodes what it can
    and raises on the rest, so this accepts exactly what PIL accepts. EXIF orientation is not applied.
    """
    if jpeg_size(data) is not None:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL gives the error message (or decodes what libjpeg-turbo's strict setup refused)
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", img.size)  # no-op scale; keeps JPEG decoding in RGB
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def augment_train(img: torch.Tensor, cfg: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """The training augmentation of ``cfg.recipe`` on a (3, H, W) uint8 image, with the draws of
    ``train_params`` (as the DALI backend)."""
    height, width = img.shape[-2:]
    top, left, h, w, flip = train_params(cfg, width, height, rng)
    if cfg.recipe == "imagenet":
        return resize_and_flip(TF.crop(img, top, left, h, w), cfg, flip)
    p = cfg.pad  # cifar: the window of the original size in the image padded with cfg.pad_fill
    img = TF.crop(TF.pad(img, [p], fill=list(cfg.pad_rgb())), top + p, left + p, h, w)
    if list(img.shape[-2:]) == [cfg.train_size, cfg.train_size]:
        return TF.horizontal_flip(img) if flip else img
    return resize_and_flip(img, cfg, flip)


def resize_and_flip(window: torch.Tensor, cfg: AugmentConfig, flip: bool) -> torch.Tensor:
    """The end of the training recipe: a (3, h, w) uint8 window to ``train_size`` (antialiased bilinear,
    as torchvision's ``resized_crop``), then the flip. dali-cpu calls it on the window DALI decoded."""
    size = [cfg.train_size, cfg.train_size]
    # the resize keeps its input's layout, and a crop of the decoder's HWC pixels is contiguous in neither:
    # made HWC-contiguous first, the image comes out channels_last like the batch, which takes it in a plain
    # copy (a CHW one was transposed into it: the two steps took twice as long, bench/scale.py); same pixels
    window = window.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    img = TF.resize(window, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.horizontal_flip(img) if flip else img


def augment_eval(img: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Evaluation transform of a (3, H, W) uint8 image: imagenet resizes the shorter side and centre-crops."""
    if cfg.recipe == "imagenet":
        img = TF.resize(img, cfg.val_resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(img, [cfg.val_size, cfg.val_size])
    if list(img.shape[-2:]) != [cfg.val_size, cfg.val_size]:
        img = TF.resize(img, [cfg.val_size, cfg.val_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
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
        # in a worker, the batch is made in shared memory, where its queue would copy it (shared_memory.py)
        empty = shared_empty if torch.utils.data.get_worker_info() is not None else torch.empty
        images = empty((len(ids), 3, size, size), dtype=torch.uint8, memory_format=torch.channels_last)
        labels = empty((len(ids),), dtype=torch.int64).zero_()
        valid = empty((len(ids),), dtype=torch.bool).fill_(True)
        bad = []
        for j, (sid, pos, epoch) in enumerate(zip(ids.tolist(), positions.tolist(), epochs.tolist())):
            if sid == PAD:
                valid[j] = False
                bad.append(j)
                continue
            try:
                img = decode_rgb(self.shards.read_jpeg(sid))
                label = self.shards.read_label(sid)
            except Exception as e:  # PIL raises many types for broken data
                if isinstance(e, OSError) and e.errno is not None:
                    raise  # the file system's (too many open files, I/O error), not the sample's: skipped, it is lost
                msg = f"corrupt {self.shards.describe(sid)}: {_reason(e)}"
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
            images[j] = img
            labels[j] = label
        good = [j for j in range(len(ids)) if j not in bad]
        if bad:
            if not good:
                images.zero_()
            else:
                for j in bad:  # masked filler, so batch shape and BN statistics stay sane
                    images[j], labels[j] = images[good[0]], labels[good[0]]
        return images, labels, valid

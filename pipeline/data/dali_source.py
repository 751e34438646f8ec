"""The external source of the DALI backends: sampler rows -> encoded JPEG bytes, crop windows, flips,
labels and validity.

Kept free of torch and DALI imports: DALI spawns worker processes that unpickle it, and each of them
imports this module (a light import keeps their start short).
"""

from __future__ import annotations

import io
import os
from functools import lru_cache

import numpy as np

from data_prep.jpeg_markers import EOI, EOI_BYTES, SOF_MARKERS, SOS, BrokenMarkerStructure, marker_segments
from pipeline.data.augment import AugmentConfig, sample_rng, train_params
from pipeline.data.contract import PAD
from pipeline.data.shards import ShardSet
from pipeline.data.worker_signals import shield_worker

def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None when the bytes are not a whole JPEG.

    Whole means: starts with SOI, has a frame header with a non-zero size before any scan, and has an
    EOI after that header (trailing bytes after the EOI are allowed, as data_prep allows them). Lighter
    than data_prep's ``parse_jpeg_header``: it stops at the first frame header, does not check segment
    lengths, and looks for the EOI anywhere after that header (data_prep: in the file's last 4 KiB).
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    try:
        for pos, marker, _length in marker_segments(data):
            if marker in (EOI, SOS):  # EOI or a scan before any frame header
                return None
            if marker in SOF_MARKERS:
                if pos + 9 > n:
                    return None
                height = (data[pos + 5] << 8) | data[pos + 6]
                width = (data[pos + 7] << 8) | data[pos + 8]
                if width == 0 or height == 0 or data.rfind(EOI_BYTES, pos + 9) < 0:
                    return None
                return width, height
    except BrokenMarkerStructure:
        return None
    return None


@lru_cache(maxsize=1)
def _filler_jpeg() -> np.ndarray:
    """A tiny grey JPEG that stands in when no sample of a batch is usable (all padding or corrupt)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, format="JPEG", quality=90)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


class BatchSource:
    """The external source: row ``iteration`` of plan ``epoch_idx`` -> encoded bytes, crop windows, flips,
    labels and validity. Picklable (DALI sends it to its worker processes)."""

    def __init__(self, shards: ShardSet, plan_dir: str, cfg: AugmentConfig, train: bool, seed: int) -> None:
        self.shards, self.plan_dir, self.cfg, self.train, self.seed = shards, plan_dir, cfg, train, seed
        self._plans: dict[int, np.ndarray] = {}
        self._owner = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plans": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.getpid() != self._owner:  # in one of DALI's source workers: see worker_signals
            shield_worker()

    def plan(self, epoch_idx: int) -> np.ndarray:
        plan = self._plans.get(epoch_idx)
        if plan is None:
            self._plans = {epoch_idx: np.load(os.path.join(self.plan_dir, f"plan-{epoch_idx}.npy"), mmap_mode="r")}
            plan = self._plans[epoch_idx]
        return plan

    def __call__(self, info) -> tuple:
        plan = self.plan(info.epoch_idx)
        if info.iteration >= len(plan):
            raise StopIteration
        out = self.batch(np.asarray(plan[info.iteration]))
        return out if self.train else (out[0], out[4], out[5])  # evaluation uses no windows or flips

    def batch(self, rows: np.ndarray) -> tuple:
        """The source's outputs for one (3, B) sampler row block."""
        ids, positions, epochs = rows
        b = len(ids)
        jpegs: list[np.ndarray | None] = [None] * b
        window = np.zeros((b, 4), dtype=np.float32)  # top, left, h, w in the decoded image (HW order)
        flip = np.zeros(b, dtype=np.int32)
        labels = np.zeros(b, dtype=np.int64)
        valid = np.zeros(b, dtype=np.uint8)
        first_good = -1
        for j in range(b):
            sid = int(ids[j])
            if sid == PAD:
                continue
            data = self.shards.read_jpeg(sid)
            size = jpeg_size(data)
            if size is None:
                continue  # valid stays 0: the loader tells corrupt samples from padding by their id
            try:
                label = self.shards.read_label(sid)
            except ValueError:  # outside the classes: corrupt as well (the loader says which)
                continue
            width, height = size
            if self.train:
                top, left, h, w, f = train_params(
                    self.cfg, width, height, sample_rng(self.seed, int(epochs[j]), int(positions[j]))
                )
                window[j] = (top, left, h, w)
                flip[j] = f
            else:
                window[j] = (0, 0, height, width)
            jpegs[j] = np.frombuffer(data, dtype=np.uint8)
            labels[j] = label
            valid[j] = 1
            if first_good < 0:
                first_good = j
        for j in range(b):
            if jpegs[j] is None:  # masked filler: the batch keeps its shape
                if first_good >= 0:
                    jpegs[j], window[j], flip[j], labels[j] = (
                        jpegs[first_good], window[first_good], flip[first_good], labels[first_good]
                    )
                else:
                    jpegs[j] = _filler_jpeg()
                    window[j] = (0, 0, 16, 16)
        return jpegs, window[:, :2].copy(), window[:, 2:].copy(), flip, labels, valid

"""The cpu backend and the shared augmentation: resume of the real DataLoader, torchvision's crop law,
the synthetic loader."""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import pytest
import torch

from pipeline.data.augment import AugmentConfig, random_resized_crop_box, sample_rng, train_params
from pipeline.data.contract import PAD, Position, TrainSampler, ValSampler
from pipeline.data.cpu_backend import ShardBatches
from pipeline.data.shards import ShardSet
from pipeline.data.synthetic import SyntheticLoader
from pipeline.data.worker_signals import shield_worker
from pipeline.data.worker_start import worker_context

CIFAR = AugmentConfig(recipe="cifar", train_size=32, val_size=32, pad=4, flip=True)


def keys(loader) -> list[tuple[tuple[int, ...], str]]:
    """Per step: the labels and a digest of the pixels (so augmentation differences show too)."""
    out = []
    for images, labels, valid in loader:
        assert bool(valid.all())
        out.append((tuple(labels.tolist()), hashlib.sha1(images.contiguous().numpy().tobytes()).hexdigest()))
    return out


def cpu_loader(shards: ShardSet, sampler, workers: int, start_method: str = "forkserver") -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ShardBatches(shards, CIFAR, train=True, seed=11), sampler=sampler, batch_size=None, num_workers=workers,
        multiprocessing_context=worker_context(start_method) if workers else None, worker_init_fn=shield_worker,
    )


def test_cpu_loader_resumes_mid_epoch_with_the_same_samples_and_augmentation(digits_shards):
    """An interrupted epoch continued from ``Position`` yields exactly the uninterrupted sequence, also
    when the restarted job uses another number of workers, and whichever way the workers start."""
    shards = ShardSet(digits_shards, "train")
    batch = 48

    def sampler(start: Position = Position()) -> TrainSampler:
        s = TrainSampler(shards.shard_sizes, seed=5, world_size=1, rank=0, batch_size=batch, start=start)
        s.set_epoch(1)
        return s

    whole = keys(cpu_loader(shards, sampler(Position(epoch=1)), workers=0))
    assert len(whole) == 1434 // batch and len(set(whole)) == len(whole)
    for restart, (before, after) in zip(np.random.default_rng(2026).integers(1, len(whole) - 1, 2), [(2, 0), (0, 2)]):
        restart = int(restart)
        first = keys(cpu_loader(shards, sampler(Position(epoch=1)), workers=before))[:restart]
        resumed = sampler(Position(epoch=1, consumed=restart * batch, batches=restart))
        assert len(resumed) == len(whole), "the trainer's epoch length counts the batches done before"
        rest = keys(cpu_loader(shards, resumed, workers=after))
        assert first + rest == whole, f"restart at step {restart} ({before} -> {after} workers)"
    assert keys(cpu_loader(shards, sampler(Position(epoch=1)), workers=2, start_method="fork")) == whole


def test_train_params_follow_torchvision_random_resized_crop():
    """Over 2,000 draws per photo shape, area fraction and log aspect have torchvision's distribution."""
    from torchvision.transforms import v2

    cfg = AugmentConfig()
    torch.manual_seed(0)
    for width, height in ((500, 375), (375, 500), (96, 96), (1000, 200)):
        ours = np.array([random_resized_crop_box(width, height, cfg.scale, cfg.ratio, sample_rng(3, 0, i))
                         for i in range(2000)], dtype=np.float64)
        img = torch.zeros(3, height, width, dtype=torch.uint8)
        theirs = np.array([v2.RandomResizedCrop.get_params(img, list(cfg.scale), list(cfg.ratio))
                           for _ in range(2000)], dtype=np.float64)
        for boxes in (ours, theirs):
            top, left, h, w = boxes.T
            assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        area = [b[:, 2] * b[:, 3] / (width * height) for b in (ours, theirs)]
        aspect = [np.log(b[:, 3] / b[:, 2]) for b in (ours, theirs)]
        assert abs(area[0].mean() - area[1].mean()) < 0.025, (width, height, area[0].mean(), area[1].mean())
        assert abs(aspect[0].mean() - aspect[1].mean()) < 0.03
        assert abs(aspect[0].std() - aspect[1].std()) < 0.03
        assert abs(np.median(area[0]) - np.median(area[1])) < 0.04


def test_train_params_are_a_function_of_seed_epoch_position():
    cfg = AugmentConfig(recipe="cifar", pad=4)
    a = [train_params(cfg, 32, 32, sample_rng(1, 2, p)) for p in range(200)]
    assert a == [train_params(cfg, 32, 32, sample_rng(1, 2, p)) for p in range(200)]
    assert a != [train_params(cfg, 32, 32, sample_rng(1, 3, p)) for p in range(200)]
    assert a != [train_params(cfg, 32, 32, sample_rng(1 + 2**32, 2, p)) for p in range(200)], "the whole seed counts"
    tops = {t for t, _, _, _, _ in a}
    assert tops == set(range(-4, 5)), "pad 4: window offsets -4..4"
    flips = sum(f for *_, f in a)
    assert 60 < flips < 140
    assert not any(f for *_, f in (train_params(AugmentConfig(recipe="cifar", flip=False), 32, 32, sample_rng(1, 2, p))
                                    for p in range(50)))
    assert math.isclose(AugmentConfig().ratio[0], 3 / 4)


@pytest.mark.parametrize("pad_fill", ["black", "mean"])
def test_the_cifar_border_has_the_pad_fill_colour(pad_fill):
    """The cifar recipe's padded border: black, or the normalisation mean (0 after normalising, as the
    paper's zero pad of mean-subtracted inputs); the window's inside is the photo, shifted."""
    from pipeline.data.cpu_backend import augment_train
    from tests.fixtures_images import photos

    photo = torch.from_numpy(np.array(photos(1, size=(32, 32))[0])).permute(2, 0, 1).contiguous()
    cfg = AugmentConfig(recipe="cifar", train_size=32, val_size=32, pad=4, pad_fill=pad_fill,
                        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    colour = torch.tensor([0, 0, 0] if pad_fill == "black" else [125, 123, 114], dtype=torch.uint8).view(3, 1, 1)
    assert cfg.pad_rgb() == tuple(colour.flatten().tolist())
    checked = 0
    for p in range(300):
        top, left, _, _, flip = train_params(cfg, 32, 32, sample_rng(0, 0, p))
        if top >= 0 or left >= 0 or flip:
            continue
        out = augment_train(photo, cfg, sample_rng(0, 0, p))
        assert (out[:, :-top, :] == colour).all() and (out[:, :, :-left] == colour).all()
        assert torch.equal(out[:, -top:, -left:], photo[:, :32 + top, :32 + left])
        checked += 1
    assert checked > 5


def test_cpu_validation_masks_padding_and_keeps_labels(digits_shards):
    shards = ShardSet(digits_shards, "val")
    labels = shards.labels()
    sampler = ValSampler(len(shards), world_size=2, rank=1, batch_size=100)
    seen = 0
    for (images, lab, valid), rows in zip(cpu_loader(shards, sampler, workers=0), sampler):
        assert images.dtype == torch.uint8 and images.is_contiguous(memory_format=torch.channels_last)
        ids = rows[0]
        assert valid.tolist() == (ids != PAD).tolist()
        assert lab[valid].tolist() == labels[ids[ids != PAD]].tolist()
        seen += int(valid.sum())
    assert seen == len(shards) - math.ceil(len(shards) / 2)


def test_synthetic_loader_follows_the_sampler():
    sampler = ValSampler(10, world_size=1, rank=0, batch_size=4)
    loader = SyntheticLoader(sampler, size=16, num_classes=5, device="cpu")
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    images, labels, valid = batches[-1]
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert valid.tolist() == [True, True, False, False]
    assert labels.max() < 5


@pytest.mark.parametrize("recipe", ["imagenet", "nope"])
def test_augment_config_checks_the_recipe(recipe):
    if recipe == "nope":
        with pytest.raises(ValueError, match="data.augment.recipe"):
            AugmentConfig(recipe=recipe).check()
    else:
        AugmentConfig(recipe=recipe).check()
        assert AugmentConfig(recipe=recipe).train_size == 224


# ---- the cpu backend's decoder and resize against PIL ------------------------------------------------
def _pil_rgb(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_decode_rgb_gives_pils_pixels_and_refuses_what_pil_refuses():
    """libjpeg-turbo through torchvision for whole JPEGs, PIL for the rest: the same pixels as PIL for
    baseline, progressive, 4:4:4, low-quality, greyscale JPEGs and PNG; an error where PIL has one."""
    from pipeline.data.cpu_backend import decode_rgb
    from tests.fixtures_images import jpeg_bytes, photos, png_bytes

    img = photos(1, (123, 77), seed=4)[0]
    cases = [jpeg_bytes(img), jpeg_bytes(img, progressive=True), jpeg_bytes(img, subsampling=0),
             jpeg_bytes(img, quality=30), jpeg_bytes(img.convert("L")), png_bytes(img)]
    for data in cases:
        got = decode_rgb(data)
        assert got.dtype == torch.uint8 and tuple(got.shape) == (3, 77, 123)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), _pil_rgb(data))
    for broken in (b"", b"not an image", jpeg_bytes(img)[:200]):
        with pytest.raises(Exception):
            _pil_rgb(broken)
        with pytest.raises(Exception):
            decode_rgb(broken)


def test_cpu_random_resized_crop_equals_pil_resampling():
    """The uint8 tensor path of the cpu backend against torchvision's RandomResizedCrop on a PIL image
    (crop the box, then PIL's antialiased bilinear resize): at most 1 level apart per pixel."""
    import io

    from PIL import Image

    from pipeline.data.cpu_backend import augment_train, decode_rgb
    from tests.fixtures_images import jpeg_bytes, photos

    cfg = AugmentConfig(recipe="imagenet", train_size=64)
    for i, img in enumerate(photos(12, (160, 120), seed=8)):
        data = jpeg_bytes(img)
        ours = augment_train(decode_rgb(data), cfg, sample_rng(3, 0, i)).permute(1, 2, 0).numpy().astype(int)
        top, left, h, w, flip = train_params(cfg, 160, 120, sample_rng(3, 0, i))
        ref = Image.open(io.BytesIO(data)).convert("RGB").crop((left, top, left + w, top + h))
        ref = ref.resize((64, 64), Image.BILINEAR)
        ref = np.asarray(ref.transpose(Image.FLIP_LEFT_RIGHT) if flip else ref).astype(int)
        assert np.abs(ours - ref).max() <= 1, f"photo {i}: {np.abs(ours - ref).max()}"


def test_shards_read_with_webdatasets_own_reader(digits_shards):
    """The shards are plain WebDataset tars: webdataset's reader sees every sample, in id order, with the
    label ShardSet reads (``cls`` as text, ``lbl`` as little-endian int32) and the same JPEG bytes."""
    import webdataset as wds

    shards = ShardSet(digits_shards, "val")
    urls = [str(digits_shards / name) for name in shards.shard_names]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == len(shards)
    labels = shards.labels()
    for i, s in enumerate(samples):
        assert int(s["cls"]) == labels[i] == int(np.frombuffer(s["lbl"], dtype="<i4")[0])
        assert s["jpg"] == shards.read_jpeg(i)


def test_a_process_keeps_a_bounded_number_of_shards_open(tmp_path):
    """Every shard a process read stayed open: a persistent worker reads all shards in an epoch, and
    ImageNet in 1,000-sample shards (1,282) went past the usual limit of 1,024 open files. Digits in 40
    shards, 6 kept open: reads in the shuffled order (and from threads) return webdataset's bytes."""
    import threading

    import webdataset as wds

    from pipeline.demo_data import write_digits
    from tests.conftest import run_module

    write_digits(tmp_path / "images")
    out = tmp_path / "shards"
    run_module("data_prep", "imagefolder", str(tmp_path / "images" / "val"), str(out), "--split", "val",
               "--samples-per-shard", "9", "--workers", "1")
    shards = ShardSet(out, "val")
    assert len(shards.shard_names) >= 30
    urls = [str(out / name) for name in shards.shard_names]
    truth = [s["jpg"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    shards.max_open = 6

    def open_shards() -> int:
        fds = [os.path.join("/proc/self/fd", fd) for fd in os.listdir("/proc/self/fd")]
        return sum(os.path.realpath(fd).endswith(".tar") and os.path.realpath(fd).startswith(str(out))
                   for fd in fds if os.path.islink(fd))

    order = np.random.default_rng(0).permutation(len(shards))
    for i in order:
        assert shards.read_jpeg(int(i)) == truth[i]
    assert open_shards() == 6
    wrong = []

    def read(ids) -> None:
        wrong.extend(int(i) for i in ids if shards.read_jpeg(int(i)) != truth[i])

    threads = [threading.Thread(target=read, args=(order[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [] and open_shards() <= 6


@pytest.mark.parametrize("code, says", [(5, "the file system's error, not the data's"),
                                        (116, "replaced or removed after this run opened it")])
def test_a_shard_read_the_file_system_fails_names_the_shard(digits_shards, monkeypatch, code, says):
    """A network file system failing a read mid-epoch (an I/O error; NFS's ESTALE, ``code`` 116, for a shard
    replaced under a running job) ended the loader worker's traceback with ``[Errno 5] Input/output error``
    alone. It still raises that errno (not a corrupt sample: the shard may be whole), naming the shard."""
    shards = ShardSet(digits_shards, "train")
    data = ShardBatches(shards, CIFAR, True, 0, on_corrupt="skip")
    failing = str(digits_shards / shards.shard_name(0))

    def pread(fd: int, size: int, offset: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}") == failing:
            raise OSError(code, os.strerror(code))
        return real_pread(fd, size, offset)

    real_pread = os.pread
    monkeypatch.setattr(os, "pread", pread)
    with pytest.raises(OSError) as raised:
        data[np.array([[0], [0], [0]])]
    assert raised.value.errno == code and data.corrupt_seen == 0
    assert f"{os.strerror(code)} reading shard {failing!r}" in str(raised.value) and says in str(raised.value)

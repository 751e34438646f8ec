"""CPU loader throughput: our backends against plain webdataset + PIL + torchvision v2 in a DataLoader.

Real photos (crops of scikit-learn's sample images, 500x375 and 375x500 JPEGs) are sharded with the
project's data_prep, then every loader reads the same shards and makes 224x224 training crops
(random resized crop + flip). Backends are run in turns, ``--repeats`` times each, and the best epoch of
each is reported (other work on a shared machine only ever slows a run down).

    python bench/loader.py --images 2000 --workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.format import MANIFEST_NAME  # noqa: E402
from pipeline.data.augment import AugmentConfig  # noqa: E402
from pipeline.data.contract import TrainSampler  # noqa: E402
from pipeline.data.shards import ShardSet  # noqa: E402
from photos import photo_variant  # noqa: E402


def make_photos(folder: Path, n: int, classes: int = 8, seed: int = 0) -> None:
    """``n`` JPEGs of ImageNet's typical size (500x375, one in four portrait) cut from real photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == n:
        return
    sources = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = photo_variant(sources[i % len(sources)], i, rng, Image.Resampling.BICUBIC)
        out = folder / f"c{i % classes}" / f"{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, quality=int(rng.integers(80, 95)))


def make_shards(work: Path, n: int) -> Path:
    shards = work / "shards"
    if (shards / MANIFEST_NAME).is_file():
        return shards
    make_photos(work / "images", n)
    subprocess.run([sys.executable, "-m", "data_prep", "imagefolder", str(work / "images"), str(shards),
                    "--split", "train", "--samples-per-shard", str(max(1, n // 8)), "--workers", "2"],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return shards


# ---- the loaders ------------------------------------------------------------------------------------
def ours(backend: str, shards: ShardSet, batch: int, workers: int):
    cfg = AugmentConfig(recipe="imagenet", train_size=224)
    sampler = TrainSampler(shards.shard_sizes, seed=0, world_size=1, rank=0, batch_size=batch)
    if backend == "cpu":
        from pipeline.data.cpu_backend import ShardBatches

        return torch.utils.data.DataLoader(ShardBatches(shards, cfg, True, 0), sampler=sampler, batch_size=None,
                                           num_workers=workers, prefetch_factor=2, persistent_workers=False)
    if backend == "dali-cpu":
        from pipeline.data.dali_backend import DaliLoader

        return DaliLoader(shards, sampler, cfg, train=True, seed=0, num_threads=workers, cpu=True)
    from pipeline.data.synthetic import SyntheticLoader

    return SyntheticLoader(sampler, 224, shards.num_classes, device="cpu")


def baseline(root: Path, batch: int, workers: int):
    """What one writes without this project: webdataset + PIL decode + torchvision v2 transforms."""
    import webdataset as wds
    from torchvision.transforms import v2

    urls = sorted(str(p) for p in root.glob("train-*.tar"))
    aug = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(256).decode("pil")
          .to_tuple("jpg", "cls").map_tuple(aug, int))
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers, once joined)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_epoch(loader) -> tuple[float, float, int]:
    """Images per second after the first batch (start-up excluded), CPU milliseconds per image over the
    whole epoch (start-up included: robust to other load on the machine), and images counted."""
    c0 = cpu_seconds()
    it = iter(loader)
    first = next(it)
    n0 = first[0].shape[0]
    n, t0 = 0, time.perf_counter()
    for images, *_ in it:
        n += images.shape[0]
    dt = time.perf_counter() - t0
    del it, first
    gc.collect()
    time.sleep(0.2)  # let DataLoader workers be joined, so their CPU time is counted
    return n / dt, 1000 * (cpu_seconds() - c0) / (n + n0), n + n0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/loader-bench", help="where the photos and shards are kept")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="baseline,cpu,dali-cpu,synthetic")
    args = ap.parse_args(argv)
    root = make_shards(Path(args.work), args.images)
    shards = ShardSet(root, "train")
    names = args.backends.split(",")
    loaders = {name: (baseline(root, args.batch, args.workers) if name == "baseline"
                      else ours(name, shards, args.batch, args.workers)) for name in names}
    best: dict[str, float] = {}
    cost: dict[str, float] = {}
    for r in range(args.repeats):
        for name in names:
            rate, ms, n = time_epoch(loaders[name])
            best[name] = max(best.get(name, 0.0), rate)
            cost[name] = min(cost.get(name, float("inf")), ms)
            print(f"  run {r + 1} {name:>9}: {rate:8.0f} img/s  {ms:6.2f} CPU-ms/img ({n} images)", flush=True)
    load = os.getloadavg()[0]
    print(f"\n{args.images} JPEGs 500x375 -> 224 train crops, batch {args.batch}, {args.workers} workers/threads,"
          f" {os.cpu_count()} CPUs, best of {args.repeats}, load average {load:.1f}")
    print(f"| {'loader':<34} | {'img/s':>7} | {'x baseline':>10} | {'CPU-ms/img':>10} | {'x baseline':>10} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    label = {"baseline": "webdataset + PIL + v2 (DataLoader)", "cpu": "cpu (DataLoader workers)",
             "dali-cpu": "dali-cpu (DALI threads + torch)", "synthetic": "synthetic (no decoding)"}
    for name in names:
        ratio = f"{best[name] / best['baseline']:.2f}" if "baseline" in best else "-"
        cratio = f"{cost['baseline'] / cost[name]:.2f}" if "baseline" in cost and cost[name] > 0 else "-"
        print(f"| {label.get(name, name):<34} | {best[name]:7.0f} | {ratio:>10} | {cost[name]:10.2f} | {cratio:>10} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

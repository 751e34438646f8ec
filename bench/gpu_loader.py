"""GPU loader benchmark (one H100): DALI decode + augment alone, and a compiled ResNet-50 training step
fed by synthetic input against the same step fed by ``DaliLoader``, in one process.

1. Makes ``--images`` real JPEGs (500x375 / 375x500 cuts of scikit-learn's bundled photos; the GPU
   machine has no network) and shards them with the project's data_prep.
2. Decode + augment alone: ``DaliLoader`` (train recipe, ``--size`` 224 crops, float16 NHWC -> NCHW channels_last)
   over the shards for ``--decode-steps`` batches: images/s (target >= 25,000 with hw_decoder_load 0.75),
   for each of ``--decode-variants``: decoding the crop window (the default), the whole image, and the
   window with the source inline in the main process instead of DALI's worker processes; then the window
   variant for each ``--sweep`` pair of hw_decoder_load and source worker count.
3. ``pipeline.models.resnet50`` (channels_last, torch.compile, bf16 autocast, SGD with momentum):
   ``--steps`` timed steps fed by a fixed synthetic float16 batch, then fed by ``DaliLoader``, in turns
   (synthetic, dali, synthetic, dali); images/s and the ratio dali / synthetic (target >= 0.98).

Runs the two targets first (decode alone with the first of ``--decode-variants``; the fed training step),
then the other variants and the ``--sweep``, and saves ``$OUT/gpu_loader.json`` after each measurement, so a
run stopped at a time limit keeps what it measured.

Prints a table at the end and writes ``$OUT/gpu_loader.json`` when ``OUT`` is set. ``--dry-run`` runs every part
on the CPU with dali-cpu, a few tiny images, fp32 (CPU bf16 is ~10x slower here) and no compile, to check the script
without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.format import MANIFEST_NAME  # noqa: E402
from pipeline.data.augment import AugmentConfig  # noqa: E402
from pipeline.data.contract import TrainSampler  # noqa: E402
from pipeline.data.shards import ShardSet  # noqa: E402
from photos import photo_variant  # noqa: E402


# ---- data -------------------------------------------------------------------------------------------
def _sources() -> list[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images

        return list(load_sample_images().images)
    except ImportError:  # scikit-image bundles a few photos too
        from skimage import data

        return [data.astronaut(), data.coffee(), data.chelsea()]


def _write_range(job: tuple[str, int, int, int]) -> int:
    folder, lo, hi, classes = job
    from PIL import Image

    sources = _sources()
    for i in range(lo, hi):
        rng = np.random.default_rng([7, i])
        img = photo_variant(sources[i % len(sources)], i, rng, Image.Resampling.BILINEAR)
        out = Path(folder) / f"c{i % classes:03d}" / f"{i:07d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, quality=int(rng.integers(80, 95)))
    return hi - lo


def make_shards(work: Path, n: int, procs: int) -> Path:
    """``n`` photos in ``work/images`` (100 classes), sharded into ``work/shards`` (reused if there)."""
    shards = work / "shards"
    if (shards / MANIFEST_NAME).is_file():
        return shards
    t0 = time.perf_counter()
    chunk = max(1, -(-n // (procs * 4)))
    jobs = [(str(work / "images"), lo, min(n, lo + chunk), 100) for lo in range(0, n, chunk)]
    with Pool(procs) as pool:
        done = sum(pool.map(_write_range, jobs))
    t1 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "data_prep", "imagefolder", str(work / "images"), str(shards),
                    "--split", "train", "--samples-per-shard", "1000", "--workers", str(procs)],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"},
                   stdout=subprocess.DEVNULL)
    print(f"data: {done} JPEGs in {t1 - t0:.1f}s, sharded in {time.perf_counter() - t1:.1f}s", flush=True)
    return shards


# ---- measurements -----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless(loader):
    """Batches of ``loader``, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def pixel_problem(images: torch.Tensor) -> str | None:
    """What is wrong with a batch of real photos, or None: the GPU's fp16 normalised around 0 with a spread near
    1, dali-cpu's uint8 neither flat nor at an end. A rate measured on such pixels is no figure (source workers
    once made every image 0 on the CPU and garbage on the GPU, at full speed)."""
    x = images.float()
    if not bool(torch.isfinite(x).all()):
        return "not finite"
    mean, std = x.mean().item(), x.std().item()
    if images.dtype == torch.uint8:
        return None if 20 < mean < 235 and std > 5 else f"uint8 mean {mean:.1f}, std {std:.1f}"
    return None if abs(mean) < 1.5 and 0.2 < std < 3 else f"normalised mean {mean:.2f}, std {std:.2f}"


def check_pixels(name: str, images: torch.Tensor, problems: list[str]) -> None:
    """Add ``name`` to ``problems``, and say so, when ``pixel_problem`` finds its batch wrong."""
    if problem := pixel_problem(images):
        problems.append(f"{name}: {problem}")
        print(f"PIXELS WRONG in {name}: {problem}: its img/s is no figure", flush=True)


def decode_rate(loader, steps: int, warmup: int, device: torch.device, problems: list[str] | None = None,
                name: str = "loader") -> float:
    """Images per second of ``loader`` alone, after ``check_pixels`` of a batch (into ``problems`` when given:
    the probe scripts only print)."""
    it = endless(loader)
    for _ in range(warmup):
        next(it)
    check_pixels(name, next(it)[0], problems if problems is not None else [])
    sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        images, _, _ = next(it)
        n += images.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device):
    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:  # dali-cpu (--dry-run) yields uint8, as the module normalises them
            images = (images.float() - 127.5) / 64.0
        # bf16 autocast on the GPU only: on a CPU without bf16 units it is ~10x slower (the --dry-run check)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def train_rate(step, batches, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        images, labels, _ = next(batches)
        step(images, labels)
    sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        images, labels, _ = next(batches)
        step(images, labels)
        n += images.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def synthetic_batches(batch: int, device: torch.device, dtype: torch.dtype, size: int = 224):
    """A few fixed batches shaped and typed as DaliLoader's (normalised NHWC memory), cycled for free."""
    g = torch.Generator(device="cpu").manual_seed(0)
    pool = [(torch.randn(batch, size, size, 3, generator=g).to(device, dtype).permute(0, 3, 1, 2),
             torch.randint(0, 1000, (batch,), generator=g).to(device),
             torch.ones(batch, dtype=torch.bool, device=device)) for _ in range(4)]
    i = 0
    while True:
        yield pool[i % len(pool)]
        i += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/gpu-loader-bench")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224, help="train crop size (the model's input)")
    ap.add_argument("--threads", type=int, default=max(2, (os.cpu_count() or 4) // 2), help="DALI CPU threads")
    ap.add_argument("--py-workers", type=int, default=max(1, (os.cpu_count() or 4) // 3),
                    help="processes running the external source")
    ap.add_argument("--hw-decoder-load", type=float, default=0.75, help="for the decode-alone measurement")
    ap.add_argument("--train-hw-loads", default="0.75,1.0", help="hw_decoder_load values fed to the training step")
    ap.add_argument("--decode-variants", default="window,whole,window-inline",
                    help="decode-alone runs: window (decode the crop window, the default), whole (decode all, "
                         "cut in the resize), window-inline (window, source in the main process)")
    ap.add_argument("--sweep", default="0.6x8,0.9x8,1.0x8,0.75x12",
                    help="more window decode-alone runs, as HWLOADxWORKERS (hw_decoder_load, source workers); "
                         "'' for none")
    ap.add_argument("--decode-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=60, help="timed training steps per measurement")
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2, help="synthetic/dali alternations")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU, dali-cpu, tiny sizes: checks the script")
    ap.add_argument("--shards-only", action="store_true",
                    help="make the --work shards and stop (needs no DALI nor GPU: a device call before DALI is there)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.images, args.batch, args.size, args.no_compile = "cpu", 48, 8, 64, True
        args.decode_steps, args.steps, args.warmup, args.rounds = 3, 2, 1, 1
        args.threads, args.py_workers, args.train_hw_loads, args.sweep = 2, 1, "0.75", "0.5x1"
        args.work = args.work + "-dry"
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if not cpu and not args.shards_only:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # the shards first: make_shards forks a pool, which must not inherit an initialised CUDA
    shards = ShardSet(make_shards(Path(args.work), args.images, os.cpu_count() or 2), "train")
    if args.shards_only:
        print(f"shards in {args.work}/shards: {len(shards)} samples", flush=True)
        return 0

    import nvidia.dali

    from pipeline.data.dali_backend import DaliLoader
    from pipeline.models import build

    info = {"device": torch.cuda.get_device_name(device) if not cpu else "cpu", "torch": torch.__version__,
            "dali": nvidia.dali.__version__, "cpus": os.cpu_count(), "batch": args.batch, "size": args.size,
            "threads": args.threads, "py_workers": args.py_workers,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(info), flush=True)
    cfg = AugmentConfig(recipe="imagenet", train_size=args.size)
    results: dict[str, float] = {}
    problems: list[str] = []  # batches whose pixels look wrong (pixel_problem)
    out = os.environ.get("OUT")

    def save() -> None:
        """After every measurement: a run stopped at its time limit keeps what it measured."""
        decode = [v for k, v in results.items() if k.startswith(("decode_augment_", "sweep_")) and k.endswith("_img_s")
                  and k != "decode_augment_img_s"]
        if decode:
            results["decode_augment_img_s"] = max(decode)
        if out:
            Path(out, "gpu_loader.json").write_text(json.dumps({**info, **results, "pixel_problems": problems},
                                                               indent=1))

    def loader(hw: float, roi_decode: bool = True, py_workers: int | None = None) -> DaliLoader:
        sampler = TrainSampler(shards.shard_sizes, seed=0, world_size=1, rank=0, batch_size=args.batch)
        workers = args.py_workers if py_workers is None else py_workers
        return DaliLoader(shards, sampler, cfg, train=True, seed=0, num_threads=args.threads, cpu=cpu,
                          hw_decoder_load=hw, py_workers=workers, prefetch=3, roi_decode=roi_decode,
                          resize="dali")

    variants = {"window": (True, None), "whole": (False, None), "window-inline": (True, 0)}
    names = [n for n in args.decode_variants.split(",") if n]
    for name in names:
        if name not in variants:
            ap.error(f"--decode-variants: {name!r} is not one of {', '.join(variants)}")
    sweep = [(float(hw), int(w)) for hw, w in (item.split("x") for item in args.sweep.split(",") if item)]

    def decode_alone(name: str) -> None:
        roi, workers = variants[name]
        t0 = time.perf_counter()
        dec = loader(args.hw_decoder_load, roi, workers)
        rate = results[f"decode_augment_{name}_img_s"] = decode_rate(dec, args.decode_steps, args.warmup, device,
                                                                     problems, name)
        save()
        print(f"DALI decode + augment alone, {name} (hw_decoder_load {args.hw_decoder_load}): "
              f"{rate:,.0f} img/s ({time.perf_counter() - t0:.0f}s)", flush=True)

    # The two targets first (decode alone, the default variant; the fed training step against synthetic),
    # then the variants and the sweep, which only explain them: a time limit cuts the explanations.
    if names:
        decode_alone(names[0])
    model = build("resnet50", num_classes=1000).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    step = make_step(model if args.no_compile else torch.compile(model), opt, device)
    dtype = torch.float32 if cpu else torch.float16
    syn = synthetic_batches(args.batch, device, dtype, args.size)
    t0 = time.perf_counter()
    train_rate(step, syn, 0, args.warmup if args.no_compile else max(3, args.warmup), device)  # compiles
    print(f"compiled and warmed up in {time.perf_counter() - t0:.0f}s", flush=True)
    feeds = {f"dali_hw{hw}": endless(loader(float(hw))) for hw in args.train_hw_loads.split(",")}
    for name, it in feeds.items():  # start each loader's workers before timing
        train_rate(step, it, 0, args.warmup, device)
        check_pixels(name, next(it)[0], problems)
    for r in range(args.rounds):
        for name, it in {"synthetic": syn, **feeds}.items():
            rate = train_rate(step, it, args.steps, 3, device)
            results[f"train_{name}_img_s"] = max(results.get(f"train_{name}_img_s", 0.0), rate)
            if name != "synthetic":
                results[f"ratio_{name}"] = results[f"train_{name}_img_s"] / results["train_synthetic_img_s"]
            save()
            print(f"  round {r + 1} resnet50 fed by {name:>13}: {rate:8,.0f} img/s", flush=True)
    del feeds, it, model, opt, step  # `it`: the loop variable held the last loader (its pipeline, workers, /dev/shm)
    for name in names[1:]:
        decode_alone(name)
    for hw, workers in sweep:
        dec = loader(hw, True, workers)
        rate = results[f"sweep_hw{hw}_w{workers}_img_s"] = decode_rate(dec, args.decode_steps, args.warmup, device,
                                                                       problems, f"sweep hw{hw} w{workers}")
        save()
        print(f"DALI decode + augment alone, window, hw_decoder_load {hw}, {workers} source workers: "
              f"{rate:,.0f} img/s", flush=True)
        del dec

    base = results["train_synthetic_img_s"]
    print(f"\n{info['device']}, batch {args.batch}, {args.threads} DALI threads, {args.py_workers} source workers,"
          f" best of {args.rounds}")
    print("| measurement | img/s | ratio |\n|---|---|---|")
    for name in names:
        rate = results[f"decode_augment_{name}_img_s"]
        print(f"| DALI decode + augment alone, {name} (hw_decoder_load {args.hw_decoder_load}) | {rate:,.0f} | "
              f"target 25,000: {rate / 25000:.2f} |")
    for hw, workers in sweep:
        rate = results[f"sweep_hw{hw}_w{workers}_img_s"]
        print(f"| DALI decode + augment alone, window (hw_decoder_load {hw}, {workers} source workers) | "
              f"{rate:,.0f} | target 25,000: {rate / 25000:.2f} |")
    how = ("compiled, " if not args.no_compile else "") + ("bf16" if not cpu else "fp32")
    print(f"| resnet50 {how}, channels_last, synthetic input | {base:,.0f} | 1.00 |")
    for hw in args.train_hw_loads.split(","):
        rate = results[f"train_dali_hw{hw}_img_s"]
        print(f"| same, fed by DaliLoader (hw_decoder_load {hw}) | {rate:,.0f} | {rate / base:.3f} |")
    if problems:
        print(f"\nPIXELS WRONG (these rows are no figures): {'; '.join(problems)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

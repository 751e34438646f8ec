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

Order on the device (one scarce run): the data, the first decode variant, the training comparison, then
the other decode variants and the sweep. Each measurement is guarded: a failure is noted in the table
and the script goes on (torch.compile failing falls back to the eager model); after ``--budget`` seconds
the optional ones are skipped, and SIGTERM (run_gpu.sh's timeout) stops it with the table printed.

Prints a table and writes ``$OUT/gpu_loader.json`` (after every measurement) when ``OUT`` is set; exits 1
when a measurement failed. ``--dry-run`` runs every part on the CPU with dali-cpu, a few tiny images and
no compile, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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
    if (shards / "manifest.json").is_file():
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


def decode_rate(loader, steps: int, warmup: int, device: torch.device) -> float:
    it = endless(loader)
    for _ in range(warmup):
        next(it)
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
        with torch.autocast(device.type, dtype=torch.bfloat16):
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


class Stop(BaseException):
    """SIGTERM (run_gpu.sh's ``timeout``) or Ctrl-C: stop measuring, print and save what was measured."""


def _stop(signum, frame) -> None:
    raise Stop(f"signal {signum}")


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


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
    ap.add_argument("--budget", type=float, default=280.0,
                    help="seconds from the start after which the optional measurements (decode variants after the "
                         "first, the sweep, the second training feed, training rounds after the first) are skipped, "
                         "so that the table is printed before run_gpu.sh's timeout; 0: no limit")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU, dali-cpu, tiny sizes: checks the script")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.images, args.batch, args.size, args.no_compile = "cpu", 48, 8, 96, True
        args.decode_steps, args.steps, args.warmup, args.rounds = 3, 2, 1, 1
        args.threads, args.py_workers, args.train_hw_loads, args.sweep = 2, 1, "0.75", "0.5x1"
        args.work = args.work + "-dry"
    start = time.perf_counter()
    deadline = start + args.budget if args.budget > 0 else float("inf")
    signal.signal(signal.SIGTERM, _stop)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    variant_names = [v for v in args.decode_variants.split(",") if v]
    sweep = [(float(hw), int(w)) for hw, w in (item.split("x") for item in args.sweep.split(",") if item)]
    train_hw = [float(hw) for hw in args.train_hw_loads.split(",") if hw]
    unknown = sorted(set(variant_names) - {"window", "whole", "window-inline"})
    if unknown:
        ap.error(f"--decode-variants: unknown {', '.join(unknown)} (window, whole, window-inline)")
    results: dict[str, float] = {}
    notes: dict[str, str] = {}  # measurement key -> why it has no number (failed, skipped, not reached)
    info: dict = {"device": "cpu" if cpu else "cuda", "torch": torch.__version__, "dali": None,
                  "cpus": os.cpu_count(), "batch": args.batch, "size": args.size, "threads": args.threads,
                  "py_workers": args.py_workers, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = os.environ.get("OUT")

    def save() -> None:  # after every measurement: a kill past the timeout still leaves the numbers
        if out:
            Path(out, "gpu_loader.json").write_text(json.dumps({**info, **results, "notes": notes}, indent=1))

    def attempt(key: str, label: str, fn, optional: bool = False):
        """``fn()`` guarded: a failure is noted (and printed) and the script goes on to the next measurement."""
        if optional and time.perf_counter() > deadline:
            notes[key] = f"skipped: past the {args.budget:.0f}s budget"
            print(f"{label}: {notes[key]}", flush=True)
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failed measurement must not cost the others
            notes[key] = f"failed: {_first_line(e)}"
            print(f"{label}: FAILED", flush=True)
            traceback.print_exc(limit=6)
            return None
        finally:
            save()

    stopped = None
    feeds: dict = {}
    try:
        try:
            import nvidia.dali

            info["dali"] = nvidia.dali.__version__
            from pipeline.data.dali_backend import DaliLoader
        except Exception as e:  # noqa: BLE001 - the synthetic baseline can still run
            notes["dali"] = f"failed: {_first_line(e)}"
            traceback.print_exc(limit=4)
            DaliLoader = None
        # the JPEGs first: its worker processes fork before this process initialises CUDA
        shard_dir = attempt("data", "data", lambda: make_shards(Path(args.work), args.images, os.cpu_count() or 2))
        shards = ShardSet(shard_dir, "train") if shard_dir is not None else None
        if not cpu:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            try:
                info["device"] = torch.cuda.get_device_name(device)
            except Exception as e:  # noqa: BLE001 - every GPU measurement below will say so too
                notes["cuda"] = f"failed: {_first_line(e)}"
        print(json.dumps(info), flush=True)
        cfg = AugmentConfig(recipe="imagenet", train_size=args.size)

        def loader(hw: float, roi_decode: bool = True, py_workers: int | None = None):
            if DaliLoader is None or shards is None:
                raise RuntimeError(f"no DALI loader: {notes.get('dali') or notes.get('data')}")
            sampler = TrainSampler(shards.shard_sizes, seed=0, world_size=1, rank=0, batch_size=args.batch)
            workers = args.py_workers if py_workers is None else py_workers
            return DaliLoader(shards, sampler, cfg, train=True, seed=0, num_threads=args.threads, cpu=cpu,
                              hw_decoder_load=hw, py_workers=workers, prefetch=3, roi_decode=roi_decode,
                              resize="dali")

        variants = {"window": (True, None), "whole": (False, None), "window-inline": (True, 0)}

        def decode(name: str) -> float:
            roi, workers = variants[name]
            t0 = time.perf_counter()
            dec = loader(args.hw_decoder_load, roi, workers)
            try:
                rate = decode_rate(dec, args.decode_steps, args.warmup, device)
            finally:
                del dec
            print(f"DALI decode + augment alone, {name} (hw_decoder_load {args.hw_decoder_load}): "
                  f"{rate:,.0f} img/s ({time.perf_counter() - t0:.0f}s)", flush=True)
            return rate

        def sweep_one(hw: float, workers: int) -> float:
            dec = loader(hw, True, workers)
            try:
                rate = decode_rate(dec, args.decode_steps, args.warmup, device)
            finally:
                del dec
            print(f"DALI decode + augment alone, window, hw_decoder_load {hw}, {workers} source workers: "
                  f"{rate:,.0f} img/s", flush=True)
            return rate

        def decode_variant(i: int, name: str) -> None:
            rate = attempt(f"decode_augment_{name}_img_s", f"DALI decode + augment alone, {name}",
                           lambda: decode(name), optional=i > 0)
            if rate is not None:
                results[f"decode_augment_{name}_img_s"] = rate

        # 1. the first decode variant (the default graph), 2. training synthetic vs DALI, 3. the rest
        if variant_names:
            decode_variant(0, variant_names[0])

        def training() -> None:
            """The compiled step fed by synthetic batches and by each DALI feed, in turns (its locals, the
            model and the feeds' loaders, go when it returns: before the decode runs that follow)."""
            from pipeline.models import build

            def build_step(compiled: bool):
                torch._dynamo.reset()
                model = build("resnet50", num_classes=1000).to(device).to(memory_format=torch.channels_last)
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
                step = make_step(torch.compile(model) if compiled else model, opt, device)
                dtype = torch.float32 if cpu else torch.float16
                syn = synthetic_batches(args.batch, device, dtype, args.size)
                t0 = time.perf_counter()
                train_rate(step, syn, 0, max(3, args.warmup), device)  # compiles
                print(f"compiled and warmed up in {time.perf_counter() - t0:.0f}s", flush=True)
                return step, syn

            info["compiled"] = not args.no_compile
            made = attempt("train_synthetic_img_s", "resnet50 compile + warm-up", lambda: build_step(info["compiled"]))
            if made is None and info["compiled"]:  # an eager ratio is better than none
                notes["compile"] = notes.pop("train_synthetic_img_s")
                info["compiled"] = False
                print("resnet50: torch.compile failed; measuring the eager model instead", flush=True)
                made = attempt("train_synthetic_img_s", "resnet50 eager warm-up", lambda: build_step(False))
            if made is None:
                return
            step, syn = made

            def start_feed(hw: float):
                it = endless(loader(hw))
                train_rate(step, it, 0, args.warmup, device)  # starts the loader's workers before timing
                return it

            for i, hw in enumerate(train_hw):
                it = attempt(f"train_dali_hw{hw}_img_s", f"resnet50 fed by dali_hw{hw} (start)",
                             lambda hw=hw: start_feed(hw), optional=i > 0)
                if it is not None:
                    feeds[f"dali_hw{hw}"] = it

            def one_round(it, name: str, r: int) -> float:
                rate = train_rate(step, it, args.steps, 3, device)
                print(f"  round {r + 1} resnet50 fed by {name:>13}: {rate:8,.0f} img/s", flush=True)
                return rate

            for r in range(args.rounds):
                for name, it in {"synthetic": syn, **feeds}.items():
                    key = f"train_{name}_img_s"
                    if notes.get(key, "").startswith("failed"):
                        continue  # that feed broke in an earlier round
                    rate = attempt(key, f"  round {r + 1} resnet50 fed by {name}",
                                   lambda it=it, name=name, r=r: one_round(it, name, r), optional=r > 0)
                    if rate is not None:
                        results[key] = max(results.get(key, 0.0), rate)
                        save()
            feeds.clear()

        training()
        gc.collect()
        if not cpu:
            torch.cuda.empty_cache()

        for i, name in enumerate(variant_names[1:], start=1):
            decode_variant(i, name)
        for hw, workers in sweep:
            key = f"sweep_hw{hw}_w{workers}_img_s"
            rate = attempt(key, f"DALI decode + augment alone, window, hw_decoder_load {hw}, {workers} source workers",
                           lambda hw=hw, workers=workers: sweep_one(hw, workers), optional=True)
            if rate is not None:
                results[key] = rate
    except Stop as e:
        stopped = str(e)
        print(f"\ngpu_loader: stopped by {stopped}; the table holds what was measured", flush=True)
    finally:
        feeds.clear()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    for key in [k for k, note in notes.items() if k in results and note.startswith("skipped")]:
        del notes[key]  # a later round skipped: the earlier one's number stands
    decoded = [v for k, v in results.items() if k.startswith(("decode_augment_", "sweep_"))]
    if decoded:
        results["decode_augment_img_s"] = max(decoded)
    base = results.get("train_synthetic_img_s")

    def cell(key: str) -> str:
        return notes.get(key, "not reached" if stopped else "not measured")

    print(f"\n{info['device']}, batch {args.batch}, {args.threads} DALI threads, {args.py_workers} source workers,"
          f" best of {args.rounds}")
    print("| measurement | img/s | ratio |\n|---|---|---|")
    for name in variant_names:
        key = f"decode_augment_{name}_img_s"
        label = f"DALI decode + augment alone, {name} (hw_decoder_load {args.hw_decoder_load})"
        rate = results.get(key)
        print(f"| {label} | {rate:,.0f} | target 25,000: {rate / 25000:.2f} |" if rate is not None
              else f"| {label} | {cell(key)} | |")
    for hw, workers in sweep:
        key = f"sweep_hw{hw}_w{workers}_img_s"
        label = f"DALI decode + augment alone, window (hw_decoder_load {hw}, {workers} source workers)"
        rate = results.get(key)
        print(f"| {label} | {rate:,.0f} | target 25,000: {rate / 25000:.2f} |" if rate is not None
              else f"| {label} | {cell(key)} | |")
    label = f"resnet50 {'compiled' if info.get('compiled', True) else 'EAGER'}, bf16, channels_last, synthetic input"
    print(f"| {label} | {base:,.0f} | 1.00 |" if base else f"| {label} | {cell('train_synthetic_img_s')} | |")
    for hw in train_hw:
        name = f"dali_hw{hw}"
        rate = results.get(f"train_{name}_img_s")
        label = f"same, fed by DaliLoader (hw_decoder_load {hw})"
        if rate is not None and base:
            results[f"ratio_{name}"] = rate / base
            print(f"| {label} | {rate:,.0f} | {rate / base:.3f} |")
        else:
            print(f"| {label} | {rate if rate is not None else cell(f'train_{name}_img_s')} | |")
    for key, note in notes.items():
        if key in ("dali", "data", "cuda", "compile"):
            print(f"| {key} | {note} | |")
    if stopped:
        notes["stopped"] = stopped
    save()
    failed = stopped or any(note.startswith("failed") for note in notes.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

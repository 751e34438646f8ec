"""Benchmark: the non-GPU parts at ImageNet and cluster scale, per rank (not a test).

Builds, without images, what a rank of a real run touches: a manifest, per-shard DALI indexes and sparse
tars (the sizes the manifest says, no data) for ``--samples`` train samples in ``--shards`` shards and
``--val`` validation samples; then measures, each in the same process unless said:

* contract: one rank's train order of an epoch, its batches, a resume mid-epoch on another world size (the
  rest re-split), its validation batches, at each ``--worlds``; the sampler's time per step;
* start-up: ``ShardSet`` of the train and val splits (what every rank does), in a fresh process each for
  peak RSS and bytes read: from the split's columns file (``data_prep.columns_file``, as finalize writes it),
  from every index (a manifest without one), and the baseline reading each index with ``read_index`` (a
  dict per sample), as the loaders did before ``data_prep.index_arrays``;
* checkpoint: the loader position ``ShardDataModule.state_dict`` puts in every checkpoint (pickled bytes),
  its save and load times;
* cpu loader: ``ShardBatches`` per batch with decoding and augmentation stubbed (reads, labels, per-sample
  random state, batch assembly): the CPU backend's overhead per step outside decoding;
* ``python -m launch status`` over ``--runs`` run directories (a ResNet-50 checkpoint with momentum each,
  hard links of one file) and ``tools/cifar10_table.py`` over ``--table-runs`` CIFAR runs, as subprocesses.

    python bench/scale.py [--samples 1281167] [--shards 1500] [--worlds 8 64 512 1024] [--runs 200]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []  # (part, measurement, value, peak memory)


def _hwm_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def row(part: str, what: str, value: str, memory: str = "") -> None:
    ROWS.append((part, what, value, memory))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _split_sizes(n: int, k: int) -> list[int]:
    return [n // k + (1 if s < n % k else 0) for s in range(k)]


def make_dataset(root: Path, samples: int, shards: int, val: int, val_shards: int, classes: int = 1000) -> None:
    """manifest.json, indexes as data_prep writes them, and sparse tars of the manifest's sizes."""
    from data_prep.format import INDEX_VERSION, MANIFEST_VERSION, index_name, shard_name

    root.mkdir(parents=True, exist_ok=True)
    manifest = {"version": MANIFEST_VERSION, "source": "synthetic", "options": {},
                "classes": [f"n{i:08d}" for i in range(classes)], "class_names": [f"c{i}" for i in range(classes)],
                "splits": {}}
    for split, n, k in (("train", samples, shards), ("val", val, val_shards)):
        entries = []
        for s, count in enumerate(_split_sizes(n, k)):
            lines, off = [f"{INDEX_VERSION} {count}\n"], 0
            for i in range(count):
                key, size = f"{split}_{s:06d}_{i:06d}", 100_000 + (i * 7919) % 60_000
                jpg = off + 512
                off = jpg + size + (-size) % 512
                cls = off + 512
                lbl = cls + 1024
                off = lbl + 512
                lines.append(f"jpg {jpg} {size} {key}.jpg cls {cls} 3 {key}.cls lbl {lbl} 4 {key}.lbl\n")
            off += 1024
            (root / index_name(split, s)).write_text("".join(lines))
            with open(root / shard_name(split, s), "wb") as f:
                f.truncate(off)
            entries.append({"name": shard_name(split, s), "index": index_name(split, s), "samples": count,
                            "bytes": off, "sha256": "0" * 64})
        manifest["splits"][split] = {"shards": entries, "samples": n, "rejected": 0, "options": {}}
        manifest["splits"][split]["columns"] = _write_columns(root, split, entries)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _write_columns(root: Path, split: str, entries: list[dict]) -> dict:
    """The split's columns file, as ``data_prep finalize`` writes it; its manifest field."""
    from data_prep.columns_file import columns_bytes, columns_entry, columns_name, columns_of_indexes

    data = columns_bytes(columns_of_indexes(root, entries))
    (root / columns_name(split)).write_bytes(data)
    return columns_entry(columns_name(split), data)


# ---- contract ------------------------------------------------------------------------------------------
def bench_contract(samples: int, shards: int, val: int, worlds: list[int], batch: int) -> None:
    from pipeline.data.contract import TrainSampler, steps_in_epoch, train_batches, train_order, val_batches

    sizes = _split_sizes(samples, shards)
    for world in worlds:
        g = world * batch
        if steps_in_epoch(samples, world, batch) < 2:
            row("contract", f"world {world}: fewer than 2 global batches of {batch}, skipped", "-")
            continue
        t0 = time.perf_counter()
        order = train_order(sizes, 0, 3)
        t_order = time.perf_counter() - t0
        tracemalloc.start()
        train_order(sizes, 0, 3)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        t0 = time.perf_counter()
        mine = train_batches(order, world, world - 1, batch)
        t_batches = time.perf_counter() - t0
        consumed = steps_in_epoch(samples, world, batch) // 2 * g  # half way, then on half the ranks (or 8x)
        other = world // 2 if world >= 16 else world * 8
        t0 = time.perf_counter()
        rest = train_batches(order, other, other - 1, batch, consumed)
        t_resume = time.perf_counter() - t0
        t0 = time.perf_counter()
        vb = val_batches(val, world, world - 1, batch)
        t_val = time.perf_counter() - t0
        it = iter(TrainSampler(sizes, 0, world, world - 1, batch))
        t0 = time.perf_counter()
        next(it)  # the epoch's order, then its first batch
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        steps = sum(1 for _ in it)
        t_step = (time.perf_counter() - t0) / max(steps, 1)
        row("contract", f"world {world}: train order of the epoch ({len(order):,} ids; every rank)", _ms(t_order),
            f"{peak / 2**20:.0f} MB traced")
        row("contract", f"world {world}: this rank's {len(mine):,} batches", _ms(t_batches))
        row("contract", f"world {world} -> {other} resume at {consumed:,}: rank's {len(rest):,} batches of the rest",
            _ms(t_resume))
        row("contract", f"world {world}: validation batches ({vb.shape[0]} x {batch})", _ms(t_val))
        row("contract", f"world {world}: TrainSampler, first batch of the epoch (its order)", _ms(t_first))
        row("contract", f"world {world}: TrainSampler, each of the next {steps:,} batches", f"{t_step * 1e6:,.1f} us")


# ---- start-up --------------------------------------------------------------------------------------------
def before_arrays(root: str, split: str) -> tuple[np.ndarray, ...]:
    """The index part of ``ShardSet.__init__`` before ``data_prep.index_arrays`` (1e1b17d), as it was: every
    index through ``read_index`` (a dict of tuples per sample), four Python lists over the whole split."""
    from data_prep.format import index_of_entry, load_manifest, read_index

    shards = load_manifest(root)["splits"][split]["shards"]
    shard_of, offsets, sizes, lbl_offsets = [], [], [], []
    for i, s in enumerate(shards):
        entries = read_index(Path(root) / index_of_entry(s))
        if len(entries) != int(s["samples"]):
            raise SystemExit("count")
        for e in entries:
            if "jpg" not in e or "lbl" not in e:
                raise SystemExit("members")
            shard_of.append(i)
            offsets.append(e["jpg"][0])
            sizes.append(e["jpg"][1])
            lbl_offsets.append(e["lbl"][0])
    return (np.asarray(shard_of, dtype=np.int32), np.asarray(offsets, dtype=np.int64),
            np.asarray(sizes, dtype=np.int64), np.asarray(lbl_offsets, dtype=np.int64))


def _bytes_read() -> int:
    """Bytes this process read through read(2) and pread(2) so far (/proc/self/io's rchar), or 0 elsewhere."""
    try:
        return next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return 0


def child_shardset(root: str, split: str, way: str) -> dict:
    import hashlib

    import pipeline.data.shards as shards_module
    from pipeline.data.shards import ShardSet

    if way == "indexes":  # as for a manifest that lists no columns file
        shards_module.read_columns = lambda root, entry: (None, "bench: the indexes")
    read0 = _bytes_read()
    t0 = time.perf_counter()
    if way == "baseline":
        arrays = before_arrays(root, split)
        s = None
    else:
        s = ShardSet(root, split)
        arrays = (s.shard_of, s.offsets, s.sizes, s.label_offsets)
    took = time.perf_counter() - t0
    read = _bytes_read() - read0
    peak = _hwm_mb()
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(a.dtype.str.encode())
        digest.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return {"s": took, "maxrss_mb": peak, "samples": len(arrays[1]), "digest": digest.hexdigest(), "read_mb": read / 2**20,
            "arrays_mb": sum(a.nbytes for a in arrays) / 2**20,
            "pickled_mb": len(pickle.dumps(s)) / 2**20 if s is not None else 0.0}


def _child(*args: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if res.returncode != 0:
        sys.exit(f"child {args} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_startup(root: Path, shards: int) -> None:
    base = _child("imports")  # interpreter + imports alone
    ways = {"baseline": "read_index, a dict per sample (before 1e1b17d; index part only)",
            "indexes": "every index, index_arrays (a manifest without a columns file)",
            "columns": "the split's columns file (now)"}
    for split in ("train", "val"):
        runs = [{way: _child("shardset", str(root), split, way) for way in ways} for _ in range(2)]
        got = {way: min((r[way] for r in runs), key=lambda r: r["s"]) for way in ways}  # best of 2
        same = ("same arrays" if len({r["digest"] for r in got.values()}) == 1 else "ARRAYS DIFFER")
        for way, label in ways.items():
            r = got[way]
            row("start-up", f"ShardSet {split}, {r['samples']:,} samples, {label}", _ms(r["s"]),
                f"{r['maxrss_mb']:.0f} MB peak RSS ({r['maxrss_mb'] - base['maxrss_mb']:.0f} over imports), "
                f"{r['read_mb']:.0f} MB read")
        row("start-up", f"ShardSet {split}: kept arrays / pickled to each forkserver worker ({same})",
            f"{got['columns']['arrays_mb']:.1f} MB / {got['columns']['pickled_mb']:.1f} MB")
    from data_prep.format import load_manifest

    t0 = time.perf_counter()
    load_manifest(root)
    row("start-up", f"load_manifest (checked), {shards:,} + val shards, "
        f"{(root / 'manifest.json').stat().st_size / 1024:,.0f} KiB", _ms(time.perf_counter() - t0))


def child_imports() -> dict:
    import pipeline.data.shards  # noqa: F401

    return {"maxrss_mb": _hwm_mb()}


# ---- checkpoint position ---------------------------------------------------------------------------------
def bench_checkpoint(root: Path, samples: int, world: int, batch: int) -> None:
    from pipeline.datamodule import ShardDataModule

    dm = ShardDataModule(root=str(root), backend="cpu", batch_size=batch, num_workers=0)
    steps = samples // (world * batch)
    progress = SimpleNamespace(current=SimpleNamespace(processed=steps // 2))
    dm.trainer = SimpleNamespace(world_size=world, global_rank=0, current_epoch=41, accumulate_grad_batches=1,
                                 is_global_zero=True, num_training_batches=steps, state=SimpleNamespace(fn="fit"),
                                 fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    class _Len:
        def __len__(self):
            return samples

    dm._train = _Len()
    t0 = time.perf_counter()
    state = dm.state_dict()
    t_save = time.perf_counter() - t0
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    t0 = time.perf_counter()
    dm.load_state_dict(state)
    t_load = time.perf_counter() - t0
    row("checkpoint", f"loader position at {samples:,} samples, world {world}: state_dict", _ms(t_save),
        f"{buf.tell():,} bytes pickled")
    row("checkpoint", "loader position: load_state_dict (checks the dataset's digests)", _ms(t_load))


# ---- cpu loader overhead ------------------------------------------------------------------------------------
def bench_cpu_loader(root: Path, batch: int, steps: int) -> None:
    import torch
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    import pipeline.data.cpu_backend as cpu
    from pipeline.data.augment import AugmentConfig, sample_rng, train_params
    from pipeline.data.contract import TrainSampler
    from pipeline.data.shards import ShardSet

    torch.set_num_threads(1)  # as in a DataLoader worker
    cfg = AugmentConfig()
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    decoded = cpu.decode_rgb(buf.getvalue())
    images = torch.empty((batch, 3, cfg.train_size, cfg.train_size), dtype=torch.uint8,
                         memory_format=torch.channels_last)
    size = [cfg.train_size, cfg.train_size]

    def before(window, flip):  # resize_and_flip before d3f23a1: the crop view as it is
        img = TF.resize(window, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.horizontal_flip(img) if flip else img

    n = 64
    params = [train_params(cfg, 500, 375, sample_rng(0, 1, i)) for i in range(n)]
    ways = {"before": before, "now": lambda w, f: cpu.resize_and_flip(w, cfg, f)}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(7):  # interleaved, best of 7: the machine's load moves
        for name, fn in ways.items():
            t0 = time.perf_counter()
            for j, (top, left, h, w, flip) in enumerate(params):
                images[j % batch] = fn(TF.crop(decoded, top, left, h, w), flip)
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    for name in ways:
        row("cpu loader", f"crop + resize + flip + copy into the channels_last batch, 500x375 -> 224 ({name})",
            f"{best[name] * 1e6:,.0f} us/sample")
    t0 = time.perf_counter()
    for _ in range(n):
        cpu.decode_rgb(buf.getvalue())
    row("cpu loader", "decode_rgb of that 500x375 JPEG (for scale)", f"{(time.perf_counter() - t0) / n * 1e6:,.0f} us/sample")

    shards = ShardSet(root, "train")
    fixed = torch.zeros((3, cfg.train_size, cfg.train_size), dtype=torch.uint8).unsqueeze(0).contiguous(
        memory_format=torch.channels_last)[0]
    cpu.decode_rgb = lambda data: fixed  # stubs: the cost left is the loader's own
    cpu.augment_train = lambda img, cfg, rng: img
    data = cpu.ShardBatches(shards, cfg, train=True, seed=0)
    rows = list(TrainSampler(shards.shard_sizes, 0, 8, 0, batch))[:steps]
    data[rows[0]]
    t0 = time.perf_counter()
    for r in rows:
        data[r]
    per = (time.perf_counter() - t0) / steps
    row("cpu loader", f"ShardBatches per batch of {batch}, decode and augment stubbed (2 preads, copy, per sample)",
        f"{_ms(per)} = {per / batch * 1e6:.1f} us/sample")
    t0 = time.perf_counter()
    for i in range(batch * 4):
        sample_rng(0, 1, i)
    row("cpu loader", "sample_rng per sample (the augmentation's random state)",
        f"{(time.perf_counter() - t0) / (batch * 4) * 1e6:.1f} us")


# ---- run directories -------------------------------------------------------------------------------------------
def _template_checkpoint(path: Path, arch: str, step: int, planned: int, batch: int) -> None:
    import torch
    import torchvision

    model = torchvision.models.resnet50() if arch == "resnet50" else torch.nn.Linear(8, 8)
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    momentum = {i: {"momentum_buffer": torch.zeros_like(v)} for i, v in enumerate(model.parameters())}
    torch.save({"state_dict": sd, "optimizer_states": [{"state": momentum, "param_groups": []}],
                "global_step": step, "epoch": step // 5000, "progress": {"planned_steps": planned, "global_batch": batch},
                "loops": {}, "lr_schedulers": [], "pytorch-lightning_version": "2.5"}, path)


def bench_status(work: Path, runs: int, arch: str) -> None:
    parent = work / "status-runs"
    template = work / f"template-{arch}.ckpt"
    if not template.exists():
        _template_checkpoint(template, arch, 250_000, 450_360, 2048)
    for i in range(runs):
        ck = parent / f"run{i:04d}" / "checkpoints"
        ck.mkdir(parents=True, exist_ok=True)
        for name in ("last.ckpt", f"best-epoch{i % 90:03d}-step{i * 100:07d}-top1={0.7 + i / 1e5:.4f}.ckpt"):
            if not (ck / name).exists():
                os.link(template, ck / name)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "launch", "status", str(parent)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    took = time.perf_counter() - t0
    lines = res.stdout.strip().splitlines()
    ok = res.returncode == 0 and len(lines) == runs + 2
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import launch.status, torch"], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    imports = time.perf_counter() - t0
    size = template.stat().st_size / 2**20
    row("run dirs", f"launch status over {runs} run directories ({arch} checkpoint {size:.0f} MB each)",
        f"{took:.1f} s ({imports:.1f} s of it imports)" + ("" if ok else f" FAILED rc={res.returncode}: "
                                                                     f"{(res.stderr or res.stdout)[-300:]}"))


def bench_table(work: Path, runs: int) -> None:
    import torch
    import yaml

    parent = work / "table-runs"
    template = work / "template-cifar.ckpt"
    if not template.exists():
        from pipeline.models.registry import build

        net = build("cifar_resnet110", num_classes=10)
        torch.save({"state_dict": net.state_dict(), "global_step": 64_000, "epoch": 163,
                    "progress": {"planned_steps": 64_000, "global_batch": 128}}, template)
    header = "epoch,step,train/loss,train/top1,val/top1,val/loss,lr-SGD\n"
    for i in range(runs):
        run = parent / f"cifar_resnet{[20, 32, 44, 56, 110][i % 5]}-seed{i // 5}"
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run / "csv").mkdir(exist_ok=True)
        cfg = {"seed_everything": i // 5, "model": {"arch": run.name.split("-")[0], "arch_kwargs": {"shortcut": "A"}},
               "trainer": {"max_steps": 64_000, "devices": 1, "num_nodes": 1, "precision": "bf16-mixed"},
               "data": {"root": "data/cifar10", "train_split": "train", "val_split": "test", "batch_size": 128,
                        "augment": {"recipe": "cifar", "pad": 4}}}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        if not (run / "checkpoints" / "last.ckpt").exists():
            os.link(template, run / "checkpoints" / "last.ckpt")
        lines = [header]
        for step in range(49, 64_000, 50):  # log_every_n_steps 50, a validation each of 164 epochs
            epoch = step // 391
            lines.append(f"{epoch},{step},0.1,0.95,,,0.01\n")
            if (step + 1) % 391 < 50:
                lines.append(f"{epoch},{step},,,0.93,0.3,\n")
        (run / "csv" / "metrics.csv").write_text("".join(lines))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "tools/cifar10_table.py", str(parent)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    took = time.perf_counter() - t0
    ok = res.returncode == 0 and "cifar_resnet110" in res.stdout
    row("run dirs", f"tools/cifar10_table.py over {runs} CIFAR runs (1,280 logged rows each)",
        f"{took:.1f} s" + ("" if ok else f" FAILED rc={res.returncode}: {res.stderr[-300:]}"))


# ---- data_prep verify ------------------------------------------------------------------------------------------
def bench_verify(work: Path, shards: int, per_shard: int) -> None:
    """``python -m data_prep verify`` over real little tars (32x32 JPEGs) as data_prep lays them out."""
    import struct
    import tarfile

    from PIL import Image

    from data_prep.format import index_name, shard_name
    from data_prep.shardwriter import file_sha256
    from data_prep.verify import index_of_tar

    for k, n in ((shards, per_shard), (1, shards * per_shard)):
        out = work / f"verify-{k}x{n}"
        if not (out / "manifest.json").exists():
            out.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (90, 120, 30)).save(buf, "JPEG", quality=80)
            entries = []
            for s in range(k):
                tar = out / shard_name("train", s)
                with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
                    for i in range(n):
                        c = (s * n + i) % 1000
                        for ext, data in (("jpg", buf.getvalue()), ("cls", str(c).encode()),
                                          ("lbl", struct.pack("<i", c))):
                            info = tarfile.TarInfo(f"s{s:06d}_{i:06d}.{ext}")
                            info.size = len(data)
                            tf.addfile(info, io.BytesIO(data))
                (out / index_name("train", s)).write_text("".join(index_of_tar(tar)))
                entries.append({"name": tar.name, "index": index_name("train", s), "samples": n,
                                "bytes": tar.stat().st_size, "sha256": file_sha256(tar)})
            manifest = {"version": 1, "source": "synthetic", "options": {}, "classes": [f"n{i:08d}" for i in range(1000)],
                        "class_names": [str(i) for i in range(1000)],
                        "splits": {"train": {"shards": entries, "samples": k * n, "rejected": 0, "options": {}}}}
            (out / "rejects.jsonl").write_text("")
            (out / "manifest.json").write_text(json.dumps(manifest))
        for workers in (1, 2):
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out), "--workers", str(workers)],
                                 capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            took = time.perf_counter() - t0
            ok = "" if res.returncode == 0 else f" FAILED rc={res.returncode}: {(res.stderr or res.stdout)[-300:]}"
            row("verify", f"data_prep verify, {k:,} shards x {n:,} samples, {workers} worker(s)",
                f"{took:.1f} s = {took / (k * n) * 1e6:,.0f} us/sample{ok}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_281_167)
    ap.add_argument("--shards", type=int, default=1500)
    ap.add_argument("--val", type=int, default=50_000)
    ap.add_argument("--val-shards", type=int, default=64)
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 512, 1024])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--runs", type=int, default=200, help="run directories for launch status")
    ap.add_argument("--table-runs", type=int, default=100, help="CIFAR runs for tools/cifar10_table.py")
    ap.add_argument("--ckpt-arch", default="resnet50", choices=["resnet50", "tiny"])
    ap.add_argument("--verify-shards", type=int, default=2000)
    ap.add_argument("--verify-samples", type=int, default=20, help="samples per shard for data_prep verify")
    ap.add_argument("--work", help="keep the generated files here (default: a temporary folder)")
    ap.add_argument("--parts", nargs="+", default=["contract", "startup", "checkpoint", "loader", "rundirs", "verify"],
                    choices=["contract", "startup", "checkpoint", "loader", "rundirs", "verify"])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "shardset":
            print(json.dumps(child_shardset(*args.child[1:])))
        else:
            print(json.dumps(child_imports()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        root = work / f"shards-{args.samples}-{args.shards}"
        if not (root / "manifest.json").exists() and {"startup", "checkpoint", "loader"} & set(args.parts):
            t0 = time.perf_counter()
            make_dataset(root, args.samples, args.shards, args.val, args.val_shards)
            row("setup", f"made manifest + indexes + sparse tars: {args.shards:,} train shards", _ms(time.perf_counter() - t0))
        if "contract" in args.parts:
            bench_contract(args.samples, args.shards, args.val, args.worlds, args.batch)
        if "startup" in args.parts:
            bench_startup(root, args.shards)
        if "checkpoint" in args.parts:
            bench_checkpoint(root, args.samples, args.worlds[0], args.batch)
        if "loader" in args.parts:
            bench_cpu_loader(root, args.batch, 20)
        if "rundirs" in args.parts:
            bench_status(work, args.runs, args.ckpt_arch)
            bench_table(work, args.table_runs)
        if "verify" in args.parts:
            bench_verify(work, args.verify_shards, args.verify_samples)
    widths = [max(len(r[i]) for r in ROWS + [("part", "measurement", "value", "memory")]) for i in range(4)]
    print(f"| {'part':<{widths[0]}} | {'measurement':<{widths[1]}} | {'value':<{widths[2]}} | {'memory':<{widths[3]}} |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in ROWS:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()

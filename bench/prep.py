"""Benchmark: data_prep vs a straightforward webdataset ShardWriter + PIL script (not a test).

Both read the same generated ImageFolder of real photos (crops of scikit-learn's sample images,
about 500x375 JPEGs of varied quality) and write WebDataset shards. Reports wall time, img/s,
MB/s of input, and peak RSS of the whole process tree (sampled every 20 ms from /proc).

    python bench/prep.py --images 3000 --workers 2
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE = r'''
import os, sys, io
import webdataset as wds
from PIL import Image
src, out = sys.argv[1], sys.argv[2]
classes = sorted(os.listdir(src))
os.makedirs(out, exist_ok=True)
n = 0
with wds.ShardWriter(os.path.join(out, "train-%06d.tar"), maxsize=10_000_000, verbose=0) as sink:
    for label, c in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(src, c))):
            path = os.path.join(src, c, name)
            with open(path, "rb") as f:
                data = f.read()
            try:
                Image.open(io.BytesIO(data)).verify()
                img = Image.open(io.BytesIO(data)).convert("RGB")
            except Exception:
                continue
            sink.write({"__key__": f"train_{n:08d}", "jpg": data, "cls": str(label).encode()})
            n += 1
print(n)
'''


def make_inputs(root: Path, n: int, classes: int = 10) -> int:
    """Write `n` ~500x375 JPEGs (varied crops, flips, quality) into root/<class>/; return total bytes."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    srcs = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        src = srcs[i % len(srcs)]
        w, h = src.size
        cw = int(rng.integers(w // 2, w))
        ch = int(cw * 0.75)
        ch = min(ch, h)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        d = root / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img{i:06d}.jpg"
        img.save(p, format="JPEG", quality=int(rng.integers(75, 96)), progressive=bool(rng.random() < 0.3))
        total += p.stat().st_size
    return total


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            continue
        stack += _children(p)
    return total


def measure(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd`; return (wall seconds, peak tree RSS bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--max-side", type=int, default=256, help="re-encode row: longer side")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        t0 = time.perf_counter()
        nbytes = make_inputs(src, args.images)
        print(f"inputs: {args.images} JPEGs, {nbytes / 1e6:.1f} MB (generated in {time.perf_counter() - t0:.1f}s)")
        py = sys.executable
        (tmp / "baseline.py").write_text(BASELINE)
        runs = [
            ("baseline: wds.ShardWriter + PIL verify/convert, 1 proc",
             [py, str(tmp / "baseline.py"), str(src), str(tmp / "base")]),
            (f"data_prep passthrough, {args.workers} workers",
             [py, "-m", "data_prep", "imagefolder", str(src), str(tmp / "pass"), "--split", "train",
              "--shard-size", "10MB", "--workers", str(args.workers), "--no-progress"]),
            ("data_prep passthrough, 1 worker",
             [py, "-m", "data_prep", "imagefolder", str(src), str(tmp / "pass1"), "--split", "train",
              "--shard-size", "10MB", "--workers", "1", "--no-progress"]),
            (f"data_prep re-encode --max-side {args.max_side}, {args.workers} workers",
             [py, "-m", "data_prep", "imagefolder", str(src), str(tmp / "re"), "--split", "train",
              "--shard-size", "10MB", "--max-side", str(args.max_side), "--workers", str(args.workers),
              "--no-progress"]),
        ]
        rows = []
        for name, cmd in runs:
            wall, peak = measure(cmd)
            rows.append((name, wall, args.images / wall, nbytes / 1e6 / wall, peak / 2**20))
        base = rows[0][1]
        print(f"\n| {'run':<58} | {'wall s':>7} | {'img/s':>8} | {'MB/s':>7} | {'peak RSS MiB':>12} | {'speedup':>7} |")
        print(f"|{'-' * 60}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 14}|{'-' * 9}|")
        for name, wall, ips, mbs, rss in rows:
            print(f"| {name:<58} | {wall:7.2f} | {ips:8.1f} | {mbs:7.1f} | {rss:12.1f} | {base / wall:6.2f}x |")


if __name__ == "__main__":
    main()

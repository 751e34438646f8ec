"""Benchmark: the data_prep parent's memory and time for ImageNet-train-sized plans (not a test).

Builds, in process and without touching disk, the listing the real listers would return for
1,281,167 ImageNet train inputs (1000 wnid classes) in both layouts:

* ``archive``: members of ``ILSVRC2012_img_train.tar``'s inner ``<wnid>.tar`` files, as
  ``imagenet._list_train_archive`` makes them (display ``<tar>:<wnid>.tar:<file>``, ref into the tar);
* ``extracted``: ``train/<wnid>/<file>.JPEG`` files, as ``sources.list_dir`` makes them.

Then runs what the parent runs between listing and dispatch with the real code: ``scan_imagenet``
(labelling, class index, sort), ``prepare.plan_split`` (shard plan + plan record) and the per-job
pickling a worker pool does on dispatch. Each layout runs in a fresh subprocess; peak RSS is the
process high-water mark (``/proc/self/status`` VmHWM, = ``getrusage`` ru_maxrss).

    python bench/prep_plan_memory.py [--inputs 1281167] [--layouts archive extracted]
"""
from __future__ import annotations

import argparse
import json
import pickle
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ROOT = "/datasets/imagenet"  # fixed, so hashes compare across runs and commits


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _synthetic_listing(layout: str, n: int, root: str):
    """The Listing the real lister would produce for `n` ImageNet-like train files (no files made)."""
    from data_prep.sources import FileEntry, Listing

    rng = random.Random(0)
    wnids = sorted({f"n{rng.randrange(1_000_000, 15_000_000):08d}" for _ in range(1100)})[:1000]
    per = [n // 1000 + (1 if c < n % 1000 else 0) for c in range(1000)]
    listing = Listing()
    tar = str(Path(root) / "ILSVRC2012_img_train.tar")  # Path.__str__ is cached: one object, as in the lister
    offset = 0
    for c, wnid0 in enumerate(wnids):
        ids = sorted(rng.sample(range(1, 20000), per[c]))
        offset += 512  # the inner <wnid>.tar header in the outer archive
        wnid = f"{wnid0}.tar"[:-4]  # a fresh str per class, like stem[:-4]
        prefix = f"{tar}:{wnid0}.tar"
        dirparts = (wnid,)  # list_dir shares rel.parts within a directory
        for k in ids:
            name = f"{wnid0}_{k}.JPEG"
            size = max(2000, int(rng.gauss(110_000, 40_000)))
            if layout == "archive":
                offset += 512
                listing.files.append(FileEntry((wnid, name), f"{prefix}:{name}", (tar, offset, size)))
                offset += size + (-size) % 512
            else:
                path = f"{root}/train/{wnid0}/{name}"
                listing.files.append(FileEntry(dirparts + (name,), path, (path, -1, size)))
    return listing


def run_one(layout: str, n: int, seed: int, shard_bytes: int) -> dict:
    """Child side: list -> scan -> plan -> dispatch pickling, with phase peaks and times."""
    import data_prep.imagenet as imagenet
    from data_prep import prepare
    from data_prep.format import plan_path
    from data_prep.validate import EncodeOptions

    row = {"layout": layout, "inputs": n, "rss_imports_mb": _status_mb("VmRSS")}
    with tempfile.TemporaryDirectory() as tmp:
        src_dir, out = Path(tmp) / "src", Path(tmp) / "out"
        src_dir.mkdir()
        t0 = time.perf_counter()
        listing = _synthetic_listing(layout, n, ROOT)
        row["list_s"] = time.perf_counter() - t0
        row["peak_list_mb"] = _status_mb("VmHWM")

        class Source(imagenet.ImageNetSource):
            def list_split(self, split):
                nonlocal listing
                got, listing = listing, None  # the lister's result is owned by the scan from here on
                return got, str(self.src / "train")

        t0 = time.perf_counter()
        scans, _where = imagenet.scan_imagenet(Source(src_dir, None, None), ["train"])
        scan = scans["train"]
        row["scan_s"] = time.perf_counter() - t0
        row["peak_scan_mb"] = _status_mb("VmHWM")
        row["rss_scan_mb"] = _status_mb("VmRSS")

        opts = EncodeOptions(max_side=None, quality=90)
        t0 = time.perf_counter()
        jobs = prepare.plan_split(out, "train", ROOT, scan, opts, seed, shard_bytes, None,
                                           split_source=f"{ROOT}/train")
        row["plan_s"] = time.perf_counter() - t0
        row["shards"] = len(jobs)
        row["peak_plan_mb"] = _status_mb("VmHWM")
        plan_text = plan_path(out, "train").read_text()
        import hashlib
        row["plan_sha"] = hashlib.sha256(plan_text.encode()).hexdigest()[:16]

        t0 = time.perf_counter()
        job_sha = hashlib.sha256()
        for j in jobs:  # what Pool.imap does per task, one at a time
            blob = pickle.dumps((out, j, opts))
            _o, back, _p = pickle.loads(blob)
            for i, disp, ref, label in back.entries:
                job_sha.update(f"{i}\t{disp}\t{ref}\t{label}\n".encode("utf-8", "surrogateescape"))
        row["dispatch_s"] = time.perf_counter() - t0
        row["entries_sha"] = job_sha.hexdigest()[:16]
        row["peak_mb"] = _status_mb("VmHWM")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=1_281_167)
    ap.add_argument("--layouts", nargs="+", default=["archive", "extracted"], choices=["archive", "extracted"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=int, default=1 << 30)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.inputs, args.seed, args.shard_bytes)))
        return
    rows = []
    for layout in args.layouts:
        cmd = [sys.executable, __file__, "--child", layout, "--inputs", str(args.inputs), "--seed", str(args.seed),
               "--shard-bytes", str(args.shard_bytes)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if res.returncode != 0:
            sys.exit(f"{layout}: child failed:\n{res.stderr}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    cols = [("layout", "layout", "{}"), ("inputs", "inputs", "{:,}"), ("shards", "shards", "{}"),
            ("rss_imports_mb", "imports MB", "{:.0f}"), ("peak_list_mb", "peak list MB", "{:.0f}"),
            ("peak_scan_mb", "peak scan MB", "{:.0f}"), ("peak_plan_mb", "peak plan MB", "{:.0f}"),
            ("peak_mb", "peak MB", "{:.0f}"), ("list_s", "list s", "{:.1f}"), ("scan_s", "scan s", "{:.1f}"),
            ("plan_s", "plan s", "{:.1f}"), ("dispatch_s", "dispatch s", "{:.1f}"),
            ("plan_sha", "plan.json sha", "{}"), ("entries_sha", "entries sha", "{}")]
    cells = [[fmt.format(r[k]) for k, _, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(cols)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(cols, widths)))
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))


if __name__ == "__main__":
    main()

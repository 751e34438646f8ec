"""Memory over a long run, per loader backend: does a process grow epoch after epoch?

Trains the demo (conf/demo.yaml: cifar_resnet20 on scikit-learn's digits, sharded with data_prep) for
``--epochs`` epochs per backend with ``python -m pipeline fit``, validating and checkpointing every epoch,
stopped after ``--resume-at`` epochs and resumed from ``last.ckpt`` (a second start, new processes). An
outside sampler polls the run every 0.2 s; each time ``checkpoints/last.ckpt`` is replaced (once per epoch)
it reads, for the training process and every process below it (all samples: ``WORK/loader_memory.json``), RSS and PSS (``/proc/PID/smaps_rollup``),
open file descriptors (those on ``/dev/shm`` or a memfd counted apart), and ``/dev/shm``'s used space.

Per backend and process kind (the training process; the loader workers: the cpu backend's DataLoader
workers, DALI's source workers; multiprocessing's helpers), summed over the processes of that kind:
RSS at epoch 1, 5 and the end, PSS at the end, the warm-up (epoch ``--warm`` of the last start against its
first epoch) and the steady slope (least squares over the last start's epochs after its warm-up, at most
the last 20), in MB an epoch, beside the cpu backend's (the baseline, measured in the same run).

    python bench/loader_memory.py --epochs 40 --resume-at 20           # about 15 min on 2 cores
    python bench/loader_memory.py --epochs 3 --resume-at 1 --backends cpu dali-cpu:1 --limit-val 1   # the test's
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 1e6


def make_shards(work: Path, images: int) -> Path:
    """The digits train/val shards, as tests/conftest.py's ``digits_shards`` builds them (kept in ``work``), of
    ``images`` train images and ``images // 2`` val images (in turns over the classes, at least one each; 0: all): small epochs that still end (a
    DALI pipeline is reset for the next epoch only after its plan's end; ``limit_train_batches`` rebuilds it)."""
    import shutil

    from pipeline.demo_data import write_digits

    out = work / f"shards-{images or 'all'}"
    if (out / "val-000000.tar").is_file():
        return out
    write_digits(work / "images")
    sub = work / f"images-{images or 'all'}"
    for split, n in (("train", images), ("val", images // 2)):
        by_class = [sorted(d.glob("*.jpg")) for d in sorted((work / "images" / split).iterdir())]
        # in turns over the classes, at least one each: data_prep wants the same classes in every split
        files = [f for row in itertools.zip_longest(*by_class) for f in row if f][: max(n, len(by_class)) if n else None]
        for f in files:
            (sub / split / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, sub / split / f.parent.name / f.name)
    for split in ("train", "val"):
        subprocess.run([sys.executable, "-m", "data_prep", "imagefolder", str(sub / split), str(out),
                        "--split", split, "--samples-per-shard", "500", "--workers", "1"],
                       check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    return out


# ---- the sampler ---------------------------------------------------------------------------------------
def _parents() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
                out[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def descendants(root: int) -> list[int]:
    parents = _parents()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(p for p, pp in parents.items() if pp == pid)
    return found


def kind(pid: int, root: int) -> str:
    """main, worker (a DataLoader or DALI source worker), or helper (resource tracker, fork server)."""
    if pid == root:
        return "main"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "resource_tracker" in cmd or "forkserver" in cmd or "semaphore_tracker" in cmd:
        return "helper"
    return "worker"


def proc_memory(pid: int) -> dict[str, float] | None:
    try:
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) * 1024
        fds = shm_fds = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            fds += 1
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            shm_fds += target.startswith("/dev/shm/") or target.startswith("/memfd:")
    except (OSError, ValueError):
        return None
    return {"rss": fields.get("Rss", 0) / MB, "pss": fields.get("Pss", 0) / MB, "fds": fds, "shm_fds": shm_fds}


def shm_used() -> float:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize / MB


def sample(root: int) -> dict:
    kinds: dict[str, dict[str, float]] = {}
    for pid in descendants(root):
        k = kind(pid, root)
        m = proc_memory(pid)
        if m is None or k == "gone":
            continue
        agg = kinds.setdefault(k, {"n": 0, "rss": 0.0, "pss": 0.0, "fds": 0, "shm_fds": 0})
        agg["n"] += 1
        for key in ("rss", "pss", "fds", "shm_fds"):
            agg[key] += m[key]
    return {"kinds": kinds, "shm": shm_used()}


def fit(shards: Path, run: Path, backend: str, epochs: int, args, start: int, done: int) -> list[dict]:
    """One start of the run (epochs ``done`` + 1 to ``epochs``), sampled at every replacement of last.ckpt
    (the save at the fit's end, with the workers stopping, is no epoch's end: dropped)."""
    name, _, workers = backend.partition(":")
    cmd = ["nice", "-n", str(args.nice), sys.executable, "-m", "pipeline", "fit", "--config", "conf/demo.yaml",
           "--data.root", str(shards), "--data.backend", name, "--data.num_workers", str(args.workers),
           "--data.batch_size", str(args.batch), "--trainer.max_epochs", str(epochs),
           "--trainer.default_root_dir", str(run), "--tracking.wandb", "false",
           "--trainer.enable_progress_bar", "false"]
    if workers:
        cmd += ["--data.dali_source_workers", workers]
    if args.limit_train:
        cmd += ["--trainer.limit_train_batches", str(args.limit_train)]
    if args.limit_val:
        cmd += ["--trainer.limit_val_batches", str(args.limit_val)]
    log = open(run.parent / f"{run.name}-start{start}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=log)
    last = run / "checkpoints" / "last.ckpt"

    def stamp() -> tuple[int, int] | None:
        try:
            st = last.stat()
            return st.st_ino, st.st_mtime_ns
        except OSError:
            return None

    seen, rows = stamp(), []  # a resume's last.ckpt is the earlier start's
    while proc.poll() is None:
        now = stamp()
        if now is not None and now != seen:
            seen = now
            rows.append({**sample(proc.pid), "start": start})
        time.sleep(0.2)
    log.close()
    if proc.returncode != 0:
        sys.exit(f"{backend}: fit exited {proc.returncode}; see {log.name}:\n"
                 + Path(log.name).read_text()[-3000:])
    return rows[: epochs - done]


def measure(shards: Path, work: Path, backend: str, args) -> list[dict]:
    run = work / f"run-{backend.replace(':', '-w')}"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    run.mkdir(parents=True)
    rows = fit(shards, run, backend, args.resume_at, args, 1, 0) if 0 < args.resume_at < args.epochs else []
    rows += fit(shards, run, backend, args.epochs, args, 2 if rows else 1, len(rows))
    return rows


# ---- the table -----------------------------------------------------------------------------------------
def slope(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    x = np.arange(len(values), dtype=float)
    return float(np.polyfit(x, np.asarray(values, dtype=float), 1)[0])


def summarise(rows: list[dict], warm: int, window: int) -> dict[str, dict]:
    """Per process kind: rss at epoch 1, 5 and the end, pss at the end, warm-up and steady slope (MB/epoch)."""
    last_start = [r for r in rows if r["start"] == rows[-1]["start"]]
    steady = last_start[warm:][-window:]
    out = {}
    kinds = sorted({k for r in rows for k in r["kinds"]}, key=["main", "worker", "helper"].index)
    for k in kinds:
        def at(r, key="rss"):
            return r["kinds"].get(k, {}).get(key, float("nan"))

        warm_to = last_start[min(warm, len(last_start) - 1)]
        out[k] = {"n": int(rows[-1]["kinds"].get(k, {}).get("n", 0)),
                  "rss1": at(rows[0]), "rss5": at(rows[min(4, len(rows) - 1)]), "rss_end": at(rows[-1]),
                  "pss_end": at(rows[-1], "pss"), "warmup": at(warm_to) - at(last_start[0]),
                  "slope": slope([at(r) for r in steady]), "pss_slope": slope([at(r, "pss") for r in steady]),
                  "fds": f"{at(rows[0], 'fds'):.0f} -> {at(rows[-1], 'fds'):.0f}",
                  "shm_fds": f"{at(rows[0], 'shm_fds'):.0f} -> {at(rows[-1], 'shm_fds'):.0f}"}
    out["/dev/shm"] = {"shm1": rows[0]["shm"], "shm_end": rows[-1]["shm"], "slope": slope([r["shm"] for r in steady])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/loader-memory-bench"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--resume-at", type=int, default=4, help="the first start stops after this many epochs")
    parser.add_argument("--backends", nargs="+", default=["cpu", "dali-cpu", "dali-cpu:2"],
                        help="cpu first (the baseline); dali-cpu:N: with N DALI source workers")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers (DALI's threads for dali-cpu)")
    parser.add_argument("--images", type=int, default=64, help="train images (val: half as many; 0: all 1,434)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--limit-train", type=int, default=0, help="trainer.limit_train_batches (0: whole epochs)")
    parser.add_argument("--limit-val", type=int, default=0, help="trainer.limit_val_batches (0: all)")
    parser.add_argument("--warm", type=int, default=3, help="epochs of a start counted as warm-up")
    parser.add_argument("--window", type=int, default=20, help="the steady slope's epochs, at most")
    parser.add_argument("--nice", type=int, default=10)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(args.work, args.images)
    results, raw = {}, {}
    for backend in args.backends:
        t0 = time.time()
        rows = raw[backend] = measure(shards, args.work, backend, args)
        (args.work / "loader_memory.json").write_text(json.dumps(raw))  # every epoch end's sample
        results[backend] = summarise(rows, args.warm, args.window)
        print(f"{backend}: {len(rows)} epoch ends sampled in {time.time() - t0:.0f} s", flush=True)
    base = results.get("cpu", {})
    train_images = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["samples"]
    print(f"\n{args.epochs} epochs (resumed after {args.resume_at}), {train_images} train images, batch {args.batch}, "
          f"{'limit_train_batches ' + str(args.limit_train) if args.limit_train else 'whole epochs'}; "
          f"steady: the last start's epochs after {args.warm}, at most {args.window}; MB = 1e6 bytes\n")
    print("| backend | process (n) | RSS ep 1 | RSS ep 5 | RSS end | PSS end | warm-up MB | steady MB/epoch (RSS) "
          "| steady MB/epoch (PSS) | cpu's steady | fds first -> end (shm/memfd) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for backend, kinds in results.items():
        for k, s in kinds.items():
            if k == "/dev/shm":
                print(f"| {backend} | /dev/shm used | {s['shm1']:.1f} | | {s['shm_end']:.1f} | | | {s['slope']:+.3f} "
                      f"| | {base.get(k, {}).get('slope', float('nan')):+.3f} | |")
                continue
            ref = base.get(k, {}).get("slope", float("nan"))
            print(f"| {backend} | {k} ({s['n']}) | {s['rss1']:.0f} | {s['rss5']:.0f} | {s['rss_end']:.0f} | "
                  f"{s['pss_end']:.0f} | {s['warmup']:+.1f} | {s['slope']:+.3f} | {s['pss_slope']:+.3f} | {ref:+.3f} | "
                  f"{s['fds']} ({s['shm_fds']}) |")


if __name__ == "__main__":
    main()

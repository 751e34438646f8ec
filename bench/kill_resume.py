"""Kill a training run with SIGKILL at random steps, resume it each time, compare with an uninterrupted run.

    python bench/kill_resume.py --shards data/demo/shards --kills 10 [--steps 40] [--seed S]

Both runs use the demo config with ResNet-8 (the demo's blocks at a third of ResNet-20's compute: the check is
about resuming, not learning) in deterministic mode on the CPU with ``last.ckpt`` after every step. The
interrupted run is started with ``--ckpt_path last`` (as the Slurm launcher does), killed as soon as its
``last.ckpt`` reaches each random kill step (so the kill lands at that step or shortly after, sometimes
in the middle of writing a checkpoint), and restarted. At the end the weights, optimizer state and loader
position of both runs must be bit-identical. Exit status 0 when they are.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.run_layout import last_checkpoint  # noqa: E402

CONF = REPO / "conf" / "demo.yaml"
ARCH = "cifar_resnet8"  # the demo's BasicBlocks and option-A shortcuts, a third of ResNet-20's step time


def fit_command(shards: Path, run_dir: Path, steps: int, extra: list[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "pipeline", "fit", "--config", str(CONF), "--model.arch", ARCH,
        "--data.root", str(shards),
        "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(steps),
        "--data.batch_size", "128", "--data.val_batch_size", "256", "--data.num_workers", "1",
        "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "0",
        "--trainer.log_every_n_steps", "1", "--tracking.wandb", "false", "--ckpt_path", "last", *extra,
    ]


# How the runs start: subprocess's run and Popen. The test suite, which runs these functions many times, puts
# in its own with the same signatures (tests/preloaded_python.py: forked from a Python that has imported torch).
run_process, start_process = subprocess.run, subprocess.Popen


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}


def saved_step(last: Path) -> int:
    try:
        return int(torch.load(last, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except Exception:  # not there yet
        return -1


def run_to_end(cmd: list[str], log) -> None:
    proc = run_process(cmd, env=_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")


def run_and_kill_at(cmd: list[str], last: Path, step: int, log, timeout: float = 600,
                    sig: int = signal.SIGKILL, env: dict | None = None) -> int:
    """Start the run, send ``sig`` once ``last.ckpt`` holds ``step`` or later; the step saved last.

    SIGKILL: the process dies at once (maybe in the middle of a checkpoint write). SIGUSR1/SIGTERM: the
    run must save at the next batch boundary and exit 0 by itself (preemption)."""
    proc = start_process(cmd, env={**_env(), **(env or {})}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            s = saved_step(last)
            if s >= step:
                os.killpg(proc.pid, sig)  # the whole process group, loader workers too, as Slurm does
                rc = proc.wait(timeout=300)
                if sig != signal.SIGKILL and rc != 0:
                    raise RuntimeError(f"run exited {rc} after {signal.Signals(sig).name}")
                return saved_step(last)
            if proc.poll() is not None:
                raise RuntimeError(f"run ended (exit {proc.returncode}) before step {step}")
            time.sleep(0.05)
        raise TimeoutError(f"step {step} not reached in {timeout}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def compare(a: Path, b: Path) -> list[str]:
    """Differences between two checkpoints' weights, optimizer states and loader positions."""
    ca = torch.load(a, map_location="cpu", weights_only=False)
    cb = torch.load(b, map_location="cpu", weights_only=False)
    diffs = []
    if ca["global_step"] != cb["global_step"]:
        diffs.append(f"global_step {ca['global_step']} != {cb['global_step']}")
    for k, v in ca["state_dict"].items():
        if not torch.equal(v, cb["state_dict"][k]):
            diffs.append(f"weight {k} differs (max abs {(v.float() - cb['state_dict'][k].float()).abs().max():.3g})")
    for i, (sa, sb) in enumerate(zip(ca["optimizer_states"][0]["state"].values(),
                                     cb["optimizer_states"][0]["state"].values())):
        for k in sa:
            if not torch.equal(sa[k], sb[k]):
                diffs.append(f"optimizer state {i}.{k} differs")
    if ca["lr_schedulers"] != cb["lr_schedulers"]:
        diffs.append("lr scheduler state differs")
    pa, pb = ca.get("ShardDataModule"), cb.get("ShardDataModule")
    if pa != pb:
        diffs.append(f"loader position differs: {pa} != {pb}")
    return diffs


def kill_resume(shards: Path, work: Path, kills: int, steps: int, seed: int, log=None) -> tuple[list[int], list[str]]:
    """Returns (steps at which the kills landed, differences); no differences means bit-exact."""
    log = log or sys.stderr
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, steps - 1), kills))
    print(f"kill points (seed {seed}): {points}", file=log, flush=True)
    ref, cut = work / "uninterrupted", work / "interrupted"
    run_to_end(fit_command(shards, ref, steps), log)
    landed = []
    last = last_checkpoint(cut)
    for p in points:
        if saved_step(last) >= p:
            continue  # a previous kill landed beyond this point
        landed.append(run_and_kill_at(fit_command(shards, cut, steps), last, p, log))
        print(f"killed at step {landed[-1]} (target {p})", file=log, flush=True)
    run_to_end(fit_command(shards, cut, steps), log)
    return landed, compare(last_checkpoint(ref), last)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=Path, required=True, help="digits shards (make demo writes them to data/demo/shards)")
    ap.add_argument("--work", type=Path, default=Path("runs/kill_resume"))
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40, help="training steps (11 per epoch at batch 128)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    if args.kills > args.steps - 2:
        print("error: --kills must be smaller than --steps - 1", file=sys.stderr)
        return 2
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    with open(args.work / "runs.log", "w") as log:
        landed, diffs = kill_resume(args.shards, args.work, args.kills, args.steps, args.seed, log)
    print(f"killed {len(landed)} times at steps {landed}; logs in {args.work / 'runs.log'}")
    if diffs:
        print("NOT bit-exact:\n  " + "\n  ".join(diffs[:20]))
        return 1
    print("bit-exact: weights, optimizer state, scheduler and loader position identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`launch torchrun --run` really trains: one node, two gloo processes, the demo config; after a rank is
killed the agent's restart resumes it, bit-exact."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.kill_resume import compare
from pipeline.torchelastic import restart_warning
from tests.conftest import REPO, free_port


STEPS = 8


def _launch(run_dir: Path, shards: Path, *launch_args: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "WANDB_API_KEY", "TORCHELASTIC_", "TORCH_DISABLE_SHARE", "OMP_NUM_THREADS"))}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline")
    # OMP_NUM_THREADS is the launcher's (cores / --nproc-per-node): on 2 cores 1 thread a rank, as every run here
    cores = sorted(os.sched_getaffinity(0))[:2]
    argv = [sys.executable, "-m", "launch", "torchrun", "--config", str(REPO / "conf" / "demo.yaml"),
            "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
            "--run-dir", str(run_dir), "--cpu", *launch_args, "--run", "--",
            "--data.root", str(shards), "--trainer.max_steps", str(STEPS), "--data.num_workers", "0",
            "--checkpoint.every_n_train_steps", "2", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # a hung run: the ranks too (torchrun starts each in a session of its own)
        subprocess.run(["pkill", "-9", "-f", str(run_dir)], check=False)
        proc.kill()
        out, err = proc.communicate()
        err += "\n(timed out after 180 s: killed)"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture(scope="module")
def uninterrupted(digits_shards: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    return run_dir, _launch(run_dir, digits_shards)


@pytest.mark.slow
def test_torchrun_run_trains_two_processes(uninterrupted) -> None:
    run_dir, r = uninterrupted
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Starting with 2 processes" in r.stdout + r.stderr
    # torchrun's block when it had to choose the threads ("Setting OMP_NUM_THREADS environment variable for
    # each process to be 1 in default, to avoid your system being overloaded, ..."): the launcher chose them
    assert "OMP_NUM_THREADS" not in r.stdout + r.stderr, r.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs and all(p.name.endswith(run_id) for p in runs)


@pytest.mark.slow
def test_a_branch_with_branch_from_starts_from_the_other_runs_checkpoint(uninterrupted, digits_shards: Path,
                                                                        tmp_path: Path) -> None:
    """`launch torchrun --branch-from OTHER/checkpoints/last.ckpt`: the line passes `--ckpt_path last` (every
    restart resumes the run's own checkpoint), so the origin is recorded in the run directory first."""
    other, _ = uninterrupted
    origin = os.path.realpath(other / "checkpoints" / "last.ckpt")
    run_dir = tmp_path / "branch"
    r = _launch(run_dir, digits_shards, "--branch-from", str(other / "checkpoints" / "last.ckpt"),
                extra=("--trainer.max_steps", str(STEPS + 2)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"branch: {run_dir / 'branched_from'} records {origin}: the first start starts from it" in r.stderr
    assert f"this run is a branch of {origin} ({run_dir / 'branched_from'})" in r.stderr, r.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS + 2 and ckpt["branched_from"] == origin


@pytest.mark.slow
def test_rank_killed_then_restarted_by_torchrun_is_bit_exact(uninterrupted, digits_shards: Path,
                                                               tmp_path: Path) -> None:
    """Rank 0 dies at step 5 (last.ckpt at step 4); with one restart allowed the agent starts both ranks
    again, they resume, and the run ends as the uninterrupted one. Without a fresh rendezvous store per
    round the restarted ranks read the dead round's addresses and the one restart fails."""
    ref, r0 = uninterrupted
    assert r0.returncode == 0, r0.stderr[-3000:]
    run_dir = tmp_path / "run"
    r = _launch(run_dir, digits_shards, "--max-restarts", "1",
                extra=("--trainer.callbacks+=tests.preemption_helpers.KillFirstAttempt",
                       "--trainer.callbacks.step=5"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "exitcode: -9" in out and out.count("resuming from") == 1, out[-4000:]
    assert "connectFullMesh failed" not in out
    diffs = compare(ref / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


@pytest.mark.slow
def test_ranks_of_a_killed_agent_save_and_stop_then_resume_bit_exact(uninterrupted, digits_shards: Path,
                                                                    tmp_path: Path) -> None:
    """The agent SIGKILLed at step 3 (a `kill -9` of the torchrun pid): the kernel sends its ranks SIGTERM,
    they save last.ckpt together and stop, as on a preemption (before, they trained on to the end with no
    agent watching them). A new torchrun resumes and ends as the uninterrupted run."""
    ref, r0 = uninterrupted
    assert r0.returncode == 0, r0.stderr[-3000:]
    run_dir = tmp_path / "run"
    r = _launch(run_dir, digits_shards, extra=("--trainer.callbacks+=tests.preemption_helpers.KillAgentAt",
                                               "--trainer.callbacks.step=3"))
    out = r.stdout + r.stderr
    assert r.returncode == -9, out[-4000:]
    assert "preemption (SIGTERM)" in out, out[-4000:]
    left = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    assert not left, f"ranks still running: {left}"
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert 3 < saved["global_step"] < STEPS, saved["global_step"]
    r = _launch(run_dir, digits_shards)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "resuming from" in out, out[-4000:]
    diffs = compare(ref / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


def test_a_rank_whose_agent_is_gone_does_not_start(tmp_path: Path) -> None:
    """A rank that finds its agent already gone (killed between starting it and the rank's request to the
    kernel: no SIGTERM would ever come) stops at once with one line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHELASTIC_RUN_ID": "x"}
    rank = ("import sys, time; time.sleep(1); from pipeline.cli import main; "
            f"open({str(tmp_path / 'rc')!r}, 'w').write(str(main(['fit', '--help'])))")
    agent = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {rank!r}], stderr=open({str(tmp_path / 'err')!r}, 'w'))"
    subprocess.run([sys.executable, "-c", agent], env=env, check=True, timeout=60)  # ends before the rank asks
    for _ in range(1200):
        if (tmp_path / "rc").exists() and (tmp_path / "rc").read_text():
            break
        time.sleep(0.1)
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text() == "1", err
    assert "error: the torchrun agent that started this rank" in err and "has ended" in err, err


def test_a_rank_of_a_torchrun_that_is_pid_1_starts(tmp_path: Path) -> None:
    """In a container whose command is torchrun the live agent is pid 1, which is also what a rank's parent
    reads after its agent died (init adopts orphans): that rank must start (it was refused)."""
    from tests.conftest import unavailable_here

    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode != 0:
        unavailable_here("unshare --pid is not permitted here (needs root)")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", str(torchrun), "--nnodes", "1",
                           "--nproc-per-node", "1", "--max-restarts", "0", "--rdzv-backend", "c10d",
                           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "pipeline", "fit", "--help"],
                          capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=180)
    assert proc.returncode == 0 and "--trainer.max_steps" in proc.stdout, proc.stderr[-3000:]


def test_restart_warning_only_for_a_shared_store_with_restarts() -> None:
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3",
              "TORCHELASTIC_RESTART_COUNT": "0"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_warning(shared)
    assert restart_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None  # fresh store
    assert restart_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert restart_warning({**shared, "TORCHELASTIC_RESTART_COUNT": "1"}) is None  # said once, at the start
    assert restart_warning({}) is None  # not under torchrun
    static = restart_warning({**shared, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # --master-port: shared anyway
    assert "--rdzv-backend c10d" in static and "export" not in static

"""One training job per run directory: a second ``fit`` into a live run directory is refused before it
touches anything; a requeued Slurm job takes over its previous run's lock; ranks other than 0 wait for
their own rank 0 to hold it. Real processes and real ``flock`` locks throughout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.kill_resume import _env, fit_command
from pipeline.errors import ConfigError
from pipeline.run_layout import LOCK_NAME
from pipeline.run_lock import KEY_ENV, RunDirLock, job_key
from tests import preloaded_python
from tests.conftest import REPO

RANK_ENV = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "SLURM_JOB_ID", "SLURM_STEP_ID",
            "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", KEY_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    for k in RANK_ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _wait_for_lock(run_dir: Path, pid: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((run_dir / LOCK_NAME).read_text()).get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, "the first run ended before it held the lock"
        time.sleep(0.1)
    raise AssertionError("the first run never held the lock")


def test_a_second_fit_into_a_live_run_directory_is_refused(digits_shards, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(fit_command(digits_shards, run, 4), env=_env(), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(run, first.pid, first)
        os.kill(first.pid, signal.SIGSTOP)  # it keeps its lock, and the run directory stays as it is
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
        second = preloaded_python.run(fit_command(digits_shards, run, 4), env=_env(), cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        after = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
        os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"run directory {run} is in use by another training job" in second.stderr
        assert f"process {first.pid} on " in second.stderr
        assert "Traceback" not in second.stderr
        assert before == after, "the refused run changed the run directory"
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
            first.wait()
    # ended: the next fit (a resume) takes the lock
    again = preloaded_python.run(fit_command(digits_shards, run, 5), env=_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr


HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"job": "slurm job 77 step 0 restart 0", "slurm_job_id": "77", "restart": 0,
                         "host": "node-a", "pid": os.getpid()}).encode())
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def lock_holder(tmp_path):
    """RUN/.lock held by another process, as Slurm job 77's first run on node-a: (RUN, that process)."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield run, holder
    holder.kill()
    holder.wait()


@pytest.fixture
def held_lock(lock_holder):
    return lock_holder[0]


def test_a_requeued_slurm_job_takes_over_its_previous_runs_lock(held_lock, clean_env, caplog):
    clean_env.setenv("SLURM_JOB_ID", "77")
    clean_env.setenv("SLURM_STEP_ID", "0")
    clean_env.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunDirLock(held_lock)
    lock.acquire()
    try:
        assert "taking over" in caplog.text
        record = json.loads((held_lock / LOCK_NAME).read_text())
        assert record["job"] == "slurm job 77 step 0 restart 1" and record["pid"] == os.getpid()
        assert os.environ[KEY_ENV] == record["job"]
    finally:
        lock.release()
    assert KEY_ENV not in os.environ


def test_a_taken_over_lock_is_held_again_once_the_stuck_holder_lets_go(lock_holder, clean_env, caplog):
    """A takeover runs without the flock (the stuck holder has it). Once that holder's lock is gone, the
    check before the next checkpoint takes it: a new job is then refused at its start; before, it got the
    lock, and this job only learned of it at its next save (and stopped)."""
    import logging

    caplog.set_level(logging.INFO, logger="pipeline.run_lock")
    held_lock, holder = lock_holder
    clean_env.setenv("SLURM_JOB_ID", "77")
    clean_env.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunDirLock(held_lock)
    lock.acquire()
    try:
        assert lock.taken_by() == {} and "holds it now" not in caplog.text  # still held by job 77's first run
        holder.kill()  # the stuck lock is released (the dead node rebooted, its NFS lease expired)
        holder.wait()
        assert lock.taken_by() == {} and "holds it now" in caplog.text
        clean_env.setenv("SLURM_JOB_ID", "78")
        clean_env.setenv("SLURM_RESTART_COUNT", "0")
        clean_env.delenv(KEY_ENV, raising=False)
        with pytest.raises(ConfigError, match="in use by another training job"):
            RunDirLock(held_lock).acquire()
    finally:
        lock.release()


@pytest.mark.parametrize(("job", "restart"), [("77", "0"), ("78", "1"), (None, None)],
                         ids=["same-job-same-run", "another-job", "not-slurm"])
def test_any_other_holder_is_an_error_naming_it(held_lock, clean_env, job, restart):
    if job:
        clean_env.setenv("SLURM_JOB_ID", job)
        clean_env.setenv("SLURM_RESTART_COUNT", restart)
    with pytest.raises(ConfigError, match=r"in use by another training job \(slurm job 77 step 0 restart 0, "
                                          r"host node-a, pid \d+\)"):
        RunDirLock(held_lock).acquire()
    assert KEY_ENV not in os.environ


def test_the_lock_is_free_again_after_release(tmp_path, clean_env):
    first = RunDirLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(ConfigError):
        RunDirLock(tmp_path / "run").acquire()  # flock: another open file, even in this process
    first.release()
    second = RunDirLock(tmp_path / "run")
    second.acquire()
    second.release()


def test_other_ranks_wait_until_the_file_names_their_job(tmp_path, clean_env):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"job": "rendezvous other:1"}))  # another job's old record
    clean_env.setenv("RANK", "1")
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    clean_env.setenv("MASTER_PORT", "12345")
    key = job_key()
    assert key == "rendezvous 10.0.0.1:12345"
    writer = threading.Timer(0.6, lambda: (run / LOCK_NAME).write_text(json.dumps({"job": key})))
    writer.start()
    t0 = time.monotonic()
    RunDirLock(run, wait_s=30).acquire()
    assert time.monotonic() - t0 >= 0.5, "rank 1 went on before its rank 0 named the job"
    writer.join()
    (run / LOCK_NAME).write_text(json.dumps({"job": "rendezvous other:1"}))
    with pytest.raises(ConfigError, match="does not name this job"):
        RunDirLock(run, wait_s=0.5).acquire()


def test_lightnings_own_child_ranks_are_not_rank_zero(clean_env):
    from pipeline.run_lock import is_global_rank_zero

    assert is_global_rank_zero()
    clean_env.setenv("SLURM_PROCID", "0")  # a batch script's step, inherited by the ranks Lightning starts
    clean_env.setenv("LOCAL_RANK", "1")
    assert not is_global_rank_zero()


def test_job_keys_differ_between_live_jobs_and_agree_within_one(clean_env):
    """Two torchrun launches in one Slurm allocation (no srun step between) are different jobs; the nodes of
    one Lightning multi-node launch (NODE_RANK, no RANK) are one job."""
    keys = []
    for port in ("29511", "29512"):
        clean_env.setenv("SLURM_JOB_ID", "5")
        clean_env.setenv("TORCHELASTIC_RUN_ID", "none")
        clean_env.setenv("MASTER_ADDR", "127.0.0.1")
        clean_env.setenv("MASTER_PORT", port)
        keys.append(job_key())
    assert keys[0] != keys[1], keys
    for k in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        clean_env.delenv(k)
    node_keys = []
    for node in ("0", "1"):
        clean_env.setenv("NODE_RANK", node)
        node_keys.append(job_key())
    assert node_keys[0] == node_keys[1] == "rendezvous 127.0.0.1:29512"


FORKING_HOLDER = """
import os, sys, time
from pipeline.run_lock import RunDirLock
RunDirLock(sys.argv[1]).acquire()
child = os.fork()  # as a DataLoader worker is made
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_a_killed_holder_s_forked_workers_do_not_keep_its_lock(tmp_path, clean_env):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(holder.stdout.readline())
    try:
        holder.kill()  # the rank dies (OOM killer); its worker lives on
        holder.wait()
        lock = RunDirLock(run)
        lock.acquire()  # before: refused while the worker lived, naming the dead process
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_second_job_that_got_the_lock_too_stops_this_one_before_its_next_save(digits_shards, tmp_path):
    """Where ``flock`` works within a node only (NFS ``local_lock``, Lustre ``localflock``) a second job on
    another node takes the "lock" too and writes its record. This job sees it at its next checkpoint and
    stops with one line naming that job, before writing anything: ``last.ckpt`` stays at the step before."""
    import torch

    run = tmp_path / "run"
    proc = preloaded_python.run(fit_command(digits_shards, run, 6, [
        "--trainer.callbacks+=tests.preemption_helpers.TakeRunDirAt", "--trainer.callbacks.step=3"]),
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"error: trainer.default_root_dir: run directory {run} was taken by another training job (slurm job "
            f"9999 step 0 restart 0, host node-b, pid 4321, since 2026-12-02T10:00:00+00:00) while this one ran"
            in proc.stderr), proc.stderr[-3000:]
    assert "stops without saving at step 4" in proc.stderr
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3


def test_a_lock_file_that_cannot_be_written_is_an_error_naming_it(tmp_path, clean_env):
    """A full disk at start (the lock record is the first write): an OSError traceback, and the empty lock
    file stayed locked by nobody. Now one error naming the file, and the lock is released."""
    import pipeline.run_lock as run_lock

    def full(fd, length):
        raise OSError(28, "No space left on device")

    with clean_env.context() as patched:
        patched.setattr(run_lock.os, "ftruncate", full)
        lock = RunDirLock(tmp_path / "run")
        with pytest.raises(ConfigError, match=r"trainer.default_root_dir: cannot write .*\.lock: No space left"):
            lock.acquire()
    again = RunDirLock(tmp_path / "run")
    again.acquire()  # not held by the failed attempt
    again.release()


def test_a_refused_fit_leaves_no_new_run_directory_behind(digits_shards, tmp_path, clean_env):
    """A mistyped setting refused after the lock was taken left a run directory holding only ``.lock``
    (`launch status` then showed a run that never was). A directory that existed, or that the run wrote
    into, stays as it is."""
    from tests.conftest import run_cli_in_process

    new = tmp_path / "runs" / "typo"
    out = run_cli_in_process("fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(tmp_path / "nope"),
                             "--trainer.default_root_dir", str(new), "--tracking.wandb", "false")
    assert out.returncode == 2 and "data.root" in out.stderr, out.stderr
    assert not new.exists() and (tmp_path / "runs").is_dir()
    # a split the manifest lacks, with W&B on: refused before W&B starts (its files kept the directory)
    out = run_cli_in_process("fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
                             "--data.val_split", "vall", "--trainer.default_root_dir", str(new),
                             "--tracking.wandb", "true", env={"WANDB_MODE": "offline"})
    assert out.returncode == 2 and "data.val_split: split 'vall' is not in" in out.stderr, out.stderr
    assert not new.exists(), sorted(p.relative_to(new).as_posix() for p in new.rglob("*"))
    # a batch larger than the split (known once the trainer has its ranks): also before W&B starts
    out = run_cli_in_process("fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
                             "--data.batch_size", "100000", "--trainer.default_root_dir", str(new),
                             "--tracking.wandb", "true", env={"WANDB_MODE": "offline"})
    assert out.returncode == 2 and "fewer than one global batch (1 rank x data.batch_size 100000" in out.stderr, \
        out.stderr
    assert not new.exists(), sorted(p.relative_to(new).as_posix() for p in new.rglob("*"))
    # a cosine schedule without a run length (needs the built trainer's max_steps / max_epochs): the same
    out = run_cli_in_process("fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
                             "--model.schedule", "cosine", "--trainer.max_steps", "-1", "--trainer.max_epochs", "-1",
                             "--trainer.default_root_dir", str(new), "--tracking.wandb", "true",
                             env={"WANDB_MODE": "offline"})
    assert out.returncode == 2 and "model.schedule: cosine decays over the run's length" in out.stderr, out.stderr
    assert not new.exists(), sorted(p.relative_to(new).as_posix() for p in new.rglob("*"))
    from tests.conftest import run_module  # config_check says so too, for a config that says how many ranks

    out = run_module("pipeline.config_check", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root",
                     str(digits_shards), "--data.batch_size", "1000", "--trainer.devices", "2", check=False)
    assert out.returncode == 2 and "fewer than one global batch (2 ranks x data.batch_size 1000" in out.stderr, \
        out.stderr
    out = run_module("pipeline.config_check", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root",
                     str(digits_shards), "--data.batch_size", "1000", "--trainer.devices", "0,1", check=False)
    assert out.returncode == 2 and "fewer than one global batch (2 ranks x data.batch_size 1000" in out.stderr, \
        out.stderr  # GPU indices: two ranks too (this check skipped them)

    old = tmp_path / "runs" / "old"
    old.mkdir()
    out = run_cli_in_process("fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(tmp_path / "nope"),
                             "--trainer.default_root_dir", str(old), "--tracking.wandb", "false")
    assert out.returncode == 2 and (old / LOCK_NAME).is_file()

    used = RunDirLock(tmp_path / "runs" / "used")
    used.acquire()
    (used.run_dir / "config.yaml").write_text("x: 1\n")
    used.release()
    assert sorted(p.name for p in used.run_dir.iterdir()) == [LOCK_NAME, "config.yaml"]


def test_a_refused_start_leaves_the_run_s_last_training_job_named(digits_shards, tmp_path, clean_env):
    """A start refused after it took the lock (here: another network than the checkpoint's) left its own record
    in ``RUN/.lock``: ``launch status`` named the refused process as the run's last training job, timestamped
    after the training had ended. The record it wrote over is put back; a start whose fit began stays."""
    from pipeline.run_lock import holder
    from tests.conftest import run_module

    run = tmp_path / "run"
    args = ["pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
            "--trainer.default_root_dir", str(run), "--tracking.wandb", "false", "--data.num_workers", "0",
            "--trainer.limit_val_batches", "1"]
    run_module(*args, "--model.arch", "cifar_resnet8", "--trainer.max_steps", "2")
    _, first = holder(run)
    assert first.get("pid"), first
    refused = run_module(*args, "--model.arch", "cifar_resnet20", "--trainer.max_steps", "4", check=False)
    assert refused.returncode == 2 and "model.arch" in refused.stderr, refused.stderr[-3000:]
    held, after = holder(run)
    assert held is False and after == first, (first, after)
    run_module(*args, "--model.arch", "cifar_resnet8", "--trainer.max_steps", "3")
    assert holder(run)[1]["pid"] not in (first["pid"], refused.pid if hasattr(refused, "pid") else None)


def test_a_complete_run_restarted_by_two_ranks_of_their_own_ends_both(digits_shards, tmp_path, clean_env):
    """srun's tasks (or torchrun's workers) each start the command: rank 1 waits until ``RUN/.lock`` names its job.
    Rank 0 finds the run complete and ends (exit 0); a refused start's putting back the earlier record must not
    take its job's name away from a rank that has not read the file yet (it waited 30 minutes, then failed)."""
    from pipeline.run_lock import holder
    from tests.conftest import free_port, run_module

    run = tmp_path / "run"
    args = ["pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
            "--trainer.default_root_dir", str(run), "--tracking.wandb", "false", "--data.num_workers", "0",
            "--model.arch", "cifar_resnet8", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
    run_module(*args)
    job = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    first = run_module(*args, env={**job, "RANK": "0", "LOCAL_RANK": "0"}, check=False)
    assert first.returncode == 0 and "the run is complete" in first.stderr, first.stderr[-3000:]
    assert holder(run)[1]["job"] == f"rendezvous 127.0.0.1:{job['MASTER_PORT']}", holder(run)  # its job, kept
    late = run_module(*args, env={**job, "RANK": "1", "LOCAL_RANK": "1"}, check=False, timeout=120)
    assert late.returncode == 0 and "in use by another training job" not in late.stderr, late.stderr[-3000:]

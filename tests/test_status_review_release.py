"""The last seconds of a training job: its trainer has let go of RUN/.lock (``RunDirLock.release`` in the CLI's
``finally``), W&B still finishes and Slurm still says RUNNING. ``launch status`` blamed the file system
("locks on this file system may stay within a node, e.g. Lustre's localflock"); the record now says when its job
let go (``released``), and status says the job is ending. Real locks, real records, real processes; the Slurm
clients are stand-ins answering as Slurm 22.05 does."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.run_layout import LOCK_NAME
from pipeline.run_lock import KEY_ENV, RunDirLock, holder

REPO = Path(__file__).resolve().parents[1]
RANK_ENV = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "SLURM_JOB_ID", "SLURM_STEP_ID",
            "SLURM_RESTART_COUNT", "SLURM_NTASKS", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
            "MASTER_ADDR", "MASTER_PORT",
            KEY_ENV)


@pytest.fixture
def slurm_job(monkeypatch):
    """This process as rank 0 of a Slurm job: ``slurm_job(28, restart=0)`` sets its variables."""
    for k in RANK_ENV:
        monkeypatch.delenv(k, raising=False)

    def become(job: int, restart: int = 0) -> None:
        monkeypatch.delenv(KEY_ENV, raising=False)
        monkeypatch.setenv("SLURM_JOB_ID", str(job))
        monkeypatch.setenv("SLURM_STEP_ID", "0")
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
    return become


def _record(run: Path) -> dict:
    return json.loads((run / LOCK_NAME).read_text())


def _training_start(run: Path) -> RunDirLock:
    """A start that holds the run and whose fit began (a config written, so its directory stays)."""
    lock = RunDirLock(run)
    lock.acquire()
    lock.fit_started()
    (run / "config.yaml").write_text("x: 1\n")
    return lock


def test_release_stamps_the_record_of_its_own_job(tmp_path: Path, slurm_job) -> None:
    run = tmp_path / "run"
    slurm_job(28)
    lock = RunDirLock(run)
    lock.acquire()
    lock.fit_started()
    (run / "config.yaml").write_text("x: 1\n")  # a run under way (a refused start's new directory would go)
    before = _record(run)
    assert "released" not in before
    t0 = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    lock.release()
    after = _record(run)
    released = datetime.datetime.fromisoformat(after.pop("released"))
    assert after == before  # the same record, the time it let go added
    assert released.tzinfo is not None and t0 <= released <= datetime.datetime.now(datetime.timezone.utc)
    assert holder(run) == (False, {**before, "released": released.isoformat()})


def test_a_refused_start_puts_back_the_stamped_record_and_stamps_nothing_of_its_own(tmp_path: Path,
                                                                                    slurm_job) -> None:
    """A start refused before its fit began puts back the record it wrote over (the run's last training job,
    with that job's own ``released``); it adds no stamp, neither to its own record nor to the one put back."""
    run = tmp_path / "run"
    slurm_job(28)
    _training_start(run).release()
    trained = _record(run)
    assert "released" in trained
    slurm_job(29)
    refused = RunDirLock(run)
    refused.acquire()
    assert _record(run)["slurm_job_id"] == "29" and "released" not in _record(run)
    refused.release()  # no fit_started: refused at its checks
    assert _record(run) == trained
    # a start whose fit began stays the last holder, stamped
    slurm_job(30)
    later = RunDirLock(run)
    later.acquire()
    later.fit_started()
    later.release()
    assert _record(run)["slurm_job_id"] == "30" and "released" in _record(run)


def test_a_record_another_job_wrote_meanwhile_is_not_stamped(tmp_path: Path, slurm_job) -> None:
    """Locks that do not reach across nodes: a second job on another node wrote its own record into RUN/.lock
    while this one ran. This job's release leaves that record alone (the other job holds the run now)."""
    run = tmp_path / "run"
    slurm_job(28)
    lock = _training_start(run)
    other = {"job": "slurm job 31 step 0 restart 0", "slurm_job_id": "31", "restart": 0, "host": "n2", "pid": 7,
             "since": "2026-12-07T10:00:00+00:00"}
    (run / LOCK_NAME).write_text(json.dumps(other) + "\n")
    assert lock.taken_by() == other  # what RunDirStillOurs compares: by "job" alone
    lock.release()
    assert _record(run) == other


def test_a_stamped_record_does_not_look_like_another_job_to_its_own_ranks(tmp_path: Path, slurm_job) -> None:
    """The other readers of the record compare its "job" key alone: the extra key changes none of them."""
    from pipeline.run_lock import _previous_run_of_this_job, _read, describe

    run = tmp_path / "run"
    slurm_job(28)
    lock = _training_start(run)
    lock.release()
    record = _read(run / LOCK_NAME)
    assert "released" in record
    assert describe(record) == f"slurm job 28 step 0 restart 0, host {record['host']}, pid {record['pid']}, " \
                               f"since {record['since']}"
    slurm_job(28, restart=1)  # the requeued job's next start takes over its earlier run's record
    assert _previous_run_of_this_job(record)
    again = RunDirLock(run)
    again.acquire()
    try:
        assert again.taken_by() == {} and "released" not in _record(run)
    finally:
        again.release()


STARTS_AND_ENDS = """
import sys
from pipeline.run_lock import RunDirLock
lock = RunDirLock(sys.argv[1])
lock.acquire()
lock.fit_started()
open(sys.argv[1] + "/config.yaml", "w").write("x: 1\\n")
lock.release()  # pipeline/cli.py's finally; W&B finishing and the process exiting come after it
"""


def _stand_ins(tmp_path: Path, state: str) -> dict[str, str]:
    """sacct saying job 28 is in ``state``; squeue and scontrol knowing nothing more."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "sacct").write_text(f"#!/bin/sh\nprintf '28|train-demo|{state}|00:05:00|0:0|None\\n'\n")
    (bindir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sacct", "squeue", "scontrol"):
        (bindir / tool).chmod(0o755)
    return {"PATH": f"{bindir}:/usr/bin:/bin"}


def _status(run: Path, tmp_path: Path, env: dict[str, str]) -> str:
    r = subprocess.run([sys.executable, "-m", "launch", "status", str(run)], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_status_says_a_job_that_released_its_run_directory_is_ending(tmp_path: Path) -> None:
    """Job 28's trainer (a real process, Slurm's variables set) took the lock, trained, and let go; Slurm still
    says RUNNING. It was "probably now: ... locks on this file system may stay within a node"."""
    from launch.rundir import record_job

    run = tmp_path / "run"
    record_job(run, "28", "train", run / "train.sbatch")
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env.update(SLURM_JOB_ID="28", SLURM_STEP_ID="0", SLURM_RESTART_COUNT="0", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", STARTS_AND_ENDS, str(run)], env=env, check=True, timeout=120)
    record = _record(run)
    text = _status(run, tmp_path, _stand_ins(tmp_path, "RUNNING"))
    line = next(line for line in text.splitlines() if line.startswith("training"))
    assert line == (f"training     ending: slurm job 28 released the run directory at {record['released']} and is "
                    f"exiting (Slurm still says RUNNING; last: slurm job 28 step 0 restart 0, host {record['host']}, "
                    f"pid {record['pid']}, since {record['since']})"), text
    assert "localflock" not in text
    # once Slurm says it ended: as before
    text = _status(run, tmp_path, _stand_ins(tmp_path, "COMPLETED"))
    assert "training     not now (last: slurm job 28 step 0 restart 0, host " in text, text

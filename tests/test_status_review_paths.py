"""What ``launch status`` says of a path that is not a run directory: ``RUN/checkpoints`` (it said ``jobs none``
and ``checkpoint none yet`` of a folder holding last.ckpt, exit 0), a checkpoint in it, and a path that is not
there at all (it said "is not a directory")."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_SLURM = {"PATH": "/nonexistent-no-slurm-here"}


def _status(path: Path | str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launch", "status", str(path)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **NO_SLURM}, timeout=120)


def _run(tmp_path: Path) -> Path:
    """A run directory as a job leaves it: its job record, config, W&B id and checkpoints/last.ckpt."""
    from launch.rundir import record_job

    run = tmp_path / "runs" / "r50"
    record_job(run, "28", "train", run / "train.sbatch")
    (run / "config.yaml").write_text("trainer: {}\n")
    (run / "wandb_run_id").write_text("abc123xy\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    (run / "checkpoints" / "best-epoch000-step0000004-top1=0.5000.ckpt").write_bytes(b"a checkpoint")
    return run


def test_the_checkpoints_folder_given_as_the_run_directory_is_refused_naming_the_run(tmp_path: Path) -> None:
    run = _run(tmp_path)
    for given, what in ((run / "checkpoints", "the checkpoints folder"),
                        (Path("runs/r50/checkpoints"), "the checkpoints folder")):
        r = _status(given, tmp_path)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (r.stdout, r.stderr)
        assert r.stderr == (f"launch: error: RUN_DIR: {str(given)!r} is {what} of a run, not its run directory, "
                            f"which is {given.parent}: `python -m launch status {given.parent}`\n"), r.stderr
    # a DeepSpeed checkpoint (a directory), a checkpoint file
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "checkpoints" / "last.ckpt" / "checkpoint").mkdir(parents=True)
    r = _status(run / "checkpoints" / "last.ckpt", tmp_path)
    assert r.returncode == 2 and r.stderr == (
        f"launch: error: RUN_DIR: {str(run / 'checkpoints' / 'last.ckpt')!r} is a checkpoint of a run, not its run "
        f"directory, which is {run}: `python -m launch status {run}`\n"), r.stderr
    best = run / "checkpoints" / "best-epoch000-step0000004-top1=0.5000.ckpt"
    r = _status(best, tmp_path)
    assert r.returncode == 2 and r.stderr == (
        f"launch: error: RUN_DIR: {str(best)!r} is a checkpoint, not a directory; its run directory is {run}: "
        f"`python -m launch status {run}`\n"), r.stderr
    # the run directory itself: its report, as before
    r = _status(run, tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"run dir      {run.resolve()}\n"), r.stderr


def test_a_sweep_folder_named_checkpoints_is_still_a_folder_of_runs(tmp_path: Path) -> None:
    """A folder of run directories that happens to be called ``checkpoints`` is listed, one line per run."""
    from launch.rundir import record_job

    sweep = tmp_path / "checkpoints"
    record_job(sweep / "a-seed0", "51", "train", sweep / "a-seed0" / "train.sbatch")
    r = _status(sweep, tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"runs in {sweep.resolve()}: 1"), (r.stdout, r.stderr)
    # an empty one, with no run beside it: nothing to point at; the report of an empty run directory, as before
    empty = tmp_path / "elsewhere" / "checkpoints"
    empty.mkdir(parents=True)
    r = _status(empty, tmp_path)
    assert r.returncode == 0 and "checkpoint   none yet" in r.stdout, (r.stdout, r.stderr)


def test_a_path_that_is_not_there_is_said_to_not_exist(tmp_path: Path) -> None:
    r = _status(tmp_path / "no" / "such" / "run", tmp_path)
    assert r.returncode == 2 and r.stderr == (
        f"launch: error: RUN_DIR: {str(tmp_path / 'no' / 'such' / 'run')!r} does not exist\n"), r.stderr
    (tmp_path / "notes.txt").write_text("x\n")
    r = _status(tmp_path / "notes.txt", tmp_path)
    assert r.returncode == 2 and r.stderr == (
        f"launch: error: RUN_DIR: {str(tmp_path / 'notes.txt')!r} is not a directory\n"), r.stderr

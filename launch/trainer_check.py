"""Before ``sbatch``: would the trainer accept the job's command line?

A misspelt key (``model.lrr``) or a value out of range in the config or after ``--`` fails the job at its
first line, after its wait in the queue (hours, for a multi-node job). ``python -m pipeline.config_check``
parses the job's exact arguments with the trainer's own parser and checks, building no trainer (about 6 s:
it imports Lightning, which the launcher itself does not).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from launch.errors import LaunchError
from launch.scripts import TrainJob

TIMEOUT_S = 300


def check_trainer_settings(job: TrainJob, python: str = sys.executable, origin: str | None = None) -> list[str]:
    """``check_trainer_args`` of a Slurm job's command line; of a branch (``origin``: ``--branch-from``, recorded
    once the checks pass), with the origin its first start starts from in place of ``last``."""
    args = job.trainer_args()
    if origin is not None and args[-2:] == ["--ckpt_path", "last"]:
        args[-1] = origin
    return check_trainer_args(args, job.workdir, python)


def check_trainer_args(args: list[str], workdir: Path, python: str = sys.executable) -> list[str]:
    """The ``warning:`` lines of the check of ``python -m pipeline ARGS`` (paths this machine cannot see); a
    refusal is a LaunchError with the trainer's ``error:`` line. A check that cannot run (this Python lacks the
    trainer's packages, as a login node may when the job runs in a container) is a warning too: the job
    checks again at its start."""
    argv = [python, "-m", "pipeline.config_check", *args]
    skip = "trainer settings not checked before submitting"
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=workdir)
    except subprocess.TimeoutExpired:
        return [f"warning: {skip}: `python -m pipeline.config_check` took over {TIMEOUT_S} s"]
    except OSError as e:
        return [f"warning: {skip}: cannot run {python}: {e}"]
    lines = r.stderr.splitlines()
    warnings = [line for line in lines if line.startswith("warning: ")]
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    if r.returncode == 0:
        return warnings
    if r.returncode == 2 and errors:
        raise LaunchError(f"the trainer would refuse this job at its start: {errors[-1]}")
    last = next((line for line in reversed(lines) if line.strip()), "no output")
    return warnings + [f"warning: {skip}: `python -m pipeline.config_check` failed (exit {r.returncode}): {last}"]

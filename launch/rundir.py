"""The run directory: one per training run, it holds the job script, Slurm logs, checkpoints, the W&B
run id (generated once, reused by every requeue and resubmission) and the list of submitted jobs."""

from __future__ import annotations

import json
import secrets
import string
from pathlib import Path

from launch.errors import LaunchError
from pipeline.run_id_file import BadRunIdFile, create_run_id, read_run_id
from pipeline.run_layout import JOBS_FILE


def wandb_run_id(run_dir: Path, create: bool = True) -> str | None:
    """The run directory's fixed W&B id (``pipeline.run_id_file``); created (8 lowercase letters/digits, W&B's
    own style) on first use. A file that holds no id is an error: an empty WANDB_RUN_ID would start a new
    W&B run at every start of the job."""
    try:
        found = read_run_id(run_dir)
    except BadRunIdFile as e:
        raise LaunchError(f"{e}: write the run's id there (its train.sbatch exports it as WANDB_RUN_ID) or delete "
                          f"the file to start a new W&B run") from None
    if found is not None or not create:
        return found
    alphabet = string.ascii_lowercase + string.digits
    return create_run_id(run_dir, "".join(secrets.choice(alphabet) for _ in range(8)))


def record_job(run_dir: Path, job_id: str, kind: str, script: Path, out: Path | None = None,
               splits: list[str] | None = None) -> None:
    """Append a submitted job to RUN_DIR/jobs.jsonl so `launch status` knows what to ask Slurm about (and,
    for a prep job, which OUT to read its progress from, and which of its splits the job writes)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / JOBS_FILE
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:  # after a torn last line, on a line of its own, so this record stays readable
        f.write(("\n" if torn else "") + json.dumps({"job_id": job_id, "kind": kind, "script": str(script),
                                                     **({"out": str(out)} if out is not None else {}),
                                                     **({"splits": splits} if splits is not None else {})}) + "\n")


class BadJobsFile(LaunchError):
    """RUN/jobs.jsonl has a line that is not a job record (torn by a full disk, edited by hand)."""


def recorded_jobs(run_dir: Path) -> list[dict[str, str]]:
    """Jobs submitted for this run directory, oldest first. A line that is not a job record is an error naming
    it: skipping it could hide a train job that still runs (see ``launch.cli._refuse_if_training``)."""
    path = run_dir / JOBS_FILE
    if not path.is_file():
        return []
    jobs = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError:
            job = None
        if not isinstance(job, dict) or not isinstance(job.get("job_id"), str):
            raise BadJobsFile(f"{path} line {n}: not a job record ({line[:60]!r}); each line is a JSON object with "
                              f'a "job_id": correct or delete that line')
        jobs.append(job)
    return jobs

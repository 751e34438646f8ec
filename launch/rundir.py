"""The run directory: one per training run, it holds the job script, Slurm logs, checkpoints, the W&B
run id (generated once, reused by every requeue and resubmission) and the list of submitted jobs."""

from __future__ import annotations

import json
import secrets
import string
from pathlib import Path

WANDB_ID_FILE = "wandb_run_id"
JOBS_FILE = "jobs.jsonl"


def wandb_run_id(run_dir: Path, create: bool = True) -> str | None:
    """The run directory's fixed W&B id; created (8 lowercase letters/digits, W&B's own style) on first use."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    if not create:
        return None
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def record_job(run_dir: Path, job_id: str, kind: str, script: Path) -> None:
    """Append a submitted job to RUN_DIR/jobs.jsonl so `launch status` knows what to ask Slurm about."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / JOBS_FILE, "a") as f:
        f.write(json.dumps({"job_id": job_id, "kind": kind, "script": str(script)}) + "\n")


def recorded_jobs(run_dir: Path) -> list[dict[str, str]]:
    """Jobs submitted for this run directory, oldest first."""
    path = run_dir / JOBS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

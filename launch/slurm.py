"""Thin wrappers over the Slurm client commands (sbatch, squeue, sacct, scontrol).

They run the real binaries; a missing binary or a failing command becomes a LaunchError that quotes
Slurm's own message.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launch.errors import LaunchError


def run_client(cmd: list[str], timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command; a missing binary or a hang becomes a LaunchError."""
    if shutil.which(cmd[0]) is None:
        raise LaunchError(f"{cmd[0]}: command not found (is this a Slurm login node? is SLURM_CONF set?)")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise LaunchError(f"{cmd[0]}: no answer within {timeout:.0f} s") from e


def said(proc: subprocess.CompletedProcess) -> str:
    """What a Slurm client printed when it failed, as one line: its error lines joined by '; ' (squeue with no
    usable slurm.conf prints three: the file it could not read, the missing ClusterName, the fatal one)."""
    text = proc.stderr.strip() or proc.stdout.strip()
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or f"exit code {proc.returncode}"


def sbatch(script: Path, extra: list[str] | None = None) -> str:
    """Submit a script; returns the job id (``--parsable`` output, cluster suffix removed)."""
    proc = run_client(["sbatch", "--parsable", *(extra or []), str(script)], cwd=script.parent)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch {script} failed: {said(proc)}")  # sbatch may say it in two lines
    return proc.stdout.strip().split(";")[0]


def scancel(job_id: str) -> None:
    """Cancel a job; Slurm's refusal becomes a LaunchError quoting it."""
    proc = run_client(["scancel", job_id])
    if proc.returncode != 0:
        raise LaunchError(f"scancel {job_id} failed: {said(proc)}")


# Why Slurm keeps a pending job waiting when no other job's end can start it: the request is over what the
# partition's nodes or limits allow, or over a per-job limit of the QOS or account. Under EnforcePartLimits=NO
# (Slurm's default) sbatch accepts such a job, sets this reason as it accepts it, and the job waits until an
# admin changes the configuration. Resources, Priority, a down node, a user's or group's running total: the job
# starts later, so those are not here.
NEVER_STARTS = {
    # at submit Slurm says PartitionConfig of all of these; its scheduler names some more precisely later
    "PartitionConfig": "the job asks for more than the partition has or allows (more nodes than it has or than "
                       "its MaxNodes, more CPUs, GPUs or memory than a node has, a --time over its MaxTime)",
    "PartitionNodeLimit": "the node count is outside the partition's MinNodes..MaxNodes",
    "PartitionTimeLimit": "--time is over the partition's MaxTime",
}
_PER_JOB_LIMIT = re.compile(r"(QOS|Assoc)Max\w*PerJob\w*")  # QOSMaxNodePerJobLimit, AssocMaxWallDurationPerJobLimit


def never_starts(job_id: str) -> tuple[str, str] | None:
    """(Slurm's reason, what it means) when the just-submitted ``job_id`` waits for a change of configuration
    (``NEVER_STARTS``), else None; also None when squeue cannot tell (the job stays as submitted)."""
    try:
        rows = squeue([job_id])
    except LaunchError:
        return None
    for row in rows:
        if row.state != "PENDING":
            continue
        if row.reason in NEVER_STARTS:
            return row.reason, NEVER_STARTS[row.reason]
        if _PER_JOB_LIMIT.fullmatch(row.reason):
            return row.reason, "over a per-job limit of the job's QOS or account (`sacctmgr show qos`, `sacctmgr show assoc`)"
    return None


@dataclass
class JobRow:
    """One line of job accounting, whichever command produced it."""

    job_id: str
    name: str
    state: str
    elapsed: str
    restarts: int | None = None
    exit_code: str = ""
    reason: str = ""


# A job that has ended for good. squeue lists such jobs only where asked to (`-t all`, SQUEUE_STATES=all in
# the user's environment), until MinJobAge; in any other state a job may still run, or run again (pending,
# held, requeued, suspended, completing, ...).
FINISHED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                             "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT"})


def squeue(job_ids: list[str]) -> list[JobRow]:
    """Queued/running jobs among ``job_ids`` (array tasks expanded)."""
    if not job_ids:
        return []
    proc = run_client(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%j|%T|%M|%r"])
    if proc.returncode != 0:
        # squeue fails for ids it no longer knows; that only means nothing is queued
        if "Invalid job id" in proc.stderr:
            return []
        raise LaunchError(f"squeue failed: {said(proc)}")
    rows = []
    for line in proc.stdout.splitlines():
        jid, name, state, elapsed, reason = (line.split("|") + [""] * 5)[:5]
        rows.append(JobRow(jid, name, state, elapsed, reason=reason if reason != "None" else ""))
    return rows


def scontrol_restarts(job_id: str) -> int | None:
    """Requeue count Slurm keeps for a job it still remembers (``Restarts=``), else None."""
    proc = run_client(["scontrol", "-o", "show", "job", job_id])
    if proc.returncode != 0:
        return None
    for tok in proc.stdout.split():
        if tok.startswith("Restarts="):
            return int(tok.split("=", 1)[1])
    return None


class SacctUnavailable(Exception):
    """sacct exists but accounting is off (no slurmdbd), or it is not installed."""


def sacct(job_ids: list[str]) -> list[JobRow]:
    """Accounting rows for ``job_ids``, one per job (allocation), requeues folded into ``restarts``.

    ``sacct -D`` lists every run of a requeued job (state REQUEUED for the interrupted ones); the last
    record is the current state. ``Reason`` is why a pending job waits (Priority, Resources, BeginTime, ...).
    """
    if shutil.which("sacct") is None:
        raise SacctUnavailable("sacct is not installed")
    proc = run_client(["sacct", "-n", "-P", "-X", "-D", "-j", ",".join(job_ids),
                 "--format=JobID,JobName,State,Elapsed,ExitCode,Reason"])
    if proc.returncode != 0 or "accounting storage is disabled" in proc.stderr.lower():
        raise SacctUnavailable(proc.stderr.strip() or f"sacct exit code {proc.returncode}")
    by_id: dict[str, JobRow] = {}
    for line in proc.stdout.splitlines():
        jid, name, state, elapsed, exit_code, reason = (line.split("|") + [""] * 6)[:6]
        row = by_id.get(jid)
        restarts = 0 if row is None else (row.restarts or 0) + 1
        by_id[jid] = JobRow(jid, name, state.split()[0] if state else state, elapsed, restarts, exit_code,
                            reason if reason != "None" else "")
    return list(by_id.values())


"""`launch status RUN_DIR`: where a run stands, from Slurm (sacct, or squeue/scontrol when accounting
is off) and from the run directory (checkpoint step, throughput, W&B id, job log restart lines)."""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

from launch import slurm
from launch.checkpoints import latest_checkpoint, recent_throughput
from launch.errors import LaunchError
from launch.rundir import recorded_jobs, wandb_run_id

_RESTART_LINE = re.compile(r"^launch: job (\d+) restart (\d+)", re.MULTILINE)


def log_restarts(run_dir: Path) -> dict[str, int]:
    """Highest SLURM_RESTART_COUNT each job printed into its log (works with no Slurm at all)."""
    seen: dict[str, int] = {}
    for log in run_dir.glob("slurm-*.out"):
        for jid, n in _RESTART_LINE.findall(log.read_text(errors="replace")):
            seen[jid] = max(seen.get(jid, 0), int(n))
    return seen


def job_ids(run_dir: Path) -> list[str]:
    """Jobs of a run: those `launch submit` recorded plus any whose log is in the directory (a script
    resubmitted by hand with `sbatch RUN_DIR/train.sbatch` logs there too)."""
    ids = [j["job_id"] for j in recorded_jobs(run_dir)]
    for log in sorted(run_dir.glob("slurm-*.out")):
        jid = log.stem.split("-", 1)[1]
        if jid.isdigit() and jid not in ids:
            ids.append(jid)
    return ids


def _table(rows: list[slurm.JobRow]) -> list[str]:
    out = [f"  {'JOBID':<14} {'NAME':<30} {'STATE':<12} {'ELAPSED':>10} {'RESTARTS':>8}  {'EXIT/REASON'}"]
    for r in rows:
        restarts = "-" if r.restarts is None else str(r.restarts)
        out.append(f"  {r.job_id:<14} {r.name[:30]:<30} {r.state:<12} {r.elapsed:>10} {restarts:>8}  "
                   f"{r.exit_code or r.reason}")
    return out


def report(run_dir: Path) -> str:
    """The status text for one run directory."""
    if not run_dir.is_dir():
        raise LaunchError(f"RUN_DIR: {str(run_dir)!r} is not a directory")
    lines = [f"run dir      {run_dir.resolve()}"]
    ids = job_ids(run_dir)
    if not ids:
        lines.append("jobs         none (no jobs.jsonl and no slurm-<job>.out in the run directory)")
    else:
        try:
            rows = slurm.sacct(ids)
            lines.append("jobs (sacct):")
        except slurm.SacctUnavailable as e:
            msg = str(e).splitlines()[0] if str(e) else "unknown reason"
            lines.append(f"jobs (squeue/scontrol; sacct unavailable: {msg}; finished jobs are not listed):")
            rows = slurm.squeue(ids)
            for r in rows:
                r.restarts = slurm.scontrol_restarts(r.job_id.split("_")[0])
        lines += _table(rows) if rows else ["  (none queued or running)"]
        restarts = {r.job_id: r.restarts for r in rows if r.restarts}
        from_logs = log_restarts(run_dir)
        total = max([*restarts.values(), *from_logs.values(), 0])
        detail = ", ".join(f"job {j}: {n}" for j, n in sorted(from_logs.items()) if n) or "none in job logs"
        lines.append(f"requeues     {total} ({detail})")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        lines.append("checkpoint   none yet")
    else:
        try:
            mtime = ckpt.path.stat().st_mtime
            when = _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        except FileNotFoundError:  # replaced by the running trainer since it was read
            when = "since replaced"
        lines.append(f"checkpoint   {ckpt.path}  global_step {ckpt.global_step}  epoch {ckpt.epoch}  ({when})")
    tp = recent_throughput(run_dir)
    if tp is not None:
        at = f" at step {tp.step}" if tp.step is not None else ""
        lines.append(f"throughput   {tp.value:.1f} img/s{at} ({tp.column} in {tp.source})")
    rid = wandb_run_id(run_dir, create=False)
    lines.append(f"W&B run id   {rid or 'none'}")
    return "\n".join(lines)


def queue_report() -> str:
    """No run directory given: the current user's queue."""
    proc = slurm.run_client(["squeue", "--me", "-o", "%.12i %.24j %.10T %.10M %.6D %R"])
    if proc.returncode != 0:
        raise LaunchError(f"squeue failed: {proc.stderr.strip()}")
    return proc.stdout.rstrip()

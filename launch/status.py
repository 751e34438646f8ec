"""`launch status RUN_DIR`: where a run stands, from Slurm (sacct, or squeue/scontrol when accounting
is off) and from the run directory (who trains in it now, checkpoint step, throughput, W&B id, job log
restart lines). A folder of run directories (a sweep's ``--runs``) gets one line per run instead."""

from __future__ import annotations

import datetime as _dt
import re
import shlex
from pathlib import Path

from launch import slurm
from launch.checkpoints import CheckpointInfo, ThroughputReading, best_checkpoint, latest_checkpoint, payload, recent_throughput
from launch.errors import LaunchError
from launch.rundir import recorded_jobs, wandb_run_id
from data_prep import output_status
from pipeline import provenance, run_lock
from pipeline.branch_record import recorded_origin
from pipeline.run_layout import CONFIG_FILE, LOCK_NAME, RUN_ID_FILE, SLURM_LOG_GLOB, checkpoint_dir, slurm_log

_RESTART_LINE = re.compile(r"^launch: job (\d+) restart (\d+)", re.MULTILINE)


def log_restarts(run_dir: Path) -> dict[str, int]:
    """Highest SLURM_RESTART_COUNT each job printed into its log (works with no Slurm at all)."""
    seen: dict[str, int] = {}
    for log in run_dir.glob(SLURM_LOG_GLOB):
        for jid, n in _RESTART_LINE.findall(log.read_text(errors="replace")):
            seen[jid] = max(seen.get(jid, 0), int(n))
    return seen


def job_ids(run_dir: Path) -> list[str]:
    """Jobs of a run: those `launch submit` recorded plus any whose log is in the directory (a script
    resubmitted by hand with `sbatch RUN_DIR/train.sbatch` logs there too)."""
    ids = [j["job_id"] for j in recorded_jobs(run_dir)]
    for log in sorted(run_dir.glob(SLURM_LOG_GLOB)):
        jid = log.stem.split("-", 1)[1]
        if jid.isdigit() and jid not in ids:
            ids.append(jid)
    return ids


def active_train_jobs(run_dir: Path) -> list[slurm.JobRow]:
    """Train jobs of the run directory that Slurm has not finished with (queued, held, running, requeued,
    ...): each would write and resume from the same checkpoints/last.ckpt. Those `launch submit` recorded and
    those whose log is in the directory (``sbatch RUN/train.sbatch`` by hand). A job squeue no longer knows
    is over. Raises a one-line LaunchError when squeue cannot be asked."""
    ids = [j["job_id"] for j in recorded_jobs(run_dir) if j.get("kind") == "train"]
    ids += [i for i in job_ids(run_dir) if i not in ids and slurm_log(run_dir, i).exists()]
    return _active(ids)


def active_prep_jobs(run_dir: Path, out: Path, splits: list[str]) -> list[slurm.JobRow]:
    """Prep jobs (array tasks, finalize) recorded in ``run_dir`` for any of ``splits`` of shard directory
    ``out`` that Slurm has not finished with: a second one would build the same shards at the same time.
    Jobs of other splits may run (their finalize jobs take turns on manifest.json: data_prep's
    ``manifest_lock``); a record without its splits (written by an older launcher) counts as all of them.
    Submissions recorded in another ``--run-dir`` are not seen."""
    ids = [j["job_id"] for j in recorded_jobs(run_dir)
           if str(j.get("kind", "")).startswith("prep") and j.get("out") and Path(j["out"]).resolve() == out.resolve()
           and (not isinstance(j.get("splits"), list) or set(j["splits"]) & set(splits))]
    return _active(ids)


def _active(ids: list[str]) -> list[slurm.JobRow]:
    if not ids:
        return []
    try:
        rows = slurm.squeue(ids)
    except LaunchError as e:
        raise LaunchError(_first_error_line(str(e))) from e
    return [r for r in rows if r.state not in slurm.FINISHED_STATES]


def _table(rows: list[slurm.JobRow]) -> list[str]:
    """One line per job; names in full (job names of a run share their first 30 characters: `train-<config>`).
    The last column is why a pending job waits (Slurm's reason: Priority, Resources, ...), else the exit code."""
    width = max([4, *(len(r.name) for r in rows)])
    out = [f"  {'JOBID':<14} {'NAME':<{width}} {'STATE':<12} {'ELAPSED':>10} {'RESTARTS':>8}  {'EXIT/REASON'}"]
    for r in rows:
        restarts = "-" if r.restarts is None else str(r.restarts)
        # a pending job's exit code is sacct's placeholder 0:0 until it has a reason (seconds after submitting)
        last = (r.reason or "-") if r.state == "PENDING" else (r.exit_code or r.reason)
        out.append(f"  {r.job_id:<14} {r.name:<{width}} {r.state:<12} {r.elapsed:>10} {restarts:>8}  {last}")
    return out


def _first_error_line(text: str) -> str:
    """The line of a Slurm client's error output that says what is wrong (``fatal:`` if there is one)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if "fatal:" in line), lines[0] if lines else "unknown reason")


def _jobs(ids: list[str]) -> tuple[str, list[slurm.JobRow] | None, str]:
    """A heading and the jobs' rows from sacct, else squeue/scontrol, else none: a Slurm that cannot be
    reached (controller down, no client config here) must not hide what the run directory itself says. And
    why Slurm could not say, where it could not (else "")."""
    unavailable = "jobs (Slurm unavailable: {}; requeues from the job logs only):"
    try:
        rows = slurm.sacct(ids)
        # for a second or two slurmdbd's row of a new job is a placeholder: named "allocation", an array as one
        # row (not its tasks); squeue knows the job better then (the launcher's jobs all have names of its own)
        recorded = [r for r in rows if r.name != "allocation"]
        caught_up = recorded + _not_yet_in_accounting(ids, recorded)
        for r in rows:  # nor does squeue know it (it has ended): the placeholder, named as what it is
            if r.name == "allocation" and not any(_is_job_or_task(c.job_id, r.job_id) for c in caught_up):
                r.name = "(sacct catching up)"
                caught_up.append(r)
        _pending_reasons_from_squeue(caught_up)
        _restarts_from_the_controller(caught_up)
        return "jobs (sacct):", caught_up, ""
    except slurm.SacctUnavailable as e:
        why = _first_error_line(str(e))
    except LaunchError as e:  # sacct hung: squeue would too
        why = _first_error_line(str(e))
        return unavailable.format(why), None, why
    try:
        rows = slurm.squeue(ids)
        for r in rows:
            # the task's own (`scontrol show job 12` lists every task of the array: the first one's count)
            r.restarts = slurm.scontrol_restarts(r.job_id)
    except LaunchError as e:
        why = _first_error_line(str(e))
        return unavailable.format(why), None, why
    return f"jobs (squeue/scontrol; sacct unavailable: {why}; finished jobs are not listed):", rows, ""


def _restarts_from_the_controller(rows: list[slurm.JobRow]) -> None:
    """A live job's requeue count from the controller (``scontrol show job``: ``Restarts=``) where sacct's rows
    have fewer: slurmdbd records a requeue seconds later, and ``requeues 0`` stood after an ``scontrol requeue``
    meanwhile. Jobs alone, not array tasks (one scontrol call each)."""
    for r in rows:
        if r.state not in slurm.FINISHED_STATES and "_" not in r.job_id:
            try:
                live = slurm.scontrol_restarts(r.job_id)
            except LaunchError:  # the controller away: sacct's count stands
                continue
            if live is not None and live > (r.restarts or 0):
                r.restarts = live


def _pending_reasons_from_squeue(rows: list[slurm.JobRow]) -> None:
    """A pending job's reason from squeue where sacct has none yet: slurmdbd gets it from the controller
    later than squeue (tens of seconds on a loaded controller), and the row said ``-`` meanwhile. An array's
    tasks that have not started are one row in sacct (``45_[2-4%3]``), which squeue does not know by that id
    (``squeue -r -j '45_[2-4%3]'`` lists task 45_0, or nothing): it is asked for the array job (45), and the
    row gets the reasons of its pending tasks."""
    waiting = [r for r in rows if r.state == "PENDING" and not r.reason]
    if not waiting:
        return
    asked = list(dict.fromkeys(a[0] if (a := _array_tasks(r.job_id)) else r.job_id for r in waiting))
    try:
        live = slurm.squeue(asked)
    except LaunchError:  # sacct answered: its rows stand as they are
        return
    by_id = {r.job_id: r.reason for r in live}
    for r in waiting:
        array = _array_tasks(r.job_id)
        if array is None:
            r.reason = by_id.get(r.job_id, "")
            continue
        base, tasks = array
        reasons = [t.reason for t in live if t.state == "PENDING" and t.reason and (task := _task_of(t.job_id, base))
                   is not None and (tasks is None or task in tasks)]
        r.reason = ",".join(dict.fromkeys(reasons))


def _array_tasks(row_id: str) -> tuple[str, set[int] | None] | None:
    """An array's row of tasks not started yet (``45_[0-1]``, ``45_[2,5-7%3]``: ``%3``, at most 3 at once):
    the array job and its task indices (None: a list not understood here, any task). None for any other row."""
    m = re.fullmatch(r"(\d+)_\[([^\]]*)\]", row_id)
    if m is None:
        return None
    tasks: set[int] = set()
    for part in m.group(2).split("%")[0].split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if bounds is None:
            return m.group(1), None
        first, last, step = int(bounds.group(1)), int(bounds.group(2) or bounds.group(1)), int(bounds.group(3) or 1)
        tasks.update(range(first, last + 1, max(step, 1)))
    return m.group(1), tasks


def _task_of(row_id: str, base: str) -> int | None:
    """The task index of a row of one task of array job ``base`` (``45_3``: 3), else None."""
    head, _, task = row_id.partition("_")
    return int(task) if head == base and task.isdigit() else None


def _is_job_or_task(row_id: str, job_id: str) -> bool:
    """Whether a row of sacct/squeue is the job ``job_id`` or one of its array tasks (``JOB_N``)."""
    return row_id == job_id or row_id.startswith(f"{job_id}_")


def _not_yet_in_accounting(ids: list[str], rows: list[slurm.JobRow]) -> list[slurm.JobRow]:
    """Jobs sacct does not list yet, from squeue: slurmdbd records a job seconds after its submission, so a
    status right after `submit` said "(none queued or running)" of a job that was pending."""
    missing = [i for i in ids if not any(_is_job_or_task(r.job_id, i) for r in rows)]
    try:
        return slurm.squeue(missing)
    except LaunchError:  # sacct answered: what it lists is still right
        return []


def _training_line(run_dir: Path, rows: list[slurm.JobRow] | None = None) -> list[str]:
    """Who trains in the run directory now, from the lock ``fit`` holds on RUN/.lock (pipeline/run_lock.py).
    A lock free here while Slurm (``rows``: the run's jobs) runs the job that last took it is a file system
    whose locks stay within a node (Lustre mounted with ``localflock``, NFS with ``local_lock=flock``): its
    holder on a compute node holds nothing this node sees, and "not now" was said of a job training. Unless the
    record says its job let go of the lock (``released``: the trainer has ended, the job's processes exit)."""
    held, record = run_lock.holder(run_dir)
    if held is None and not record:
        return []
    who = run_lock.describe(record) if record else "no record"
    if held:
        return [f"training     now: {who}"]
    job = record.get("slurm_job_id")
    running = [r for r in rows or [] if r.job_id == str(job) and r.state == "RUNNING"] if job else []
    try:
        restart = int(record.get("restart", 0))
    except (TypeError, ValueError):
        restart = 0
    later = [r.restarts for r in running if r.restarts is not None and r.restarts > restart]
    if held is False and later:  # a later start of the job whose trainer has not taken the lock yet
        return [f"training     starting: job {job} restart {later[0]} (its trainer takes the lock once it is up; "
                f"last: {who})"]
    if held is False and running and record.get("released"):  # its trainer let go; W&B finishing, the step ending
        return [f"training     ending: slurm job {job} released the run directory at {record['released']} and is "
                f"exiting (Slurm still says RUNNING; last: {who})"]
    if held is False and running:
        return [f"training     probably now: {who} (Slurm runs job {job}, though its lock on {run_dir / LOCK_NAME} is "
                f"free as seen from here: locks on this file system may stay within a node, e.g. Lustre's "
                f"localflock; see docs/training.md)"]
    if held is False:
        return [f"training     not now (last: {who})"]
    return [f"training     unknown: the lock cannot be tested here (last: {who})"]


def _progress_line(ckpt: CheckpointInfo, tp: ThroughputReading | None) -> str | None:
    """How far the run is, from the newest checkpoint (the steps it plans and its global batch) and the
    last logged throughput: ``step 28 of 44 (64%); about 12 min to go at 150.0 img/s``; ``step 117 (no planned
    end: ...)`` for a run with no step or epoch limit. None for a checkpoint that records no plan (saved before
    checkpoints did)."""
    if ckpt.global_step is None:
        return None
    if not ckpt.planned_steps:
        return (f"progress     step {ckpt.global_step:,} (no planned end: the run has no trainer.max_steps or "
                f"trainer.max_epochs limit)") if ckpt.no_planned_end else None
    done = min(ckpt.global_step, ckpt.planned_steps)
    line = f"progress     step {ckpt.global_step:,} of {ckpt.planned_steps:,} ({100 * done // ckpt.planned_steps}%)"
    if done >= ckpt.planned_steps:
        return line + "; done"
    if tp is not None and tp.value > 0 and ckpt.global_batch:
        left = (ckpt.planned_steps - done) * ckpt.global_batch / tp.value
        line += f"; about {_duration(left)} to go at {tp.value:.1f} img/s"
    return line


def _code_lines(ckpt: CheckpointInfo) -> list[str]:
    """What code and software trained the newest checkpoint (its provenance records, one per start)."""
    said = provenance.describe(ckpt.provenance) or ["not recorded (the checkpoint was saved before runs recorded it)"]
    return [f"{'code' if i == 0 else '':<12} {line}" for i, line in enumerate(said)]


def _duration(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def _prep_outputs(run_dir: Path) -> list[Path] | None:
    """The OUT folders of a run directory that holds only `submit prep` jobs (None for a training run, or a
    directory holding no record of its jobs): their progress is shards and a manifest, not checkpoints."""
    jobs = recorded_jobs(run_dir)
    if not jobs or any(not str(j.get("kind", "")).startswith("prep") for j in jobs):
        return None
    if checkpoint_dir(run_dir).exists() or (run_dir / RUN_ID_FILE).exists():
        return None
    outs = list(dict.fromkeys(Path(j["out"]) for j in jobs if isinstance(j.get("out"), str)))
    return outs or None  # records written before OUT was recorded: the general report


def _stopped_prep_tasks(run_dir: Path, out: Path, rows: list[slurm.JobRow] | None) -> list[str]:
    """The array tasks into ``out`` that ended without success ("35_1 FAILED"), of each split set's latest
    submission: their finalize job never runs, and the status said it would write the manifest."""
    latest: dict[tuple, str] = {}
    for j in recorded_jobs(run_dir):
        if (j.get("kind") == "prep-array" and isinstance(j.get("out"), str)
                and Path(j["out"]).resolve() == out.resolve()):
            latest[tuple(j.get("splits") or ())] = j["job_id"]
    return [f"{r.job_id} {r.state}" for r in _tasks_ended_without_success(rows, set(latest.values()))]


def _tasks_ended_without_success(rows: list[slurm.JobRow] | None, arrays: set[str]) -> list[slurm.JobRow]:
    """The rows of tasks of array jobs ``arrays`` that ended in any way but COMPLETED (FAILED, TIMEOUT, ...)."""
    failed = slurm.FINISHED_STATES - {"COMPLETED"}
    return [r for r in rows or [] if "_" in r.job_id and r.job_id.split("_")[0] in arrays
            and r.state and r.state.split()[0] in failed]


def _latest_prep_array(run: Path, last_job: str) -> str | None:
    """The array job of a prep run directory's latest submission, where ``last_job`` (the run's last job) is
    that submission's (its finalize job, or the array itself): None for any other run directory."""
    jobs = recorded_jobs(run)
    if not jobs or jobs[-1]["job_id"] != last_job or not str(jobs[-1].get("kind", "")).startswith("prep"):
        return None
    return next((j["job_id"] for j in reversed(jobs) if j.get("kind") == "prep-array"), None)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run (a job of ours, a checkpoint, the trainer's config, W&B id or lock)."""
    return bool(job_ids(path)) or any((path / name).exists() for name in
                                      (checkpoint_dir(".").name, CONFIG_FILE, RUN_ID_FILE, LOCK_NAME))


def _run_dir_of_checkpoints(path: Path) -> Path | None:
    """The run directory of ``RUN/checkpoints`` (one that holds a checkpoint, or whose parent holds a run) or of a
    checkpoint in it (``RUN/checkpoints/last.ckpt``: a file, or a directory under DeepSpeed); else None."""
    folder = checkpoint_dir(".").name
    if path.suffix == ".ckpt" and path.parent.name == folder:
        return path.parent.parent
    if path.name == folder and (any(path.glob("*.ckpt")) or job_ids(path.parent) or any(
            (path.parent / name).exists() for name in (CONFIG_FILE, RUN_ID_FILE, LOCK_NAME))):
        return path.parent
    return None


def _status_of(run_dir: Path) -> str:
    """The run directory, and the command that gives its status."""
    return f"{run_dir}: `python -m launch status {shlex.quote(str(run_dir))}`"


def report(run_dir: Path) -> str:
    """The status text for one run directory, or for a folder of them (``runs_report``)."""
    if not run_dir.exists():
        raise LaunchError(f"RUN_DIR: {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        run = _run_dir_of_checkpoints(run_dir)
        if run is not None:
            raise LaunchError(f"RUN_DIR: {str(run_dir)!r} is a checkpoint, not a directory; its run directory is "
                              f"{_status_of(run)}")
        raise LaunchError(f"RUN_DIR: {str(run_dir)!r} is not a directory")
    if not is_run_dir(run_dir):
        runs = [c for c in sorted(run_dir.iterdir()) if c.is_dir() and is_run_dir(c)]
        if runs:
            return runs_report(run_dir, runs)
        if (run := _run_dir_of_checkpoints(run_dir)) is not None:  # it said "jobs none", "checkpoint none yet"
            what = "a checkpoint" if run_dir.suffix == ".ckpt" else "the checkpoints folder"
            raise LaunchError(f"RUN_DIR: {str(run_dir)!r} is {what} of a run, not its run directory, which is "
                              f"{_status_of(run)}")
    lines = [f"run dir      {run_dir.resolve()}"]
    ids = job_ids(run_dir)
    rows: list[slurm.JobRow] | None = None  # None: no jobs, or Slurm could not say
    if not ids:
        lines.append("jobs         none (no jobs.jsonl and no slurm-<job>.out in the run directory)")
    else:
        header, rows, _ = _jobs(ids)
        lines.append(header)
        if rows is not None:  # None: Slurm could not say
            lines += _table(rows) if rows else ["  (none queued or running)"]
        per_job = log_restarts(run_dir)
        for r in rows or []:  # Slurm's count and the logs' can each miss runs: take the larger per job
            per_job[r.job_id] = max(per_job.get(r.job_id, 0), r.restarts or 0)
        detail = ", ".join(f"job {j}: {n}" for j, n in sorted(per_job.items()) if n) or "none in job logs"
        lines.append(f"requeues     {sum(per_job.values())} ({detail})")
    prep_outs = _prep_outputs(run_dir)
    if prep_outs is not None:  # a data_prep run directory: its shards and manifest, no trainer lines
        for out in prep_outs:
            lines += output_status.describe(out, _stopped_prep_tasks(run_dir, out, rows))
        return "\n".join(lines)
    lines += _training_line(run_dir, rows)
    if origin := recorded_origin(run_dir):
        lines.append(f"branch of    {origin}")
    unreadable: list[str] = []  # said, and the rest of the report still shown: that is when it is needed
    ckpt = latest_checkpoint(run_dir, unreadable)
    lines += [f"checkpoint   UNREADABLE {e}" for e in unreadable]
    if ckpt is None:
        lines.append("checkpoint   none readable" if unreadable else "checkpoint   none yet")
    else:
        try:
            mtime = payload(ckpt.path).stat().st_mtime
            when = _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        except FileNotFoundError:  # replaced by the running trainer since it was read
            when = "since replaced"
        lines.append(f"checkpoint   {ckpt.path}  global_step {ckpt.global_step}  epoch {ckpt.epoch}  ({when})")
        lines += _code_lines(ckpt)
    tp = recent_throughput(run_dir)
    if tp is not None:
        at = f" at step {tp.step}" if tp.step is not None else ""
        lines.append(f"throughput   {tp.value:.1f} img/s{at} ({tp.column} in {tp.source})")
    if ckpt is not None and (line := _progress_line(ckpt, tp)):
        lines.append(line)
    best = best_checkpoint(run_dir)
    if best is not None:
        lines.append(f"best         val/top1 {best.top1:.4f} at epoch {best.epoch} step {best.step}  ({best.path})")
    try:
        rid = wandb_run_id(run_dir, create=False) or "none"
    except LaunchError as e:  # say so, after what the rest of the run directory says
        rid = f"unreadable: {e}"
    lines.append(f"W&B run id   {rid}")
    return "\n".join(lines)


def runs_report(parent: Path, runs: list[Path]) -> str:
    """One line per run directory in ``parent`` (a sweep of 10 networks x 5 seeds is 50 reports): its last
    job and that job's state (one sacct for all), the newest checkpoint's step of the steps planned, the code
    of its newest start (``provenance.short_code``) and the best kept val/top1. ``launch status RUN`` has the whole story of one."""
    last_job = {run: ids[-1] for run in runs if (ids := job_ids(run))}
    # a prep run's last job is its finalize job, which Slurm cancels when an array task fails: CANCELLED read
    # like a user's scancel, the failure unsaid. Its array is asked about too.
    arrays = {run: array for run, job in last_job.items() if (array := _latest_prep_array(run, job))}
    states: dict[str, str] = {}
    rows: list[slurm.JobRow] | None = None  # None: Slurm not asked, or not answering
    note = ""
    if last_job:
        header, rows, why = _jobs(sorted({*last_job.values(), *arrays.values()}, key=lambda j: (len(j), j)))
        if rows is None:  # (not the heading's "requeues from the job logs": this table has none)
            note = f"(Slurm unavailable: {why}; the jobs' states are not known)"
        else:
            states = {r.job_id: f"{r.state} ({r.reason})" if r.state == "PENDING" and r.reason else r.state
                      for r in rows}
            if "squeue/scontrol" in header:
                note = "(finished jobs are not listed without sacct)"
    lines = [f"runs in {parent.resolve()}: {len(runs)}" + (f" {note}" if note else "")]
    width = max(3, *(len(r.name) for r in runs))
    lines.append(f"  {'RUN':<{width}}  {'JOB':<12} {'STATE':<22} {'STEP':<24} {'CODE':<17} BEST val/top1")
    for run in runs:
        job = last_job.get(run)
        state = states.get(job, "-") if job else "no job"
        if job and rows is not None and job not in states:
            state = "ended"  # squeue no longer knows it (nor sacct), also when it knows none of them
        if stopped := _tasks_ended_without_success(rows, {arrays[run]} if run in arrays else set()):
            # the array's failure, not the finalize job's CANCELLED that follows from it
            more = len(stopped) - 1
            job, state = stopped[0].job_id, stopped[0].state + (f" (+{more} task{'s' * (more > 1)})" if more else "")
        ckpt = latest_checkpoint(run, [])
        if ckpt is None or ckpt.global_step is None:
            step = "-"
        elif ckpt.planned_steps:
            step = f"{ckpt.global_step:,} of {ckpt.planned_steps:,}" + (" done" if ckpt.global_step >= ckpt.planned_steps else "")
        else:
            step = f"{ckpt.global_step:,}"
        code = provenance.short_code(ckpt.provenance) if ckpt is not None else "-"
        best = best_checkpoint(run)
        top1 = f"{best.top1:.4f} (step {best.step:,})" if best else "-"
        lines.append(f"  {run.name:<{width}}  {job or '-':<12} {state:<22} {step:<24} {code:<17} {top1}")
    return "\n".join(lines)


def queue_report() -> str:
    """No run directory given: the current user's queue."""
    proc = slurm.run_client(["squeue", "--me", "-o", "%.12i %.24j %.10T %.10M %.6D %R"])
    if proc.returncode != 0:
        raise LaunchError(f"squeue failed: {slurm.said(proc)}")
    return proc.stdout.rstrip()

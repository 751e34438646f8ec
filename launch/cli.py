"""Command line: ``python -m launch {submit train|submit prep|status|torchrun}``.

Arguments after a bare ``--`` go to the trainer (or data_prep) unchanged, each one shell-quoted.
Errors in settings print one line naming the setting and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Callable

from data_prep.cli import default_workers
from launch import rundir, slurm, status, torchrun
from launch.branch import check_branch
from launch.closed_pipe import tolerate_a_closed_stdout
from launch.errors import LaunchError
from launch.scripts import PrepJob, SlurmOptions, TrainJob
from launch.trainer_check import check_trainer_args, check_trainer_settings
from launch.validate import sbatch_path, writable_dir, yaml_config
from pipeline.branch_record import record_origin, recorded_origin
from pipeline.run_layout import BRANCH_FILE, CHECKPOINTS_DIR, LAST_CHECKPOINT, RUN_ID_FILE, last_checkpoint, slurm_log


def _path(text: str) -> Path:
    """A path argument; an empty one (an unset shell variable, `--run-dir "$RUN"`) would mean the current
    directory, so the project directory would become the run directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path (an unset shell variable?)")
    return Path(text)


def _slurm_args(p: argparse.ArgumentParser, time_default: str | None) -> None:
    g = p.add_argument_group("Slurm")
    if time_default is None:
        g.add_argument("--time", required=True, help="time limit per run in any of sbatch's forms: MINUTES, HH:MM:SS, D-HH:MM:SS, ...")
    else:
        g.add_argument("--time", default=time_default, help=f"time limit per task (default {time_default})")
    for name in ("partition", "account", "qos"):
        g.add_argument(f"--{name}", help=f"sbatch --{name} (default: the cluster's)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (data loading threads)")
    g.add_argument("--container-image", default=None,
                   help="run under pyxis/enroot: srun --container-image=IMG (the container's python is used)")
    g.add_argument("--container-mounts", action="append", default=[],
                   help="extra SRC[:DST[:FLAGS]] mount for the container (repeatable)")
    g.add_argument("--python", default=None,
                   help="interpreter on the compute nodes (default: the one running this command, "
                        "or `python` inside a container)")
    g.add_argument("--dry-run", action="store_true", help="print the script(s) and sbatch command; submit nothing")


class _Once(argparse.Action):
    """An option that may be given once. argparse keeps the last of repeated options, so a second
    ``--config overlay.yaml`` silently replaced the first, the base config the run was meant to have."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}); the launcher "
                         f"takes one config (it names the run directory), more go to the trainer after `--`, "
                         f"where the later overrides the earlier: -- --config {values}")
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors in the launcher's one-line form (its usage block of every option pushed the
    error line below a screenful), with where to find the options."""

    def __init__(self, *args, **kwargs) -> None:  # no prefixes of options: `--worker 1` is not `--workers 1`
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"launch: error: {message} (options: `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m launch",
        description="Submit and watch resnet-pipeline jobs on Slurm, or print torchrun commands (docs/slurm.md).",
        epilog="Arguments after a bare `--` go to the trainer (submit train, torchrun) or to data_prep.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{submit,status,torchrun}")

    submit = sub.add_parser("submit", help="render an sbatch script, save it in the run directory, submit it")
    what = submit.add_subparsers(dest="what", required=True, metavar="{train,prep}")

    t = what.add_parser("train", help="multi-node training: one task per GPU, requeue on preemption")
    t.add_argument("--config", required=True, type=_path, action=_Once,
                   help="trainer YAML (conf/*.yaml); overlays go to the trainer: -- --config overlay.yaml")
    t.add_argument("--nodes", type=int, default=1, help="nodes of the job (default 1)")
    t.add_argument("--gpus-per-node", type=int, default=1,
                   help="GPUs = processes per node; 0 runs one CPU process per node")
    t.add_argument("--cpu", action="store_true", help="CPU (gloo) job: no GPU request, accelerator cpu")
    t.add_argument("--signal-lead", type=int, default=300,
                   help="USR1 (checkpoint + requeue) comes this many seconds before the time limit, up to 30 s "
                        "earlier (Slurm checks every 30 s); default 300")
    t.add_argument("--max-failures", type=int, default=3,
                   help="after a crash the job requeues itself and resumes, up to this many times in a row "
                        "without a new checkpoint (default 3; 0: never)")
    t.add_argument("--exclude-failed-nodes", action=argparse.BooleanOptionalAction, default=True,
                   help="after a crash, keep the node where the first task failed out of the job's next starts "
                        "(while the partition keeps enough usable nodes for the job); default on")
    t.add_argument("--run-dir", type=_path, default=None, help="default runs/<config name>")
    t.add_argument("--branch-from", type=_path, default=None, metavar="CKPT",
                   help="a new run that starts from another run's checkpoint (weights, optimizer, schedule, loader "
                        "position); its later starts resume its own last.ckpt")
    t.add_argument("--job-name", default=None,
                   help="Slurm job name (default train-<config name>; characters other than letters, digits "
                        "and _ . + - become _)")
    t.add_argument("--no-config-check", dest="config_check", action="store_false",
                   help="submit without first checking the trainer's settings (`python -m pipeline.config_check`, "
                        "about 6 s: unknown keys and bad values in --config and after --)")
    _slurm_args(t, None)

    pr = what.add_parser("prep", help="data_prep as an array job plus a dependent finalize job")
    kinds = pr.add_subparsers(dest="kind", required=True, metavar="{imagenet,imagefolder}")
    for kind in ("imagenet", "imagefolder"):
        k = kinds.add_parser(kind, help=f"python -m data_prep {kind} SRC OUT, split over --tasks array tasks")
        k.add_argument("src", type=_path, help=f"as for `python -m data_prep {kind}`")
        k.add_argument("out", type=_path, help="where the shards and manifest.json go (each task writes its own shards)")
        k.add_argument("--tasks", type=int, required=True, help="array tasks (each writes its own shards)")
        if kind == "imagefolder":
            k.add_argument("--split", required=True, help="split name, e.g. train or val")
        k.add_argument("--run-dir", type=_path, default=None, help="scripts and logs (default OUT-slurm next to OUT)")
        _slurm_args(k, "02:00:00")

    st = sub.add_parser("status", help="jobs, requeues, last checkpoint/step, img/s, W&B id of a run")
    st.add_argument("run_dir", nargs="?", type=_path, default=None,
                    help="a training run directory, a prep run directory (OUT-slurm), or a folder of run "
                         "directories (a sweep's --runs: one line per run); omitted: your jobs in the queue")

    tr = sub.add_parser("torchrun", help="print (or run) the torchrun command for a cluster without Slurm")
    tr.add_argument("--config", required=True, type=_path, action=_Once,
                    help="trainer YAML (conf/*.yaml); overlays go to the trainer: -- --config overlay.yaml")
    tr.add_argument("--nnodes", type=int, required=True, help="nodes, each running this command (one agent each)")
    tr.add_argument("--nproc-per-node", type=int, required=True, help="processes (GPUs) per node")
    tr.add_argument("--rdzv-endpoint", required=True, help="HOST:PORT of node 0")
    tr.add_argument("--rdzv-id", default=None, help="rendezvous id (default: the W&B run id)")
    tr.add_argument("--run-dir", type=_path, default=None, help="default runs/<config name>")
    tr.add_argument("--branch-from", type=_path, default=None, metavar="CKPT",
                    help="a new run that starts from another run's checkpoint; its later starts resume its own "
                         "last.ckpt (as for submit train)")
    tr.add_argument("--max-restarts", type=int, default=3,
                    help="restarts of all ranks after a failure, each resuming from last.ckpt (default 3)")
    tr.add_argument("--stop-grace", type=int, default=torchrun.STOP_GRACE_S, metavar="S",
                    help="seconds an agent that got a signal (Ctrl-C, a kill) gives its ranks to save and stop "
                         f"before it kills them (torchrun --shutdown-timeout; default {torchrun.STOP_GRACE_S})")
    tr.add_argument("--cpu", action="store_true", help="CPU processes over gloo: accelerator cpu")
    tr.add_argument("--no-config-check", dest="config_check", action="store_false",
                    help="skip the check of the trainer's settings (`python -m pipeline.config_check`, about 6 s)")
    tr.add_argument("--run", action="store_true", help="run it here instead of printing it")
    return parser


def _options(a: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(time=a.time, partition=a.partition, account=a.account, qos=a.qos,
                        cpus_per_task=a.cpus_per_task, container_image=a.container_image,
                        container_mounts=list(a.container_mounts))


def _python(a: argparse.Namespace) -> str:
    if a.python:
        return a.python
    return "python" if a.container_image else sys.executable


def _refuse_if_preparing(run_dir: Path, out: Path, splits: list[str]) -> None:
    """One prep submission per split of a shard directory at a time: a second array job built the same shards
    at once (one failed writing a shard the other had renamed, the other counted the first's shards as its own
    earlier run's). Other splits of the same OUT may be prepared meanwhile."""
    active = _not_ended(lambda: status.active_prep_jobs(run_dir, out, splits),
                        f"{run_dir}: cannot tell whether the earlier prep jobs of {out} have ended")
    if active:
        ids = " ".join(sorted({r.job_id.split("_")[0] for r in active}, key=int))
        named = f"split {splits[0]!r}" if len(splits) == 1 else f"splits {', '.join(splits)}"
        raise LaunchError(f"{named} of {out} {'is' if len(splits) == 1 else 'are'} being prepared by "
                          f"{_listed(active)} (recorded in {run_dir}): a second prep job would write the same "
                          f"shards: wait until it ends, or cancel it (`scancel {ids}`)")


def _refuse_if_training(run_dir: Path) -> None:
    """One training job per run directory at a time: a second one (submitted again because the first seemed
    dead, or by re-running the command) would write checkpoints/last.ckpt too and resume from the other's."""
    active = _not_ended(lambda: status.active_train_jobs(run_dir),
                        f"run directory {run_dir}: cannot tell whether its earlier train jobs have ended")
    if active:
        raise LaunchError(f"run directory {run_dir} is in use by train {_listed(active)}, and a second job would "
                          f"write its {CHECKPOINTS_DIR}/{LAST_CHECKPOINT} too: wait until it ends, cancel it "
                          f"(`scancel {' '.join(r.job_id for r in active)}`), or choose another --run-dir")


def _not_ended(find: Callable[[], list[slurm.JobRow]], cannot_tell: str) -> list[slurm.JobRow]:
    """``find()``'s jobs that Slurm has not finished with. Refuses, saying why, rather than guess when squeue
    cannot be asked: sbatch could not submit either, and "nothing active" could start the second writer
    these checks exist to prevent."""
    try:
        return find()
    except rundir.BadJobsFile:
        raise
    except LaunchError as e:
        raise LaunchError(f"{cannot_tell}: {e}; submit again once squeue works") from e


def _listed(active: list[slurm.JobRow]) -> str:
    """'job 5 RUNNING' or 'jobs 5_0 RUNNING, 6 PENDING (Dependency)'."""
    jobs = ", ".join(f"{r.job_id} {r.state}" + (f" ({r.reason})" if r.reason else "") for r in active)
    return f"job{'s' * (len(active) > 1)} {jobs}"


def _submit_train(a: argparse.Namespace, extra: list[str]) -> int:
    run_dir = (a.run_dir or Path("runs") / a.config.stem).absolute()
    if a.run_dir is None:  # say where the path came from: the user never typed it
        default = "run directory (default runs/<config name>; choose one with --run-dir)"
        writable_dir(sbatch_path(run_dir, default), default)
    job = TrainJob(config=yaml_config(a.config, "--config"), nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                   run_dir=run_dir,
                   slurm=_options(a), signal_lead=a.signal_lead, cpu=a.cpu, extra_args=extra,
                   python=_python(a), workdir=Path.cwd(), max_failures=a.max_failures,
                   exclude_failed_nodes=a.exclude_failed_nodes, name=a.job_name)
    job.check()
    origin = check_branch(run_dir, a.branch_from) if a.branch_from is not None else None
    if not a.dry_run:
        _refuse_if_training(run_dir)  # before anything is written
    saved_id = rundir.wandb_run_id(run_dir, create=False)  # an unreadable id file: refused before the slow check
    if a.config_check:  # the last check: it takes seconds
        for line in check_trainer_settings(job, origin=origin):
            print(line, file=sys.stderr)
    if a.dry_run:
        print(job.render(saved_id), end="")
        print(f"# submit: sbatch --parsable {job.script_path}", file=sys.stderr)
        return 0
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    run_id = rundir.wandb_run_id(run_dir)
    assert run_id is not None
    recorded = recorded_origin(run_dir)
    if origin is not None:  # before the job is queued: its first start looks for it
        record_origin(run_dir, origin)
    try:
        job_id = _sbatch_then_keep(job.script_path, job.render(run_id), job.request(), a.partition)
    except LaunchError:  # a new run directory holding only its fresh id would look like a run that never was
        if origin is not None and recorded != origin:  # the record as it was
            (run_dir / BRANCH_FILE).unlink(missing_ok=True)
            if recorded is not None:
                record_origin(run_dir, recorded)
        if made:
            (run_dir / RUN_ID_FILE).unlink(missing_ok=True)
            _remove_empty(made)
        raise
    rundir.record_job(run_dir, job_id, "train", job.script_path)
    print(f"Submitted train job {job_id}")
    print(f"  script  {job.script_path}")
    print(f"  log     {slurm_log(run_dir, job_id)}")
    print(f"  W&B id  {run_id}")
    if origin is not None:
        print(f"  branch  from {origin} (its first start; every later one resumes {last_checkpoint(run_dir)})")
    print(f"  status  python -m launch status {run_dir}")
    return 0


def _remove_empty(made: list[Path]) -> None:
    """Remove the directories a refused submission created, deepest first, while they are empty."""
    for d in sorted(made, key=lambda p: -len(p.parts)):
        try:
            d.rmdir()
        except OSError:  # not empty (something else put a file there), or gone already
            pass


def _refuse_if_never_starts(job_id: str, asked: str, partition: str | None) -> None:
    """Cancel a job just accepted that Slurm keeps pending until its configuration changes (``--nodes 3`` on a
    2-node partition, ``--time`` over MaxTime), and say why: otherwise it waits forever, shown only by
    ``launch status``'s reason column, and keeps its run directory busy."""
    found = slurm.never_starts(job_id)
    if found is None:
        return
    reason, meaning = found
    try:
        slurm.scancel(job_id)
        done = "it was cancelled"
    except LaunchError as e:
        done = f"cancelling it failed ({e}): `scancel {job_id}`"
    part, look = ((f"partition {partition}", f"`scontrol show partition {partition}`, `sinfo -N -l -p {partition}`")
                  if partition else ("the default partition", "`scontrol show partition`, `sinfo -N -l`"))
    raise LaunchError(f"job {job_id} ({asked}) could never start on {part}: Slurm keeps it pending with reason "
                      f"{reason}: {meaning} ({look}); {done}")


def _sbatch_then_keep(script: Path, text: str, asked: str, partition: str | None) -> str:
    """Submit `text` and only then make it `script`: a submission sbatch refuses (a mistyped partition, an
    account over its limits), or one that could never start, leaves the run's last working script in place,
    the one to resubmit by hand. Slurm keeps its own copy of a submitted script, so the file's later name does
    not matter to the job."""
    new = script.with_name(f".{script.name}.new")
    new.write_text(text)
    try:
        job_id = slurm.sbatch(new)
        _refuse_if_never_starts(job_id, asked, partition)
    except LaunchError as e:
        new.unlink(missing_ok=True)
        kept = f"; {script} is unchanged" if script.exists() else ""
        raise LaunchError(str(e).replace(f"sbatch {new} ", f"sbatch {script} ", 1) + kept) from None
    os.replace(new, script)
    return job_id


def _submit_prep(a: argparse.Namespace, extra: list[str]) -> int:
    out = a.out.absolute()
    run_dir = (a.run_dir or out.parent / f"{out.name}-slurm").absolute()
    if a.run_dir is None:
        default = "run directory (default OUT-slurm next to OUT; choose one with --run-dir)"
        writable_dir(sbatch_path(run_dir, default), default)
    prep_args = ["--split", a.split] if a.kind == "imagefolder" else []
    job = PrepJob(command=a.kind, src=a.src.absolute(), out=out, tasks=a.tasks, run_dir=run_dir,
                  slurm=_options(a), prep_args=prep_args + extra, python=_python(a), workdir=Path.cwd(),
                  label=getattr(a, "split", "") or "")
    job.check()
    dep = ["--dependency=afterok:{array_job}", "--kill-on-invalid-dep=yes"]
    if not a.dry_run:
        _refuse_if_preparing(run_dir, out, job.written_splits)  # before anything is written
    if a.dry_run:
        print(f"# ---- {job.array_script_path.name}")
        print(job.render_array(), end="")
        print(f"# ---- {job.finalize_script_path.name}")
        print(job.render_finalize(), end="")
        print(f"# submit: sbatch --parsable {job.array_script_path}  ->  ARRAY_JOB_ID\n"
              f"#         sbatch --parsable {' '.join(dep).format(array_job='ARRAY_JOB_ID')} "
              f"{job.finalize_script_path}", file=sys.stderr)
        return 0
    made = [p for p in {*(q for q in (run_dir, *run_dir.parents) if not q.exists()),
                        *(q for q in (out, *out.parents) if not q.exists())}]
    run_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)  # a container mounts it: enroot fails on a missing source
    job.array_script_path.write_text(job.render_array())
    job.finalize_script_path.write_text(job.render_finalize())
    try:
        array_id = slurm.sbatch(job.array_script_path)
        _refuse_if_never_starts(array_id, job.request(), a.partition)
    except LaunchError:  # nothing runs: what this submission made goes again (an empty OUT, two scripts)
        if run_dir in made:
            job.array_script_path.unlink(missing_ok=True)
            job.finalize_script_path.unlink(missing_ok=True)
        _remove_empty(made)
        raise
    rundir.record_job(run_dir, array_id, "prep-array", job.array_script_path, out, job.written_splits)
    try:
        fin_id = slurm.sbatch(job.finalize_script_path, [d.format(array_job=array_id) for d in dep])
    except LaunchError as e:  # the array job runs: submitting again would start a second one on the same shards
        raise LaunchError(f"{e}; array job {array_id} was submitted and runs: after it ends, run `python -m data_prep "
                          f"finalize {shlex.quote(str(out))} --splits {job.splits}` (or submit "
                          f"{shlex.quote(str(job.finalize_script_path))} with --dependency=afterok:{array_id}), "
                          f"or `scancel {array_id}` before submitting again") from None
    rundir.record_job(run_dir, fin_id, "prep-finalize", job.finalize_script_path, out, job.written_splits)
    print(f"Submitted prep array job {array_id} (tasks 0-{a.tasks - 1}) and finalize job {fin_id} "
          f"(afterok:{array_id})")
    print(f"  scripts {run_dir}")
    print(f"  logs    {run_dir}/prep-{array_id}_<task>.out, {run_dir}/prep-finalize-{fin_id}.out")
    print(f"  status  python -m launch status {run_dir}")
    return 0


def threads_per_rank(nproc_per_node: int) -> int:
    """OpenMP threads of each rank ``launch torchrun --run`` starts: the cores this process may run on (its
    CPU affinity, as Slurm or a container sets it) shared out among the node's ranks, at least 1. Left
    unset, torchrun sets 1 for every rank and prints a warning block about it."""
    return max(1, default_workers() // nproc_per_node)


def threads_per_rank_shell(nproc_per_node: int) -> str:
    """``threads_per_rank`` for the printed line, worked out by the shell of each node that runs it (its
    ``nproc`` counts the cores that node lets it use); an ``OMP_NUM_THREADS`` set there is kept."""
    n = nproc_per_node
    return f'OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$(( $(nproc) < {n} ? 1 : $(nproc) / {n} ))}}"'


def _torchrun(a: argparse.Namespace, extra: list[str]) -> int:
    run_dir = (a.run_dir or Path("runs") / a.config.stem).absolute()
    writable_dir(run_dir, "--run-dir" if a.run_dir else "run directory (default runs/<config name>; "
                                                      "choose one with --run-dir)")
    argv = torchrun.command(a.config, a.nnodes, a.nproc_per_node, a.rdzv_endpoint, run_dir,
                            rdzv_id="pending" if a.rdzv_id is None else a.rdzv_id, cpu=a.cpu, extra_args=extra,
                            max_restarts=a.max_restarts, stop_grace=a.stop_grace)
    rundir.wandb_run_id(run_dir, create=False)  # an unreadable id file: refused before the slow check
    origin = check_branch(run_dir, a.branch_from) if a.branch_from is not None else None
    if a.config_check:
        at = next(i for i in range(len(argv) - 1) if argv[i:i + 2] == ["-m", "pipeline"])
        args = argv[at + 2:]
        if origin is not None and args[-2:] == ["--ckpt_path", "last"]:  # what the first start reads, checked
            args = [*args[:-1], origin]
        for line in check_trainer_args(args, Path.cwd()):
            print(line, file=sys.stderr)
    run_id = rundir.wandb_run_id(run_dir)  # made now: the printed command runs as is on every node
    assert run_id is not None
    if a.rdzv_id is None:
        argv[argv.index("--rdzv-id=pending")] = f"--rdzv-id={run_id}"
    env = torchrun.env(run_dir, run_id)
    if origin is not None:  # every node's first start (--ckpt_path last, no checkpoint of the run's own) reads it
        record_origin(run_dir, origin)
        print(f"branch: {run_dir / BRANCH_FILE} records {origin}: the first start starts from it, later ones "
              f"resume {last_checkpoint(run_dir)}", file=sys.stderr)
    if not a.run:
        print(f"{threads_per_rank_shell(a.nproc_per_node)} {torchrun.shell_line(argv, env)}")
        return 0
    if "OMP_NUM_THREADS" not in os.environ:  # the user's own setting stays
        env["OMP_NUM_THREADS"] = str(threads_per_rank(a.nproc_per_node))
    return torchrun.run_here(argv, env)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, extra = args[:i], args[i + 1:]
    a = build_parser().parse_args(args)
    tolerate_a_closed_stdout()  # `launch submit ... | head -1`: the submission goes on, exit 0
    try:
        if a.cmd == "submit" and a.what == "train":
            return _submit_train(a, extra)
        if a.cmd == "submit" and a.what == "prep":
            return _submit_prep(a, extra)
        if a.cmd == "torchrun":
            return _torchrun(a, extra)
        if extra:
            raise LaunchError(f"{a.cmd}: arguments after `--` are only accepted by submit and torchrun")
        if a.cmd == "status":
            print(status.report(a.run_dir) if a.run_dir else status.queue_report(), flush=True)
            return 0
    except LaunchError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing the run directory (full disk, lost permission, a path that vanished): one line
        print(f"launch: error: {e.filename or 'file system'}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 2

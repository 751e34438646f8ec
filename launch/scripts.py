"""Turn validated launcher settings into sbatch scripts (train, prep array, prep finalize).

Everything user-controlled that reaches a shell line goes through ``{{q:...}}`` (shlex.quote) or is
built here from validated integers; ``#SBATCH`` values are validated by :mod:`launch.validate`.
"""

from __future__ import annotations

import datetime as _dt
import re
import shlex
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.cli import check_arguments
from data_prep.errors import PrepError
from data_prep.format import SPLIT_NAME
from launch import template
from launch.errors import LaunchError
from launch.validate import (TRAIN_TIME_REASON, launcher_fit_args, no_launcher_args, positive_int, sbatch_path,
                             slurm_name, slurm_time, time_seconds, writable_dir)
from pipeline.run_layout import FAILURES_FILE, TRAIN_SCRIPT, last_checkpoint, slurm_log
from pipeline.wording import plural


@dataclass
class SlurmOptions:
    """Scheduler settings shared by every job the launcher writes."""

    time: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)

    def check(self, time_reason: str = TRAIN_TIME_REASON) -> None:
        """Raise LaunchError naming the first bad setting (``time_reason``: why the job needs a finite limit)."""
        slurm_time(self.time, reason=time_reason)
        slurm_name(self.partition, "--partition")
        slurm_name(self.account, "--account")
        slurm_name(self.qos, "--qos")
        if self.cpus_per_task is not None:
            positive_int(self.cpus_per_task, "--cpus-per-task")
        if self.container_image is not None and not self.container_image.strip():
            raise LaunchError("--container-image: empty image name")

    def request(self) -> str:
        """What every task of the job asks the scheduler for, in the launcher's option names (for errors)."""
        cpus = f", --cpus-per-task {self.cpus_per_task}" if self.cpus_per_task is not None else ""
        return f"--time {self.time}{cpus}"

    def directives(self) -> dict[str, str | int | None]:
        return {
            "time": self.time,
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
        }

    def check_mounts(self, mounts: list[Path]) -> None:
        """pyxis splits ``--container-mounts`` at commas, each mount at colons (SRC:DST:FLAGS), and a space
        breaks it too (NVIDIA/pyxis#133): such a path failed only once the job left the queue."""
        if not self.container_image:
            return
        for m in [*(str(p) for p in mounts), *self.container_mounts]:
            given = m in self.container_mounts
            bad = [c for c in m if c == "," or c.isspace() or (c == ":" and not given)]
            if bad and given:
                raise LaunchError(f"--container-mounts {m!r}: pyxis cannot mount a path with {bad[0]!r} (it splits "
                                  f"mounts at commas and breaks at spaces); give one mount per --container-mounts")
            if bad:
                raise LaunchError(f"--container-image: {m!r} must be mounted in the container, and pyxis cannot mount "
                                  f"a path with {bad[0]!r}; rename it or use another directory")

    def container_flags(self, mounts: list[Path], workdir: Path) -> str:
        """pyxis flags for srun (empty without --container-image), each value shell-quoted."""
        if not self.container_image:
            return ""
        seen: list[str] = []
        for m in [*(str(p) for p in mounts), *self.container_mounts]:
            if m not in seen:
                seen.append(m)
        flags = [
            f"--container-image={shlex.quote(self.container_image)}",
            f"--container-mounts={shlex.quote(','.join(seen))}",
            f"--container-workdir={shlex.quote(str(workdir))}",
        ]
        return " ".join(flags) + " "


TRAINER_ARGS = launcher_fit_args("--nodes", "--gpus-per-node")  # what the launcher passes to `pipeline fit`

PREP_ARGS = {  # what the launcher passes to each array task of data_prep
    "--task-index": "from the array task: $SLURM_ARRAY_TASK_ID",
    "--num-tasks": "from --tasks",
    "--finalize-queued": "the launcher queues the finalize job",
}

MAX_SIGNAL_LEAD = 65535  # sbatch refuses a larger --signal=SIG@TIME


def _extra(args: list[str]) -> str:
    return "".join(" " + shlex.quote(a) for a in args)


def _option(args: list[str], name: str) -> str | None:
    """The value the last ``name`` in ``args`` gives (``--name V`` or ``--name=V``; argparse keeps the last)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _job_log_word() -> str:
    """The job's log name (run_layout.slurm_log) as a shell word relative to the run directory, with the job id
    the script runs as (``$SLURM_JOB_ID``) where sbatch's ``--output`` has ``%j``."""
    before, after = (shlex.quote(part) if part else "" for part in slurm_log(".", "%j").name.split("%j"))
    return f'{before}"$SLURM_JOB_ID"{after}'


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_name(text: str) -> str:
    """A job name made only of safe characters (it lands in an #SBATCH line). Not ``bash`` or ``interactive``:
    Lightning takes a Slurm job of that name for an interactive session and does not see its ranks (each
    would train alone)."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", text).strip("_")
    name = name[:64] or "job"
    if name in ("bash", "interactive"):
        raise LaunchError(f"--job-name {text}: Lightning takes a Slurm job named {name!r} for an interactive "
                          "session and would not see the job's ranks (each would train alone); choose another name")
    return name


@dataclass
class TrainJob:
    """One multi-node training run: ``nodes`` x ``tasks_per_node`` processes under srun."""

    config: Path
    nodes: int
    gpus_per_node: int
    run_dir: Path
    slurm: SlurmOptions
    signal_lead: int = 300
    cpu: bool = False
    extra_args: list[str] = field(default_factory=list)
    python: str = "python"
    workdir: Path = field(default_factory=Path.cwd)
    max_failures: int = 3
    exclude_failed_nodes: bool = True
    name: str | None = None  # the Slurm job name (default train-<config name>)

    @property
    def on_cpu(self) -> bool:
        return self.cpu or self.gpus_per_node == 0

    @property
    def tasks_per_node(self) -> int:
        """One process per GPU; a CPU job with --gpus-per-node 0 runs one process per node."""
        return max(self.gpus_per_node, 1)

    @property
    def log_path(self) -> Path:
        return slurm_log(self.run_dir, "%j")

    @property
    def mounts(self) -> list[Path]:
        """What the container must see (with --container-image)."""
        return [self.run_dir, self.workdir, self.config.parent]

    @property
    def script_path(self) -> Path:
        return self.run_dir / TRAIN_SCRIPT

    def check(self) -> None:
        """Validate every setting; config must exist, --time and --signal-lead must fit together."""
        if not self.config.is_file():
            raise LaunchError(f"--config: file {str(self.config)!r} does not exist")
        positive_int(self.nodes, "--nodes")
        positive_int(self.gpus_per_node, "--gpus-per-node", minimum=0)
        self.slurm.check()
        writable_dir(sbatch_path(self.run_dir, "--run-dir"), "--run-dir")
        positive_int(self.signal_lead, "--signal-lead", minimum=0)
        positive_int(self.max_failures, "--max-failures", minimum=0)
        if self.signal_lead > MAX_SIGNAL_LEAD:
            raise LaunchError(f"--signal-lead: {self.signal_lead} s is more than Slurm's --signal allows "
                              f"({MAX_SIGNAL_LEAD} s)")
        if self.signal_lead + 30 >= time_seconds(self.slurm.time):
            raise LaunchError(
                f"--signal-lead: {self.signal_lead} s + Slurm's 30 s check interval is not shorter than --time "
                f"{self.slurm.time}; USR1 would arrive as the job starts, before the trainer can checkpoint"
            )
        no_launcher_args(self.extra_args, TRAINER_ARGS)
        self.slurm.check_mounts(self.mounts)
        if self.slurm.container_image and self.python != "python":
            raise LaunchError("--python: with --container-image the container's own `python` is used")

    def trainer_args(self, run_dir: str | None = None) -> list[str]:
        """What the job passes to ``python -m pipeline`` (the script writes ``run_dir`` as ``"$RUN_DIR"``)."""
        return ["fit", "--config", str(self.config), *self.extra_args,
                "--trainer.default_root_dir", run_dir or str(self.run_dir), "--trainer.num_nodes", str(self.nodes),
                "--trainer.devices", str(self.tasks_per_node), *(["--trainer.accelerator", "cpu"] if self.on_cpu else []),
                "--ckpt_path", "last"]

    def request(self) -> str:
        """What the job asks the scheduler for, in the launcher's option names (for errors)."""
        gpus = "no GPU" if self.on_cpu else plural(self.gpus_per_node, "GPU")
        return f"--nodes {self.nodes}, {plural(self.tasks_per_node, 'task')} and {gpus} per node, {self.slurm.request()}"

    def render(self, wandb_run_id: str | None) -> str:
        """The sbatch script text (call check() first). Without an id (a dry run of a new run directory) the
        script exports none: the trainer makes RUN/wandb_run_id at the first start and reads it at every
        other, so the printed script can be submitted as is."""
        accel = "--trainer.accelerator cpu " if self.on_cpu else ""
        values: dict[str, str | int | None] = {
            "created": _now(),
            "job_name": job_name(self.name or f"train-{self.config.stem}"),
            "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
            "gpus": None if self.on_cpu else self.gpus_per_node,
            "cpus_per_task": self.slurm.cpus_per_task,
            "signal_lead": self.signal_lead,
            "max_failures": self.max_failures,
            "exclude_failed_nodes": int(self.exclude_failed_nodes),
            "log_path": str(self.log_path),
            "run_dir": str(self.run_dir),
            "last_checkpoint": str(last_checkpoint(".")),  # these four: relative to "$RUN_DIR"
            "job_log": _job_log_word(),
            "failures_file": FAILURES_FILE,
            "train_script": TRAIN_SCRIPT,
            "workdir": str(self.workdir),
            "wandb_run_id": wandb_run_id,
            "wandb_id_at_start": "" if wandb_run_id else "yes",
            "container_flags": self.slurm.container_flags(self.mounts, self.workdir),
            "python": self.python,
            "config": str(self.config),
            "accelerator_args": accel,
            "extra_args": _extra(self.extra_args),
            **self.slurm.directives(),
        }
        return template.render(template.load("train.sbatch"), values, "train.sbatch")


PREP_COMMANDS = ("imagenet", "imagefolder")


@dataclass
class PrepJob:
    """A data_prep array job (``tasks`` slices) plus its dependent finalize job."""

    command: str
    src: Path
    out: Path
    tasks: int
    run_dir: Path
    slurm: SlurmOptions
    prep_args: list[str] = field(default_factory=list)
    python: str = "python"
    workdir: Path = field(default_factory=Path.cwd)

    label: str = ""

    @property
    def _tag(self) -> str:
        return job_name(f"{self.command}-{self.label}" if self.label else self.command)

    @property
    def array_script_path(self) -> Path:
        """One script per dataset kind and split, so preparing train and val in one OUT keeps both."""
        return self.run_dir / f"prep-{self._tag}.sbatch"

    @property
    def finalize_script_path(self) -> Path:
        return self.run_dir / f"prep-finalize-{self._tag}.sbatch"

    @property
    def splits(self) -> str:
        """The splits this job prepares, which its finalize merges (``--splits``): without it, finalize merged
        every split with a plan in OUT and failed on one still being prepared by another job."""
        if self.command == "imagefolder":
            return self.label
        return _option(self.prep_args, "--splits") or "train,val"  # data_prep imagenet's default

    @property
    def written_splits(self) -> list[str]:
        """The splits this job writes: those its finalize merges, and a hold-out's (``--holdout-split``)."""
        names = self.splits.split(",")
        held = _option(self.prep_args, "--holdout-split")
        return names + ([held] if held and held not in names else [])

    def check(self) -> None:
        if self.command not in PREP_COMMANDS:
            raise LaunchError(f"prep: unknown dataset kind {self.command!r}; use one of {', '.join(PREP_COMMANDS)}")
        if not self.src.exists():
            raise LaunchError(f"SRC: {str(self.src)!r} does not exist")
        if self.label and not SPLIT_NAME.fullmatch(self.label):  # data_prep's rule, checked before the queue wait
            raise LaunchError(f"--split {self.label!r}: use letters, digits, '_' or '-' only, at most 64 characters")
        inside = self.src.is_dir() and self.out.resolve().is_relative_to(self.src.resolve())
        if self.command == "imagefolder" and inside:
            raise LaunchError(f"OUT: {str(self.out)!r} is inside SRC {str(self.src)!r}, so a rerun would list the "
                              f"shards as inputs; choose an OUT outside SRC")
        positive_int(self.tasks, "--tasks")
        self.slurm.check("a prep task that hangs (a stalled file system) would hold its node for good")
        writable_dir(sbatch_path(self.run_dir, "--run-dir"), "--run-dir")
        writable_dir(self.out, "OUT")
        no_launcher_args(self.prep_args, PREP_ARGS)
        if self.src.is_file() and (self.command == "imagenet" or not tarfile.is_tarfile(self.src)):
            raise LaunchError(f"SRC: {str(self.src)!r} is a file but not a tar archive; give the dataset's folder"
                              f"{'' if self.command == 'imagenet' else ' or its .tar'}")
        try:  # data_prep's own parser and checks, before the queue wait rather than in every array task
            check_arguments([self.command, str(self.src), str(self.out), *self.prep_args,
                             "--task-index", "0", "--num-tasks", str(self.tasks)])
        except PrepError as e:
            raise LaunchError(f"data_prep would refuse this in every array task: {e}") from None
        self.slurm.check_mounts(self.mounts)

    @property
    def mounts(self) -> list[Path]:
        """What the container must see (with --container-image)."""
        return [self.src, self.out, self.run_dir, self.workdir]

    def _common(self) -> dict[str, str | int | None]:
        return {
            "created": _now(),
            "workdir": str(self.workdir),
            "python": self.python,
            "out": str(self.out),
            "container_flags": self.slurm.container_flags(self.mounts, self.workdir),
            **self.slurm.directives(),
        }

    def request(self) -> str:
        """What the array job asks the scheduler for, in the launcher's option names (for errors)."""
        return f"--tasks {self.tasks} array tasks, {self.slurm.request()} each"

    def render_array(self) -> str:
        # the task's CPUs as --workers, unless the user gave --workers
        mine = _option(self.prep_args, "--workers") is None
        workers = f" --workers {self.slurm.cpus_per_task}" if self.slurm.cpus_per_task and mine else ""
        values = {
            **self._common(),
            "job_name": job_name(f"prep-{self._tag}"),
            "last_task": self.tasks - 1,
            "num_tasks": self.tasks,
            "cpus_per_task": self.slurm.cpus_per_task,
            "log_path": str(self.run_dir / "prep-%A_%a.out"),
            "command": self.command,
            "src": str(self.src),
            "prep_args": _extra(self.prep_args),
            "workers_arg": workers,
        }
        return template.render(template.load("prep_array.sbatch"), values, "prep_array.sbatch")

    def render_finalize(self) -> str:
        values = {
            **self._common(),
            "job_name": job_name(f"prep-finalize-{self._tag}"),
            "log_path": str(self.run_dir / "prep-finalize-%j.out"),
            "finalize_args": _extra(["--splits", self.splits]),
        }
        return template.render(template.load("prep_finalize.sbatch"), values, "prep_finalize.sbatch")

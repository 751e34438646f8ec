"""``launch submit train --branch-from CKPT``: a new run that starts from another run's checkpoint (its weights,
optimizer, schedule and loader position), under Slurm. Every start of a train job passes ``--ckpt_path last``
(a requeue must resume the run's own ``last.ckpt``, not the other run's again), so the origin is recorded in
the run directory before the job is queued (``RUN/branched_from``, pipeline/branch_record.py): the first start,
finding no checkpoint of the run's own, starts from it; every later one resumes the branch's own checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from launch.errors import LaunchError
from pipeline.branch_record import origin_name, recorded_origin
from pipeline.deepspeed_layout import refuse_folder_of_checkpoints
from pipeline.errors import ConfigError
from pipeline.run_layout import checkpoint_dir, last_checkpoint


def check_branch(run_dir: Path, source: Path) -> str:
    """The origin to record for a branch of ``source`` into ``run_dir``; a one-line LaunchError when there is no
    such checkpoint, when it is another run's directory or its ``checkpoints/`` folder, when it is the run's own,
    or when the run has a checkpoint of its own and is not a branch of ``source`` (the same submission again is
    fine: its job resumes the branch's own checkpoint)."""
    if not source.exists():
        raise LaunchError(f"--branch-from: {source} does not exist (a checkpoint file, or a DeepSpeed checkpoint "
                          f"directory, of another run)")
    if source.is_dir():  # the job's first start refused it, after the wait in the queue
        try:
            refuse_folder_of_checkpoints(source)
        except ConfigError as e:
            raise LaunchError(f"--branch-from: {e}") from None
    origin = origin_name(source)
    if Path(origin).parent == Path(origin_name(checkpoint_dir(run_dir))):
        raise LaunchError(f"--branch-from: {source} is the run directory's own checkpoint; every start resumes "
                          f"{last_checkpoint(run_dir)} already (drop --branch-from)")
    last = last_checkpoint(run_dir)
    started = recorded_origin(run_dir)
    if last.exists() and started != origin:
        was = f", a branch of {started}" if started else ""
        raise LaunchError(f"--branch-from: the run directory {run_dir} has a checkpoint of its own ({last}{was}): "
                          f"starting it from {source} would train over it and overwrite it; drop --branch-from to "
                          f"resume it, or branch into another --run-dir")
    return origin

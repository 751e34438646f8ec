"""Whether this user can write where a subcommand writes in its run directory, checked at the start.

On a shared cluster a run directory may be another user's (a colleague's run to resume or score) or on a
read-only mount. ``fit`` takes ``RUN/.lock`` first, which catches a directory this user cannot write at all;
but a lock file left writable (``chmod a+w``, a group-writable tree) let a ``fit`` go on into W&B's
``PermissionError`` traceback (``RUN/wandb/... is not writable``) as the loggers started, and ``validate`` /
``test`` (no lock) failed as a jsonargparse or W&B traceback after the checkpoint was loaded. Here the
directories (and the few files written in place) are looked at before anything starts, and the first one
this user cannot write is one ``ConfigError`` line naming it, its owner and the setting to change.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_prep.format import MANIFEST_NAME
from pipeline.config_history import HISTORY_DIR
from pipeline.errors import ConfigError
from pipeline.file_access import describe_owner, me, unreachable_reason, unwritable_part
from pipeline.run_layout import CHECKPOINTS_DIR, CSV_DIR, METRICS_CSV, TENSORBOARD_DIR, WANDB_DIR, WANDB_ENV_DIRS
from pipeline.sample_grid import GRID_FILE

# what fit writes in RUN: directories it creates or writes into, files it rewrites in place (the others are
# written beside and renamed, which needs the directory alone)
FIT_DIRS = (CHECKPOINTS_DIR, CSV_DIR, WANDB_DIR, TENSORBOARD_DIR, HISTORY_DIR)
FIT_FILES = (f"{CSV_DIR}/{METRICS_CSV}", GRID_FILE)


def check_run_dir_writable(run_dir: str | Path, subcommand: str, wandb: bool, ckpt: str | None = None) -> None:
    """Refuse, before anything starts, a run directory where ``subcommand`` could not write what it writes.

    Args:
        run_dir: ``trainer.default_root_dir``.
        subcommand: ``fit``, ``validate`` or ``test`` (the latter two write ``RUN/config-<sub>.yaml`` and
            log into ``RUN/<sub>/``).
        wandb: ``tracking.wandb`` (W&B's cache and config folders go into RUN unless set elsewhere).
        ckpt: the checkpoint ``validate``/``test`` score (for the advice: it stays where it is).
    """
    run_dir = Path(run_dir)
    check_run_dir_reachable(run_dir)
    check_run_dir_is_no_dataset(run_dir)
    if subcommand == "fit":
        paths = [run_dir, *(run_dir / d for d in FIT_DIRS), *(run_dir / f for f in FIT_FILES)]
    else:
        paths = [run_dir, run_dir / subcommand]
    if wandb:
        paths += [run_dir / name for env, name in WANDB_ENV_DIRS.items() if not os.environ.get(env)]
    for path in paths:
        if not (path == run_dir or path.exists()):
            continue  # created in RUN, checked with it
        bad = unwritable_part(path)
        if bad is None:
            continue
        where = "" if bad == path else f" (to create {path})"
        if subcommand == "fit":
            advice = ("a run directory of another user, or on a read-only file system? train in one of your own: "
                      "--trainer.default_root_dir DIR (with --ckpt_path CHECKPOINT to start from one of this run's "
                      "checkpoints), or get write access to it")
        else:
            ckpt = ckpt or str(run_dir / CHECKPOINTS_DIR / "last.ckpt")
            advice = (f"{subcommand} writes its config and logs there; score from a run directory of your own: "
                      f"--trainer.default_root_dir DIR --ckpt_path {ckpt}")
        if _own_writable_mount(bad):  # this user's folder, its mode alone in the way: "another user's?" misled
            advice = f"it is {me()}'s own, without write permission: `chmod u+w {bad}` gives it; or {advice}"
        raise ConfigError(f"trainer.default_root_dir: {bad}{where} is not writable by {me()}{describe_owner(bad)}: "
                          f"{advice}")


def _own_writable_mount(path: Path) -> bool:
    """``path`` belongs to this user and is on a file system mounted writable: only its mode keeps it read-only."""
    try:
        return path.stat().st_uid == os.geteuid() and not os.statvfs(path).f_flag & os.ST_RDONLY
    except OSError:
        return False


def check_run_dir_is_no_dataset(run_dir: str | Path) -> None:
    """Refuse a run directory that is a data_prep output folder (``--trainer.default_root_dir`` given the shards'
    folder, data.root): fit wrote checkpoints/, csv/ and config.yaml among the shards, and data_prep then refused
    that folder as a training run directory, its repair and add-a-split commands included."""
    if unreachable_reason(run_dir) is None and (Path(run_dir) / MANIFEST_NAME).is_file():
        raise ConfigError(f"trainer.default_root_dir: {run_dir} holds {MANIFEST_NAME}: it is a data_prep output "
                          f"folder (the shards' data.root?), not a run directory; train in a folder of its own "
                          f"(--trainer.default_root_dir runs/NAME)")


def check_run_dir_reachable(run_dir: str | Path) -> None:
    """Refuse a run directory inside a folder this user may not enter (another user's home, mode 700): Python's
    ``Path.exists`` raised the bare ``PermissionError`` there, a traceback from the run lock (``fit``) or the
    check above (``validate``/``test``)."""
    if (why := unreachable_reason(run_dir)) is not None:
        raise ConfigError(f"trainer.default_root_dir: cannot reach {run_dir} ({why}): train or score in a run "
                          f"directory of your own (--trainer.default_root_dir DIR), or get access to it")

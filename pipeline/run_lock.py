"""One training job per run directory at a time.

Two jobs training into one run directory (a submission repeated while the first one still runs, two
people picking the same name) would overwrite each other's ``last.ckpt`` and resume from each other's
state, and the second one's start-up clean-up (``recover_directories``) would delete the checkpoint the
first one is writing. So ``fit`` holds an exclusive ``flock`` on ``RUN/.lock`` from its start to its end,
on global rank 0, and writes into the file which job holds it. A second job's rank 0 then fails at once
with a one-line error naming the holder. Its other ranks touch nothing in the run directory until the
file names their own job, which their rank 0 writes once it holds the lock.

A job is known by a key all its ranks share: the Slurm job (id, step, restart count), torchrun's run id,
or the rendezvous address. A requeued Slurm job takes over a lock that its previous run (same job id, a
lower restart count) still seems to hold: Slurm never runs two instances of one job, and on NFS the
lock of a node that died can stay held until that node reboots. The file is never deleted (a new file
would not be locked by the holder of the old one), except with the run directory that ``acquire`` created
when nothing else was written into it (a run refused at start), and the holding process never opens it
again: on NFS ``flock`` is a POSIX lock, which closing any descriptor of the file in that process drops.
At its end the holder adds the time it let go (``"released"``) to its record: the job's processes still exit
after that (W&B finishing) while Slurm says the job runs, and ``launch status`` tells that from a lock that
does not reach this node.

Where ``flock`` does not reach across nodes (NFS mounted with ``local_lock``, Lustre's ``localflock``)
or does not work at all (a warning), a second job on another node takes the "lock" too and writes its
record over the first one's. ``RunDirStillOurs`` (``pipeline/run_dir_still_ours.py``) checks the record
before every checkpoint: the first job then stops with an error before it writes over the second's state,
instead of the two alternating.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import NamedTuple

from pipeline.errors import ConfigError
from pipeline.run_layout import BRANCH_FILE, CSV_DIR, LOCK_NAME, RUN_ID_FILE

log = logging.getLogger(__name__)

# No Lightning or torch here: `python -m launch status` reads the lock through this module.

# what a start writes before its first step: a run directory made by a refused start holding only these goes
# (config.yaml: written once a run is under way; BRANCH_FILE: by launch before the job is queued, or as a
# branch's first start begins training, BranchOrigin.on_train_start)
START_FILES = {LOCK_NAME, RUN_ID_FILE, BRANCH_FILE, f"{CSV_DIR}/hparams.yaml"}
KEY_ENV = "PIPELINE_RUN_LOCK_KEY"  # rank 0's key, inherited by the ranks Lightning starts on its node


def is_global_rank_zero() -> bool:
    """Before the trainer exists: ``RANK`` (torchrun), else ``SLURM_PROCID`` (srun) and Lightning's own
    ``LOCAL_RANK``/``NODE_RANK`` for the processes it starts."""
    env = os.environ
    if "RANK" in env:
        return env["RANK"] == "0"
    return all(env.get(k, "0") == "0" for k in ("SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def job_key() -> str:
    """The same string on every rank of one job, different for any other job running at the same time: every
    launcher layer present (Slurm job, step and restart count; torchrun's run id and restart count; the
    rendezvous address, which no two live jobs share)."""
    env = os.environ
    if env.get(KEY_ENV):
        return env[KEY_ENV]
    parts = []
    if env.get("SLURM_JOB_ID"):
        parts.append(f"slurm job {env['SLURM_JOB_ID']} step {env.get('SLURM_STEP_ID') or '-'} "
                     f"restart {env.get('SLURM_RESTART_COUNT') or '0'}")
    if env.get("TORCHELASTIC_RUN_ID"):
        parts.append(f"torchrun {env['TORCHELASTIC_RUN_ID']} restart {env.get('TORCHELASTIC_RESTART_COUNT') or '0'}")
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        parts.append(f"rendezvous {env['MASTER_ADDR']}:{env['MASTER_PORT']}")
    return ", ".join(parts) or f"process {os.getpid()} on {socket.gethostname()}"


class RunDirLock:
    """``acquire`` on global rank 0 (or wait for it on the others); ``release`` at the end of ``fit``.

    Args:
        run_dir: the run directory (``trainer.default_root_dir``).
        wait_s: how long a rank other than 0 waits for its rank 0 to hold the lock (as long as torch's default
            process-group timeout, which such a rank would wait for its rank 0 anyway).
    """

    def __init__(self, run_dir: str | Path, wait_s: float = 1800.0) -> None:
        self.run_dir, self.wait_s = Path(run_dir), float(wait_s)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._set_env = False
        self._key: str | None = None  # the job this process wrote into the file (global rank 0)
        self._made_dir = False  # acquire created the run directory
        self._flocked = False  # holds the flock (not after a takeover from a stuck holder, until retaken)
        self._ids: tuple[tuple[int, int], tuple[int, int]] | None = None  # (lock file, run dir) (st_dev, st_ino)
        self._abs_dir = Path(os.path.abspath(self.run_dir))  # set again at acquire
        self._previous: dict = {}  # the record this start wrote over: the job that held the run before
        self._fit_started = False  # set as the fit starts (RunDirStillOurs.on_fit_start)

    def acquire(self) -> None:
        key = job_key()
        if not is_global_rank_zero():
            self._wait_for(key)
            return
        blocker = next((p for p in (self.run_dir, *self.run_dir.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:  # mkdir said "File exists" about the lock file
            raise ConfigError(f"trainer.default_root_dir: {blocker} is a file, not a directory; name a directory "
                              f"for the run")
        try:
            self._made_dir = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise ConfigError(f"trainer.default_root_dir: cannot open {self.path} for writing: {e.strerror}") from None
        try:
            _flock_exclusive(fd)
            self._flocked = True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                holder = _read(self.path)
                if not _previous_run_of_this_job(holder):
                    os.close(fd)
                    raise ConfigError(self._busy(holder)) from None
                log.warning("taking over %s from the previous run of this job (%s): its lock is still held, "
                            "as by a node that died", self.path, holder.get("job"))
            elif e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                log.warning("cannot lock %s on this filesystem (%s): a second job in this run directory at the "
                            "same time is detected only when this one next saves a checkpoint", self.path, e.strerror)
            else:
                os.close(fd)
                raise
        self._fd = fd
        _LOCK_FDS.add(fd)
        # absolute: a chdir of the process later must not look like a move
        self._abs_dir = Path(os.path.abspath(self.run_dir))
        try:  # what `whereabouts` compares the paths with before every save
            self._ids = (_identity(os.fstat(fd)), _identity(os.stat(self._abs_dir)))
        except OSError:  # (moved away already, or no stat here): not checked
            self._ids = None
        if KEY_ENV not in os.environ:
            os.environ[KEY_ENV] = key  # the ranks Lightning starts on this node inherit it
            self._set_env = True
        record = {"job": key, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                  "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                  "host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        data = (json.dumps(record) + "\n").encode()
        self._previous = _read(self.path)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except OSError as e:  # a full disk or quota: nothing of the run can be written either
            self.release()
            raise ConfigError(f"trainer.default_root_dir: cannot write {self.path}: {e.strerror or e}") from None
        self._key = key

    def taken_by(self) -> dict:
        """The record of another job that has written itself into the lock file since this process took
        it; {} while the file still names this job (or cannot be read), and on ranks that hold no lock.
        After a takeover from a stuck holder, the flock is taken here as soon as it is free again, so that
        from then on a new job is refused at its start (rather than stopping this one at its next save)."""
        if self._key is None:
            return {}
        if not self._flocked and self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._flocked = True
                log.info("%s: the previous holder's lock is gone; this job holds it now", self.path)
            except OSError:
                pass  # still held (or no locks on this filesystem): the record check below covers it
        record = _read(self.path)
        return record if record.get("job") not in (None, self._key) else {}

    def whereabouts(self) -> Whereabouts | None:
        """None while ``RUN/.lock`` is still the file this process locked at its start (and on ranks that hold
        no lock). Else what happened: the run directory was moved or renamed (``now``: where it is, where this
        process can tell, from the path of its open lock file), deleted, or is gone where to this process cannot
        tell (an NFS client's other node moved it); or the directory is still there and its lock file was deleted
        or replaced. A save then would write into a directory of the same name (``mkdir``, a logger) that has
        none of the run: no config, no lock, not the checkpoint the moved run would resume from."""
        if self._fd is None or self._ids is None:
            return None
        lock_id, dir_id = self._ids
        try:
            if _identity(os.stat(self._abs_dir / LOCK_NAME)) == lock_id:
                return None
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
                return None  # cannot tell (no permission, an I/O error): the save goes on, or fails on its own
        try:
            same_dir = _identity(os.stat(self._abs_dir)) == dir_id
        except OSError:
            same_dir = False
        if same_dir:
            return Whereabouts("lock", self.run_dir)
        try:
            link = os.readlink(f"/proc/self/fd/{self._fd}")  # Linux: the open file's path now
        except OSError:
            return Whereabouts("gone", None)
        if link.endswith(" (deleted)"):
            return Whereabouts("deleted", None)
        try:
            if _identity(os.stat(link)) == lock_id:
                return Whereabouts("moved", Path(link).parent)
        except OSError:
            pass
        return Whereabouts("gone", None)

    def fit_started(self) -> None:
        """The start passed its checks and its fit began: it stays the run's last holder once it ends."""
        self._fit_started = True

    def release(self) -> None:
        if self._fd is not None:
            _LOCK_FDS.discard(self._fd)
            if self._made_dir:
                self._remove_unused_dir()
            if not self._restore_previous_holder():
                self._stamp_released()
            os.close(self._fd)  # the kernel drops the flock; the file stays
            self._fd = None
            self._flocked = False
        self._key = None
        self._ids = None
        if self._set_env:
            os.environ.pop(KEY_ENV, None)
            self._set_env = False

    def _restore_previous_holder(self) -> bool:
        """A start refused before its fit began (another network, a world size a ZeRO checkpoint cannot take)
        puts back the record it wrote over: ``launch status`` named the refused process as the run's last
        training job, timestamped after the training had ended. Still under the flock; a file another job has
        written since (no working locks) is left alone. Whether it put the record back (which keeps its own
        job's ``released``).

        Not where other ranks of this job started on their own (srun's tasks, torchrun's workers: they wait in
        ``_wait_for`` until the file names their job): one that had not yet read it would wait out its 30
        minutes while rank 0 ended with "the run is complete" (exit 0, so srun kills none). The ranks Lightning
        starts itself come after the start's checks, so a single-task start restores."""
        if self._fit_started or not self._previous or self._key is None or self._fd is None or _other_ranks_wait():
            return False
        try:
            if _read(self.path).get("job") != self._key:
                return False
            _rewrite(self._fd, self._previous)
        except OSError:  # the run directory went, or the disk is full: the refused start's record stays
            return False
        return True

    def _stamp_released(self) -> None:
        """``"released": TIME`` added to the record this job wrote, still under the flock: the lock is free from
        now on while the job's processes still exit (W&B finishing, the step ending) and Slurm still says RUNNING,
        and ``launch status`` then says the job is ending, not that locks may not reach across nodes. A file
        another job has written since (no working locks) is left alone."""
        if self._key is None or self._fd is None:
            return
        try:
            record = _read(self.path)
            if record.get("job") != self._key:
                return
            record["released"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            _rewrite(self._fd, record)
        except OSError:  # the run directory went, or the disk is full: the record stays as it was
            pass

    def _remove_unused_dir(self) -> None:
        """A run directory this job created and left holding nothing but what a start writes before the
        first step (the lock, ``wandb_run_id``, a branch's ``branched_from``, the CSV logger's ``hparams.yaml``: the run
        was refused, e.g. a mistyped ``data.root`` or a split too small for the batch) goes again: it would
        otherwise be listed as a run that never was. Removed while still locked, so no other job can be
        inside it; a file of any other name (metrics, a checkpoint, a W&B run) keeps it."""
        try:
            files = [p.relative_to(self.run_dir).as_posix() for p in self.run_dir.rglob("*") if not p.is_dir()]
            if set(files) <= START_FILES:
                for name in sorted(files, key=lambda f: f == LOCK_NAME):  # the lock last
                    (self.run_dir / name).unlink()
                for d in sorted((p for p in self.run_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    d.rmdir()
                self.run_dir.rmdir()
        except OSError:  # something appeared meanwhile, or no permission: the directory stays as it is
            pass

    def _wait_for(self, key: str) -> None:
        """A rank other than 0: until the file names this job (then its rank 0 holds the lock)."""
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            if _read(self.path).get("job") == key:
                return
            time.sleep(0.2)
        raise ConfigError(f"{self.path} does not name this job ({key}) after {self.wait_s:.0f} s; "
                          f"{self._busy(_read(self.path))}")

    def _busy(self, holder: dict) -> str:
        who = describe(holder) if holder else f"no details in {self.path}"
        return (f"trainer.default_root_dir: run directory {self.run_dir} is in use by another training job "
                f"({who}); two jobs in one run directory overwrite each "
                f"other's checkpoints. Wait for it to end, stop it, or choose another run directory (if that job "
                f"is gone and its node died, delete {self.path})")


class Whereabouts(NamedTuple):
    """What ``RunDirLock.whereabouts`` found: ``kind`` "moved" (to ``now``), "deleted", "gone" (where to,
    unknown here) or "lock" (the run directory, ``now``, is there; its lock file was deleted or replaced)."""

    kind: str
    now: Path | None


def _other_ranks_wait() -> bool:
    """Whether this job has ranks started beside this process (srun tasks, torchrun workers), which wait for the
    lock file to name their job (``_wait_for``)."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        try:
            if int(os.environ.get(key, "1")) > 1:
                return True
        except ValueError:
            return True
    return False


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


_LOCK_FDS: set[int] = set()  # descriptors of the locks this process holds


def _close_in_forked_child() -> None:
    """A forked child (a DataLoader worker) shares the parent's lock; closing its copy keeps the lock
    from outliving a parent killed outright (the parent's own descriptor still holds it)."""
    for fd in list(_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)


def _flock_exclusive(fd: int, patience_s: float = 2.0) -> None:
    """``flock(LOCK_EX | LOCK_NB)``, retried for ``patience_s`` while it is held: ``launch status`` takes a
    shared lock for an instant, and a just-killed holder's forked children can still hold it briefly."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES) or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def describe(record: dict) -> str:
    """A lock record in words: its job, then host, pid and time where the job's name lacks them."""
    job = str(record.get("job", "unknown job"))
    parts = [job]
    if record.get("host") and f" on {record['host']}" not in job:
        parts.append(f"host {record['host']}")
    if record.get("pid") is not None and f"process {record['pid']} " not in job:
        parts.append(f"pid {record['pid']}")
    if record.get("since"):
        parts.append(f"since {record['since']}")
    return ", ".join(parts)


def holder(run_dir: str | Path) -> tuple[bool | None, dict]:
    """Whether a job holds the run directory's lock now (None: no lock file, or it cannot be tested), and
    the record of the last job that took it. For ``launch status``; never from the holding process."""
    path = Path(run_dir) / LOCK_NAME
    record = _read(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, record
    except OSError as e:
        return None, record or {"job": f"unknown (cannot read {path}: {e.strerror})"}
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False, record
    except OSError as e:
        return (True if e.errno in (errno.EWOULDBLOCK, errno.EACCES) else None), record
    finally:
        os.close(fd)  # also drops the shared lock just taken


def _rewrite(fd: int, record: dict) -> None:
    """The lock file's whole content replaced by ``record`` (the holder's own descriptor, under its flock)."""
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):  # not there yet, or being written
        return {}


def _previous_run_of_this_job(holder: dict) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return bool(job) and holder.get("slurm_job_id") == job and int(holder.get("restart", 0)) < restart

"""One writer of OUT's manifest.json (and rejects.jsonl) at a time.

``finalize`` reads the manifest, puts its splits in and writes it back, and a rerun whose plan changed takes
its split out the same way. Two such writers at once, say the finalize jobs of a train and a val split
prepared into one OUT by separate Slurm jobs, each wrote back what it had read: the split finalized first
vanished from the manifest. Each read-modify-write holds an exclusive ``flock`` on ``OUT/.work/manifest.lock``,
so they take turns (a finalize takes seconds). Each prep task's look at the manifest and its claim of the
class list it labels by (``class_list.claim_classes``) is one step under it too. Where the file system has no
working locks (``ENOLCK``: NFS without its lock daemon) it goes on unlocked, with a note: splits then must not
be finalized at the same time.
"""
from __future__ import annotations

import errno
import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.file_access import describe_owner, me, unwritable_part

from .errors import PrepError
from .format import WORK_DIR

LOCK_NAME = "manifest.lock"


@contextmanager
def manifest_lock(out: Path) -> Iterator[None]:
    """Hold OUT's manifest lock (waiting for another holder) for the body of the ``with``."""
    path = Path(out) / WORK_DIR / LOCK_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:  # a read-only OUT: the one line every write of data_prep gives
        if not Path(out).exists() and (where := unwritable_part(Path(out))) is not None:
            # it named OUT/.work/manifest.lock, two levels below the folder this user may not make
            raise PrepError(f"{out}: cannot create the output folder: {exc.strerror or exc}: {me()} may not write "
                            f"in {where}{describe_owner(where)}") from None
        raise PrepError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"data_prep: note: {path}: this file system refuses file locks ({e.strerror}); writing "
                  f"{Path(out) / 'manifest.json'} without one: do not finalize splits of it at the same time",
                  file=sys.stderr)
        yield
    finally:
        os.close(fd)  # drops the lock

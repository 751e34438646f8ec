"""Where a branch started, recorded in its run directory (``RUN/branched_from``) from its first start, or
from ``launch submit train --branch-from`` before the job is queued: a start that finds no checkpoint of the
run's own starts from there (``pipeline/branch_origin.py``). No torch or Lightning here: the launcher writes
it on login nodes.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pipeline.run_layout import BRANCH_FILE


def origin_name(path: str | Path) -> str:
    """How a branch's origin is recorded and compared: absolute, symlinks resolved."""
    return os.path.realpath(path)


def record_origin(run_dir: Path, origin: str) -> None:
    """``RUN/branched_from`` holds ``origin``, whole or not at all. Global rank 0 writes it, or ``launch``:
    ``launch torchrun --branch-from`` runs on every node at once, whose processes may have one pid (in
    containers), so the temporary name is drawn (one pid's name was truncated and renamed by two writers: the
    second rename failed, FileNotFoundError)."""
    target = run_dir / BRANCH_FILE
    if recorded_origin(run_dir) == origin:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    written = run_dir / f".{BRANCH_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(written, "w") as f:
            f.write(origin + "\n")
            f.flush()
            os.fsync(f.fileno())  # on the disk before its name: a node that crashes leaves it whole or absent
        os.replace(written, target)
    finally:
        written.unlink(missing_ok=True)


def recorded_origin(run_dir: Path) -> str | None:
    """The checkpoint this run directory's branch started from, or None (not a branch, or an empty file). Bytes
    that are not UTF-8 (a file damaged or edited) are read as they come: a path that does not exist, said as
    such by ``fit`` and shown by ``launch status`` (a UnicodeDecodeError traceback in both)."""
    try:
        return (run_dir / BRANCH_FILE).read_text(errors="replace").strip() or None
    except FileNotFoundError:
        return None

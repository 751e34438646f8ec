"""Who may write or read a path, said the way the one-line errors say it (``pipeline.run_dir_access``, the
shard reader, DeepSpeed's extensions folder). No torch here: the loaders' workers import it."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path


def describe_owner(path: Path, writing: bool = True) -> str:
    """`` (on a read-only file system)`` (when ``writing``), else `` (owned by USER, MODE)``: why this user
    cannot write (or read) ``path``."""
    try:
        st = path.stat()
        if writing and os.statvfs(path).f_flag & os.ST_RDONLY:
            return " (on a read-only file system)"
    except OSError:
        return ""
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        name = str(st.st_uid)
    return f" (owned by {name}, {stat.filemode(st.st_mode)})"


def me() -> str:
    """This process's user name (its uid where it has none)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def unwritable_part(path: Path) -> Path | None:
    """``path`` (or, where it does not exist yet, the nearest folder above it that does) when this user cannot
    create or change files there; None when it can."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.is_dir():
        ok = os.access(p, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)
    else:  # a file: written in place, or in the way of a folder to create
        ok = p == path and os.access(p, os.W_OK, effective_ids=os.access in os.supports_effective_ids)
    if ok and p.is_dir():
        # a read-only mount: access() says so too on Linux (EROFS), but not every file system does
        try:
            ok = not (os.statvfs(p).f_flag & os.ST_RDONLY)
        except OSError:
            pass
    return None if ok else p


def unreachable_reason(path: str | Path) -> str | None:
    """Why this user cannot reach ``path`` (a folder above it it may not enter: another user's home, mode
    700), else None (also when it is missing: the callers say that in their own words). Python's
    ``Path.exists`` raised the bare ``PermissionError`` there (a traceback where a one-line error was meant)."""
    try:
        os.stat(path)
        return None
    except PermissionError as e:
        full = Path(os.path.abspath(path))
        for folder in [*reversed(full.parents), full]:
            if folder.is_dir() and not os.access(folder, os.X_OK, effective_ids=os.access in os.supports_effective_ids):
                return f"{e.strerror}: {me()} may not enter {folder}{describe_owner(folder, writing=False)}"
        return e.strerror
    except OSError:
        return None

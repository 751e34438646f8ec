"""The temporary files of ``export``: named after their writer, so that a later export removes those of a killed one.

An export writes ``OUT`` beside it first (``.tmp-OUT.export-PID-START@HOST.XXXXXXXXXXXX``) and renames it into
place; a SIGKILL or SIGTERM during the write (no clean-up runs) left that file, as large as the weights, for
good. The next export into the same folder removes such files, and only those it can tell are dead: written
on this host (a writer on another node sharing the file system cannot be checked from here), by a process
that is gone (no process ``PID``, or one that started at another time than ``START``, the writer's start in
clock ticks since boot: the pid was reused), and not locked (the writer holds an ``flock`` on its file while it
writes, which a process in another pid namespace of this host still shows). Two exports into one folder at once
leave each other's files alone. Files of other writers (a training's checkpoint saves, ``.tmp-NAME.XXXX``) are
never touched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import socket
from pathlib import Path

from pipeline.checkpoint_io import TMP_PREFIX
from pipeline.process_start import start_ticks

NAME = re.compile(rf"{re.escape(TMP_PREFIX)}(?P<target>.+)\.export-(?P<pid>\d+)-(?P<start>\d+)@(?P<host>.+)"
                  r"\.[0-9a-f]{12}")


def temp_path(out: str | Path) -> Path:
    """Where this process writes ``out`` before renaming it into place."""
    out = Path(out)
    return out.with_name(f"{TMP_PREFIX}{out.name}.export-{os.getpid()}-{start_ticks(os.getpid()) or 0}@"
                         f"{_host()}.{secrets.token_hex(6)}")


def remove_killed(folder: str | Path) -> list[tuple[Path, int]]:
    """Remove the temporary files in ``folder`` of exports that died while writing; returns each with its size."""
    removed = []
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:  # not there yet, or not ours to list: nothing of ours left there
        return removed
    for entry in entries:
        m = NAME.fullmatch(entry.name)
        if m is None or m["host"] != _host() or not _writer_gone(int(m["pid"]), int(m["start"])):
            continue
        size = _unlink_unlocked(entry)
        if size is not None:
            removed.append((entry, size))
    return removed


def describe(folder: str | Path, removed: list[tuple[Path, int]]) -> str:
    """One line for what ``remove_killed`` removed."""
    files = "a temporary file of an export" if len(removed) == 1 else f"{len(removed)} temporary files of exports"
    names = ", ".join(p.name for p, _ in removed)
    mib = sum(size for _, size in removed) / 2**20
    return f"removed {files} killed while writing in {folder}: {names} ({mib:.1f} MiB)"


def _host() -> str:
    return socket.gethostname() or "localhost"


def _writer_gone(pid: int, start: int) -> bool:
    """Whether the process that wrote the file is gone (a pid reused since is another process)."""
    if pid == os.getpid():
        return False
    now = start_ticks(pid)
    if now is not None or Path("/proc/self/stat").is_file():
        return now is None or (start != 0 and now != start)
    try:  # no /proc: alive or not, as far as this pid namespace shows
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _unlink_unlocked(path: Path) -> int | None:
    """Remove ``path`` unless its writer's lock is held (a live writer this process cannot see); its size, or
    None when kept."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # gone already, or not ours to remove
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None  # a live writer holds it
            # a file system without flock: the pid check alone says
        size = os.fstat(fd).st_size
        path.unlink()
        return size
    except OSError:  # removed by another export at the same moment, or the folder is not ours to change
        return None
    finally:
        os.close(fd)

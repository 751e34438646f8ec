"""Atomic checkpoints: a kill or an error during a save leaves the previous checkpoint intact.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the
system temp directory; on commit it is *moved*, which is a copy (not atomic) when the run directory is on
another file system (the usual case on a cluster: /tmp is local, runs are on a shared FS), and nothing is
fsynced. Here the bytes go to a temporary file next to the target, are fsynced, then ``os.replace``d over
the target (atomic on POSIX), and the directory entry is fsynced.

DeepSpeed checkpoints are directories that every rank writes into. They are written to ``<name>.partial``,
fsynced, marked complete (an empty ``.complete`` file, once every rank's files are on disk), and swapped
in by two renames (``<name>`` -> ``<name>.old``, ``<name>.partial`` -> ``<name>``); ``recover_directories``
repairs a crash between the two renames at the next start, with the newer save when it was complete.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from pipeline.errors import CheckpointWriteError
from pipeline.run_layout import best_step

TMP_PREFIX = ".tmp-"
PARTIAL = ".partial"  # a checkpoint directory being written
OLD = ".old"  # the previous checkpoint directory, during the swap
COMPLETE = ".complete"  # in a checkpoint directory: all its files were on disk before the swap began


def atomic_write_bytes(data: bytes | memoryview, path: str | Path, tmp: str | Path | None = None,
                       hold_lock: bool = False, parents: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one. The
    temporary file (``tmp``, beside ``path``; by default ``.tmp-NAME.XXXXXXXXXXXX``) is created as a plain write
    would create it (0666 less the umask: group-readable where the umask says so; mkstemp's 0600 would not be).
    ``hold_lock``: an ``flock`` on it while it is written, which tells a clean-up that its writer is alive
    (``pipeline/export_temp_files.py``). ``parents``: also make the folders above ``path``'s own; without it only
    that one is made (a run's first save makes ``RUN/checkpoints``, never ``RUN`` itself: a run directory moved or
    deleted during the run is not made again at the old path, and the save fails with ``FileNotFoundError``)."""
    path = Path(path)
    path.parent.mkdir(parents=parents, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    if hold_lock:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without flock: the clean-up goes by the writer's pid in the name
            pass
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make renames and new entries in a directory durable. A file system that cannot fsync a directory
    (some FUSE mounts say EINVAL) has nothing more to give: every save failed there, after its file was
    already in place, with a message saying the previous file was intact."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(dir_fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and directory under ``path`` (what this process wrote reaches the disk or server)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def partial_path(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(final.name + PARTIAL)


def replace_directory(partial: str | Path, final: str | Path) -> None:
    """Swap the complete directory ``partial`` (every writer's files fsynced) in for ``final`` (which may not
    exist yet)."""
    partial, final = Path(partial), Path(final)
    old = final.with_name(final.name + OLD)
    if old.exists():  # left by an earlier crash after both renames: ``final`` is whole
        shutil.rmtree(old)
    marker = partial / COMPLETE
    with open(marker, "wb") as f:
        os.fsync(f.fileno())
    fsync_dir(partial)
    if final.exists():
        os.rename(final, old)
    os.rename(partial, final)  # a crash before this line: recover_directories finishes the swap
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_directories(folder: str | Path) -> list[tuple[Path, bool]]:
    """After a crash during a directory save, ``X`` missing: a complete ``X.partial`` becomes ``X`` (the save
    had ended; the crash came between the two renames), else ``X.old`` becomes ``X`` again (the last whole
    checkpoint). Other ``X.partial`` directories are removed: unfinished ones, and a complete one beside a
    whole ``X`` (a crash after the mark, before the first rename: ``X`` is the save before it, and finishing
    the swap would take two renames that concurrent ranks could interleave). So are the temporary files of file
    saves killed mid-write (``.tmp-*``, as large as a checkpoint each); an export's (``export --out`` into the
    folder) only when its writer is gone (``pipeline/export_temp_files.py``): one still writing would lose its
    file before its rename. Safe to run from every rank at once (before training starts, when no save can be in
    flight). Returns each checkpoint put in place, and whether it is the newer save."""
    from pipeline import export_temp_files  # (it imports this module)

    folder = Path(folder)
    recovered: list[tuple[Path, bool]] = []
    if not folder.is_dir():
        return recovered
    export_temp_files.remove_killed(folder)
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(TMP_PREFIX) and not entry.is_dir():
            if export_temp_files.NAME.fullmatch(entry.name) is None:
                entry.unlink(missing_ok=True)
            continue
        suffix = next((s for s in (OLD, PARTIAL) if entry.name.endswith(s)), None)
        if suffix is None or not entry.is_dir():
            continue
        final = entry.with_name(entry.name[: -len(suffix)])
        newer = partial_path(final)
        if not final.exists() and (newer / COMPLETE).is_file():
            try:
                os.rename(newer, final)
                recovered.append((final, True))
            except OSError:  # another rank did it first
                pass
        elif not final.exists() and suffix == OLD:
            try:
                os.rename(entry, final)
                recovered.append((final, False))
            except OSError:  # another rank put it back, or the newer save in its place
                pass
        if final.exists() or (suffix == PARTIAL and not (entry / COMPLETE).is_file()):
            shutil.rmtree(entry, ignore_errors=True)
    return recovered


def remove_best_after(last: str | Path, step: int) -> list[Path]:
    """Before a resume from ``last`` (the run's ``last.ckpt``, at ``step``): remove the best-k checkpoints
    beside it of a later step, written after it. A start killed after a validation's best-k save and before
    the ``last.ckpt`` after it left such a file, which the resumed checkpoint's best-k list does not name:
    kept, it was never replaced nor deleted (one more best file than ``checkpoint.save_top_k`` at every such
    kill), and the resumed run, which validates that step again, saved its own copy beside it as
    ``...-v1.ckpt``. Best files of a later step written *before* ``last`` stay: a run taken back by hand to an
    earlier checkpoint of its own, then requeued, has its old timeline's later best files there. Safe from
    every rank at once (before training starts). Returns the removed paths."""
    removed = []
    last = Path(last)
    try:
        since = last.stat().st_mtime
    except OSError:
        return removed
    for entry in sorted(last.parent.iterdir()):
        saved = best_step(entry.name)  # with Lightning's -vN for a name taken (run_layout.BEST_STEP)
        if saved is None or saved <= step:
            continue
        try:
            if entry.stat().st_mtime < since:
                continue
        except OSError:
            continue
        if entry.is_dir():  # a DeepSpeed checkpoint directory
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into memory, then an atomic replace of the checkpoint file (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote stores: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # a failure here never touches the file system
        try:
            atomic_write_bytes(buffer.getbuffer(), path, parents=False)  # RUN/checkpoints at most, not RUN
        except OSError as e:  # disk full, quota, I/O error: say which file, and that the old one is whole
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {e} (the previous file there, if any, is intact)"
            ) from e

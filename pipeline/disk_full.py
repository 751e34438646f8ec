"""What a run says when a write fails for want of room (ENOSPC, EDQUOT) or past the file-size limit (EFBIG):
one line naming the file system to free, so the user frees the right disk and runs the same command again."""
from __future__ import annotations

import errno
import os
import resource
import tempfile
from pathlib import Path

from pipeline.run_layout import last_checkpoint


def disk_full_message(error: OSError, run_dir: Path, subcommand: str = "fit",
                      elsewhere: list[Path] | None = None) -> str:
    """One line: what could not be written (torch, Lightning and W&B raise write errors that name no file,
    or name it), how much room the run directory has (or the file-size limit, for EFBIG), and that a rerun
    resumes (``fit``) or scores again. A named file on another file system (``/tmp``, ``$HOME``, a quota of its
    own) is the one said full: the run directory's free space would send the user to free the wrong disk. An
    error that names no file, with the run directory not nearly full, also lists the other file systems a run
    writes to (``elsewhere``, by default :func:`written_elsewhere`) with their free space: the full one may be
    any of them."""
    again = (f"fit resumes from {last_checkpoint(run_dir)} (if there is one yet)" if subcommand == "fit"
             else f"{subcommand} writes its logs under {run_dir / subcommand}")
    if error.errno == errno.EFBIG:  # Python ignores SIGXFSZ: a write past `ulimit -f` fails with this
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        said = "no limit" if limit == resource.RLIM_INFINITY else f"{limit // 1024} KiB"
        return (f"{error} (the process's file-size limit, ulimit -f: {said}; or the largest file the file system "
                f"takes); raise the limit (ulimit -f unlimited in the job script) and run the same command again: "
                f"{again}")
    named = next((Path(os.fsdecode(f)) for f in (error.filename, error.filename2) if f), None)
    if named is not None and (where := _file_system(named)) is not None and where != _file_system(run_dir):
        return (f"{error} (the file system at {_mount_point(named)}: {_room(named)}, not trainer.default_root_dir "
                f"{run_dir}'s: {_room(run_dir)}); free space there (or raise its quota, or point the program that writes it "
                f"elsewhere: TMPDIR for /tmp) and run the same command again: {again}")
    others = ""
    if named is None and _free_bytes(run_dir) >= ROOMY:  # a run directory with no room is the full one
        seen = {_file_system(run_dir)}
        listed = []
        for path in (written_elsewhere() if elsewhere is None else elsewhere):
            if (where := _file_system(path)) is not None and where not in seen:
                seen.add(where)
                mount = _mount_point(path)
                listed.append(f"{path}{'' if mount == _existing(path) else f' (on {mount})'}: {_room(path)}")
        if listed:
            others = "; the error names no file, and the run also writes to " + ", ".join(listed)
    return (f"{error} (trainer.default_root_dir {run_dir}: {_room(run_dir)}{others}); free space (or raise the quota) "
            f"and run the same command again: {again}")


def written_elsewhere() -> list[Path]:
    """Where a run writes outside its run directory: the temporary directory (``TMPDIR``: W&B's staged files,
    torch.compile's and Triton's caches by default), the caches' own settings when set, ``$HOME`` (``~/.cache``,
    ``~/.triton``, DeepSpeed's compiled ops) and the shared memory the loader's workers pass batches through."""
    # TMPDIR as set: Python's tempfile skips a TMPDIR it cannot write to (a full one), other programs do not
    tmp = os.environ.get("TMPDIR") or _quietly(tempfile.gettempdir)
    paths = [Path(tmp)] if tmp else []
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "WANDB_DIR", "WANDB_CACHE_DIR"):
        if os.environ.get(name):
            paths.append(Path(os.environ[name]))
    if home := _quietly(Path.home):
        paths.append(Path(home))
    return paths + [Path("/dev/shm")]


def _quietly(where) -> str | Path | None:
    """``where()``, or None where it raises: said while a write error is handled, a second error would hide it
    (tempfile finds no temporary directory when every one it tries is full; a user with no passwd entry and no
    HOME, as in some containers, has no home directory)."""
    try:
        return where()
    except (OSError, RuntimeError, KeyError):
        return None


def _existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (a file that could not be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _file_system(path: Path) -> int | None:
    try:
        return os.stat(_existing(path)).st_dev
    except OSError:
        return None


def _mount_point(path: Path) -> Path:
    path = _existing(path)
    try:
        dev = os.stat(path).st_dev
        while path != path.parent and os.stat(path.parent).st_dev == dev:
            path = path.parent
    except OSError:
        pass
    return path


ROOMY = 64 * 2**20  # free bytes past which a run directory is not taken for the full disk an error names no file of


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return ROOMY
    return st.f_bavail * st.f_frsize


def _room(path: Path) -> str:
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return "free space unknown"
    return f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB free"

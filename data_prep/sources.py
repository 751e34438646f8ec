"""Enumerate input files (from a folder or an uncompressed tar, nested tars included) as byte refs.

A ref is ``(path, offset, size)``: a plain file when offset is -1, else `size` bytes at `offset` of
the (outer) tar on disk. Members of tars nested inside tars get absolute offsets too, so a worker
reads any single image with one seek, and nothing but the plan is held in memory.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from typing import TYPE_CHECKING, Callable, Iterable

from pipeline.wording import plural

from .errors import PrepError

if TYPE_CHECKING:
    from .inputs import FileTable

Ref = tuple[str, int, int]


@dataclass(slots=True)
class FileEntry:
    """One regular file found in the source: its relative path parts and where its bytes live."""

    parts: tuple[str, ...]
    display: str
    ref: Ref
    mtime_ns: int = -1  # modification time (-1: unknown); in the plan, so a file edited in place is rebuilt


def tar_mtime_ns(member: tarfile.TarInfo) -> int:
    """A tar member's mtime from its header, in nanoseconds like ``st_mtime_ns``."""
    return round(member.mtime * 1_000_000_000)


def _file_table():
    from .inputs import FileTable  # inputs builds on FileEntry above
    return FileTable()


@dataclass
class Listing:
    """All regular files of a source plus the entries refused while listing (display, reason).

    `files` is a compact ``inputs.FileTable`` (append FileEntry, read back FileEntry copies), so a
    listing of millions of files costs tens of bytes per file instead of hundreds.
    """

    files: FileTable = field(default_factory=_file_table)
    rejects: list[tuple[str, str]] = field(default_factory=list)
    dirs: list[tuple[str, ...]] = field(default_factory=list)  # folders' parts: to name empty class folders


def unsafe_member_reason(name: str) -> str | None:
    """Why an archive member name must not be trusted (absolute, '..', empty), else None."""
    if not name or name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        return "unsafe archive member name (absolute path)"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "unsafe archive member name (path traversal '..')"
    return None


def _clean_parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))


def read_ref(ref: Ref, handles: dict | None = None) -> bytes:
    """Read the bytes of a ref; `handles` caches open archive files between calls."""
    path, offset, size = ref
    if offset < 0:
        with open(path, "rb") as f:
            return f.read()
    if handles is None:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    else:
        f = handles.get(path)
        if f is None:
            if len(handles) >= 8:
                handles.pop(next(iter(handles))).close()
            f = handles[path] = open(path, "rb")
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset} of {path}")
    return data


def open_tar(path: Path) -> tarfile.TarFile:
    """Open an uncompressed tar for random access, with a PrepError for anything else."""
    try:
        tf = tarfile.open(path, mode="r:")
    except tarfile.ReadError as exc:
        raise PrepError(f"{path}: not an uncompressed tar archive ({exc}); "
                        "compressed archives cannot be read by offset, extract or decompress them first") from None
    except OSError as exc:
        raise PrepError(f"{path}: cannot open archive: {exc}") from None
    return tf


def iter_tar_members(tf: tarfile.TarFile, archive: str, base_offset: int, prefix: str,
                     listing: Listing) -> list[tuple[tarfile.TarInfo, int, str]]:
    """Regular members of an open tar with absolute data offsets; unsafe/odd members go to rejects."""
    out = []
    try:
        while True:
            m = tf.next()
            if m is None:
                break
            tf.members.clear()  # TarFile caches every TarInfo; keep memory flat on huge archives
            display = f"{prefix}:{m.name}"
            reason = unsafe_member_reason(m.name)
            if m.isdir():
                if reason is None:
                    listing.dirs.append(_clean_parts(m.name))
                continue
            if reason is None and not m.isreg():
                reason = "not a regular file (link or device in archive)"
            if reason:
                listing.rejects.append((display, reason))
                continue
            out.append((m, base_offset + m.offset_data, display))
    except tarfile.TarError as exc:
        raise PrepError(f"{prefix}: corrupt archive after {plural(len(out), 'file')} ({exc}); every file after that "
                        f"point would be lost: re-download or re-create it") from None
    _check_archive_end(tf, prefix, len(out))
    return out


def last_of_each_name(members: list[tuple[tarfile.TarInfo, int, str]],
                      listing: Listing) -> list[tuple[tarfile.TarInfo, int, str]]:
    """`iter_tar_members`' list without the members a later one of the same name replaces (``tar -rf``
    appends; extracting keeps the last): those go to rejects, naming the byte where the later one starts."""
    last = {"/".join(_clean_parts(m.name)): k for k, (m, _off, _disp) in enumerate(members)}
    if len(last) == len(members):
        return members
    kept = []
    for k, (m, off, display) in enumerate(members):
        later, later_off, _ = members[last["/".join(_clean_parts(m.name))]]
        if later is m:
            kept.append((m, off, display))
        else:
            start = later_off - (later.offset_data - later.offset)  # the later member's header
            listing.rejects.append((display, f"replaced by a later member of the same name at byte {start}"))
    return kept


def _check_archive_end(tf: tarfile.TarFile, prefix: str, files: int) -> None:
    """``tarfile`` takes a cut-short archive, or a damaged header after the first member, for the archive's
    end: the files after it vanished without a word, and with them whole classes (every label after them
    moved). A sound archive ends with a zero block where the listing stopped."""
    try:
        tf.fileobj.seek(tf.offset)
        block = tf.fileobj.read(tarfile.BLOCKSIZE)
    except OSError as exc:
        raise PrepError(f"{prefix}: cannot read the archive's end at byte {tf.offset}: {exc}") from None
    if block == bytes(tarfile.BLOCKSIZE):
        return
    if len(block) < tarfile.BLOCKSIZE:  # nothing, or a part of a block: the file ends there
        ends = "there" if not block else f"{plural(len(block), 'byte')} later"
        what = (f"the archive ends {ends} without its "
                f"end-of-archive marker (cut short?)")
    else:
        what = "a damaged header is there"
    raise PrepError(f"{prefix}: listing stopped at byte {tf.offset} after {plural(files, 'file')}: {what}; every file "
                    f"after that point would be lost (`tar tf` shows where it stops): re-download or re-create "
                    f"the archive")


def list_tar(path: Path) -> Listing:
    """List the regular files of an uncompressed tar (no nesting)."""
    listing = Listing()
    with open_tar(path) as tf:
        for m, off, display in last_of_each_name(iter_tar_members(tf, str(path), 0, str(path), listing), listing):
            listing.files.append(FileEntry(_clean_parts(m.name), display, (str(path), off, m.size), tar_mtime_ns(m)))
    return listing


def list_dir(root: Path) -> Listing:
    """List regular files under a folder, sorted.

    Folder symlinks are followed (class folders linked from elsewhere are common, and torchvision's
    ImageFolder follows them too); a folder reached a second time (a link loop, or two links to one
    folder) is listed once and the repeat goes to rejects, as does a folder that cannot be read.
    """
    listing = Listing()
    seen: set[str] = set()

    def unreadable(exc: OSError) -> None:
        listing.rejects.append((os.fsdecode(exc.filename), f"cannot list folder: {exc.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            listing.rejects.append((dirpath, f"folder already listed as {real} (symlink loop or duplicate link)"))
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        if rel.parts:
            listing.dirs.append(rel.parts)
        for name in sorted(filenames):
            full = Path(dirpath) / name
            parts = tuple(rel.parts) + (name,)
            try:
                st = full.stat()
            except OSError as exc:
                listing.rejects.append((str(full), f"cannot stat: {exc.strerror}"))
                continue
            if not full.is_file():
                listing.rejects.append((str(full), "not a regular file"))
                continue
            path = os.fsdecode(full)
            listing.files.append(FileEntry(parts, path, (path, -1, st.st_size), st.st_mtime_ns))
    return listing


def list_source(src: Path) -> Listing:
    """List a folder or a .tar archive."""
    if not src.exists():
        raise PrepError(f"{src}: source does not exist")
    if src.is_dir():
        return list_dir(src)
    if src.is_file():
        return list_tar(src)
    raise PrepError(f"{src}: source is neither a folder nor a tar file")


def common_top(parts_of: Callable[[], Iterable[tuple[str, ...]]]) -> str | None:
    """The one shared top folder (e.g. ``train/``) to drop from every file's parts, else None.

    It is dropped when all files share the first folder and at least half of them sit two levels
    below it (``top/<class>/<file>``). `parts_of()` returns a fresh iterable of the files' parts
    (called twice), so callers with compact listings need not build a list of entries.
    """
    first = next(iter(parts_of()), None)
    if first is None:
        return None
    top = first[0]
    n = deep = 0
    shared = True
    for parts in parts_of():
        n += 1
        deep += len(parts) >= 3
        shared = shared and len(parts) >= 2 and parts[0] == top
    return top if shared and 2 * deep >= n else None


def is_hidden(parts: tuple[str, ...]) -> bool:
    """Dot-files and dot-folders (.DS_Store, ._x, .ipynb_checkpoints) are never samples."""
    return any(p.startswith(".") for p in parts)

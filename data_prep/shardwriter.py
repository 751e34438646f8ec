"""Write one WebDataset shard deterministically (fixed headers and order) plus its DALI index."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import secrets
import struct
import tarfile
from pathlib import Path

from .format import write_index

RECORD = 10240  # tarfile's default record size; the archive is padded to a multiple of it


class _HashingFile(io.RawIOBase):
    """Write-through file wrapper that keeps a running sha256 and byte count."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.n += len(b)
        return len(b)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks: what ``ShardWriter.commit`` returned for a shard it wrote."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


PARTIAL_SUFFIX = ".tmp"  # NAME.tar.XXXXXXXXXXXX.tmp, NAME.idx.XXXXXXXXXXXX.tmp: a shard being written
PARTIAL_TOKEN = r"\.[0-9a-f]{12}"  # (finalize removes leftovers; before the token, NAME.tar.tmp)


def partial_path(path: Path) -> Path:
    """Where one writer writes ``path`` before renaming it into place: a name of its own. With one fixed
    ``NAME.tar.tmp``, two commands building the same shard at once (an array task run again while the first
    still ran, a requeued task whose first run lives on) wrote into one file, and the second one's open
    truncated what the first then renamed into place: a shard with zeros where its first samples were, its
    done-record's sha256 not the file's. Now each writes its own and the last rename wins, whole."""
    return path.with_name(f"{path.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")


# what flock says of a lock another holds; other errors (ENOLCK: NFS without its lock daemon, EOPNOTSUPP,
# ENOSYS, EINVAL) mean the file system cannot tell
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def claim_temporary(fd: int) -> None:
    """Hold an exclusive ``flock`` on a temporary file being written, until it is renamed into place or its
    writer ends (the kernel drops the lock of a killed process): ``remove_abandoned`` leaves it alone. Where
    the file system has no working locks the writer goes on without one (``ShardWriter.commit`` then copes
    with its file removed under it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass


def remove_abandoned(path: Path) -> bool:
    """Remove the temporary file ``path`` unless a live writer holds it (``claim_temporary``); return whether it
    is gone.

    A run that finished every shard of a split removes ``.tmp`` leftovers of killed writers; it used to remove
    them all, also those another command building the same shards at once (an array task run again while the
    first still ran, a requeued task whose first run lives on, or the same command started twice) was still
    writing, and that writer's rename then failed (``OUT/val-000019.tar: cannot write shard: No such file or
    directory``). The lock is the writer's own: it is dropped when the writer ends, however it ends (kill -9,
    the out-of-memory killer), on this host or, where the file system shares locks (NFS with its lock daemon,
    Lustre mounted with ``flock``, GPFS), on another node. Opened for writing: NFS takes an exclusive
    ``flock`` only on such a file. Where no lock can be taken (no working locks, not this user's file) the file
    is removed as before: a live writer whose temporary is gone keeps the shard the other put in place, the
    same bytes (``ShardWriter.commit``)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return True  # renamed into place by its writer (or removed) since it was listed
    except OSError:
        fd = None  # a link (or not this user's file): cannot tell, removed as before
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _HELD:
                    return False  # a live writer's
        path.unlink(missing_ok=True)  # while holding the lock: its writer cannot have claimed it since
        return True
    finally:
        if fd is not None:
            os.close(fd)


class ShardWriter:
    """Stream samples (KEY.jpg, KEY.cls, KEY.lbl) into a temporary file; commit renames it into place."""

    def __init__(self, tar_path: Path, idx_path: Path):
        self.tar_path = Path(tar_path)
        self.idx_path = Path(idx_path)
        self.tmp = partial_path(self.tar_path)
        self.idx_tmp = partial_path(self.idx_path)
        self._raw = open(self.tmp, "wb")
        claim_temporary(self._raw.fileno())
        self._out = _HashingFile(self._raw)
        self.index: list[list[tuple[str, int, int, str]]] = []
        self.samples = 0

    def _member(self, name: str, data: bytes) -> tuple[int, int]:
        header = _header(name, len(data))
        self._out.write(header)
        offset = self._out.n
        self._out.write(data)
        pad = (-len(data)) % 512
        if pad:
            self._out.write(b"\0" * pad)
        return offset, len(data)

    def add(self, key: str, jpeg: bytes, label: int) -> None:
        """Append one sample; members in the fixed order jpg, cls, lbl."""
        members = []
        for ext, data in (("jpg", jpeg), ("cls", str(label).encode("ascii")), ("lbl", struct.pack("<i", label))):
            name = f"{key}.{ext}"
            off, size = self._member(name, data)
            members.append((ext, off, size, name))
        self.index.append(members)
        self.samples += 1

    def commit(self) -> tuple[int, str]:
        """Finish the archive, fsync, rename tar and index into place; return (bytes, sha256). The temporary
        files stay open (and locked, ``claim_temporary``) until they are renamed."""
        self._out.write(b"\0" * 1024)
        pad = (-self._out.n) % RECORD
        if pad:
            self._out.write(b"\0" * pad)
        self._raw.flush()
        os.fsync(self._raw.fileno())
        nbytes, sha = self._out.n, self._out.sha.hexdigest()
        idx_fd = os.open(self.idx_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            claim_temporary(idx_fd)
            write_index(self.idx_tmp, self.index)  # (the file just made: opened again, by its name)
            # tar first: a kill between the renames leaves a new tar (whose sha256 no old done-record
            # matches, so it is rebuilt), never an old, still-trusted tar next to a new index
            try:
                os.replace(self.tmp, self.tar_path)
            except FileNotFoundError:
                if not self._in_place(nbytes, sha):
                    raise
            try:
                os.replace(self.idx_tmp, self.idx_path)
            except FileNotFoundError:  # the tar in place is this writer's bytes: so is this index, written again
                again = partial_path(self.idx_path)
                write_index(again, self.index)
                os.replace(again, self.idx_path)
        finally:
            os.close(idx_fd)
            self._raw.close()
        return nbytes, sha

    def _in_place(self, nbytes: int, sha: str) -> bool:
        """Whether the shard in place is the one this writer built, though its temporary file is gone.

        Another command that built the same shard at once (the plan fixes its bytes) and then finished the
        split removes temporaries it takes for a killed writer's leftovers: where the file system has no
        working locks it cannot tell a live writer's (``remove_abandoned``). Its own shard, in place by then,
        is this writer's bytes: kept, this writer's work done. A shard in place with other bytes (or none: the
        temporary removed by hand) is the error it was."""
        try:
            return self.tar_path.stat().st_size == nbytes and file_sha256(self.tar_path) == sha
        except OSError:
            return False

    def abort(self) -> None:
        """Close and remove the temporary files (never raises: the original error is what matters)."""
        try:
            self._raw.close()  # flushing on a full disk raises again
        except OSError:
            pass
        for p in (self.tmp, self.idx_tmp):
            try:
                p.unlink()
            except OSError:
                pass

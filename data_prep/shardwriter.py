"""Write one WebDataset shard deterministically (fixed headers and order) plus its DALI index."""
from __future__ import annotations

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


class ShardWriter:
    """Stream samples (KEY.jpg, KEY.cls, KEY.lbl) into a temporary file; commit renames it into place."""

    def __init__(self, tar_path: Path, idx_path: Path):
        self.tar_path = Path(tar_path)
        self.idx_path = Path(idx_path)
        self.tmp = partial_path(self.tar_path)
        self.idx_tmp = partial_path(self.idx_path)
        self._raw = open(self.tmp, "wb")
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
        """Finish the archive, fsync, rename tar and index into place; return (bytes, sha256)."""
        self._out.write(b"\0" * 1024)
        pad = (-self._out.n) % RECORD
        if pad:
            self._out.write(b"\0" * pad)
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        write_index(self.idx_tmp, self.index)
        # tar first: a kill between the renames leaves a new tar (whose sha256 no old done-record
        # matches, so it is rebuilt), never an old, still-trusted tar next to a new index
        os.replace(self.tmp, self.tar_path)
        os.replace(self.idx_tmp, self.idx_path)
        return self._out.n, self._out.sha.hexdigest()

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

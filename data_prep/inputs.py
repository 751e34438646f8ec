"""Compact, append-only tables of input files, so the parent's listing stays small at ImageNet scale.

A million Python ``FileEntry`` objects (tuples, strings, ints) cost ~500 bytes each; here every
entry is a few bytes in flat buffers: display path and parts as UTF-8 (``surrogatepass``, so any
``str`` round-trips exactly and byte order equals ``str`` order), offsets and sizes as int64 arrays,
ref paths interned (a folder listing's ref path is its display path and is not stored twice).
Entries come back out as the same ``FileEntry`` / tuples the rest of data_prep already uses.
"""
from __future__ import annotations

from array import array
from typing import Iterator, Sequence

import numpy as np

from .sources import FileEntry, Ref

_ENC = "utf-8"
_ERR = "surrogatepass"
_SAME = -1  # path index meaning "the ref path is the display path"


def _enc(s: str) -> bytes:
    return s.encode(_ENC, _ERR)


def _dec(b: bytes) -> str:
    return b.decode(_ENC, _ERR)


class FileTable:
    """Append-only list of ``FileEntry`` stored in flat buffers; indexing/iteration rebuild entries."""

    def __init__(self) -> None:
        self._disp = bytearray()
        self._disp_end = array("q")
        self._parts = bytearray()  # parts joined by NUL (never in a path component)
        self._parts_end = array("q")
        self._paths: list[str] = []
        self._path_ids: dict[str, int] = {}
        self._path = array("i")
        self._off = array("q")
        self._size = array("q")
        self._mtime = array("q")
        self._no_parts: set[int] = set()  # rows whose parts tuple is empty (NUL-join cannot say)

    def append(self, entry: FileEntry) -> None:
        """Store one entry (the listers' ``files.append(FileEntry(...))`` call)."""
        path, off, size = entry.ref
        if path == entry.display:
            pid = _SAME
        else:
            pid = self._path_ids.get(path)
            if pid is None:
                pid = self._path_ids[path] = len(self._paths)
                self._paths.append(path)
        self._disp += _enc(entry.display)
        self._disp_end.append(len(self._disp))
        if not entry.parts:
            self._no_parts.add(len(self._off))
        self._parts += _enc("\0".join(entry.parts))
        self._parts_end.append(len(self._parts))
        self._path.append(pid)
        self._off.append(off)
        self._size.append(size)
        self._mtime.append(entry.mtime_ns)

    def __len__(self) -> int:
        return len(self._off)

    def display_bytes(self, i: int) -> bytes:
        """UTF-8 (surrogatepass) of entry `i`'s display path: sorts exactly like the ``str``."""
        start = self._disp_end[i - 1] if i else 0
        return bytes(self._disp[start:self._disp_end[i]])

    def sorted_by_display(self, rows: Sequence[int]) -> array:
        """`rows` stably sorted by display path, exactly like ``sorted(..., key=display)``.

        Uses one fixed-width numpy byte matrix (no per-row objects) when padding stays under the
        displays' own size and no display holds a NUL (numpy pads with NULs); else Python's sort.
        """
        rows = array("q", rows)
        ends = self._disp_end
        lengths = [ends[r] - (ends[r - 1] if r else 0) for r in rows]
        width = max(lengths, default=0)
        if not rows or width == 0 or len(rows) * width > 2 * sum(lengths) + (1 << 20) or 0 in self._disp:
            return array("q", sorted(rows, key=self.display_bytes))
        del lengths
        buf = bytearray(len(rows) * width)
        disp = self._disp
        for k, r in enumerate(rows):
            start = ends[r - 1] if r else 0
            buf[k * width:k * width + ends[r] - start] = disp[start:ends[r]]
        order = np.frombuffer(buf, dtype=f"S{width}").argsort(kind="stable")
        del buf
        return array("q", np.asarray(rows, dtype=np.int64)[order].tobytes())

    def display(self, i: int) -> str:
        return _dec(self.display_bytes(i))

    def parts(self, i: int) -> tuple[str, ...]:
        if i in self._no_parts:
            return ()
        start = self._parts_end[i - 1] if i else 0
        return tuple(_dec(bytes(self._parts[start:self._parts_end[i]])).split("\0"))

    def ref(self, i: int, display: str | None = None) -> Ref:
        pid = self._path[i]
        path = (display if display is not None else self.display(i)) if pid == _SAME else self._paths[pid]
        return (path, self._off[i], self._size[i])

    def size(self, i: int) -> int:
        return self._size[i]

    def mtime(self, i: int) -> int:
        return self._mtime[i]

    def __getitem__(self, i: int) -> FileEntry:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        disp = self.display(i)
        return FileEntry(self.parts(i), disp, self.ref(i, disp), self._mtime[i])

    def __iter__(self) -> Iterator[FileEntry]:
        for i in range(len(self)):
            yield self[i]


class LabelledItems(Sequence):
    """``Scan.items`` over a FileTable: (display, ref, label) for chosen rows, in the given order."""

    def __init__(self, table: FileTable, rows: Sequence[int], labels: Sequence[int]):
        self.table = table
        self.rows = array("q", rows)
        self.labels = array("i", labels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        row = self.rows[k]
        disp = self.table.display(row)
        return (disp, self.table.ref(row, disp), self.labels[k])

    def size(self, k: int) -> int:
        """Source bytes of item `k` (what the shard plan needs, without building the tuple)."""
        return self.table.size(self.rows[k])

    def mtime(self, k: int) -> int:
        """Modification time of item `k` (-1: unknown), for the plan hash."""
        return self.table.mtime(self.rows[k])


class KeptRows:
    """Rows of a FileTable kept for a split, each with its class folder name, interned (compact)."""

    def __init__(self, table: FileTable):
        self.table = table
        self.rows = array("q")
        self.name_ids = array("i")
        self.names: list[str] = []  # in order of first appearance
        self._ids: dict[str, int] = {}

    def add(self, row: int, name: str) -> None:
        nid = self._ids.get(name)
        if nid is None:
            nid = self._ids[name] = len(self.names)
            self.names.append(name)
        self.rows.append(row)
        self.name_ids.append(nid)

    def items(self, index: dict[str, int]) -> tuple[LabelledItems, list[tuple[int, str]]]:
        """The rows whose name is in `index` as ``Scan.items`` (label = ``index[name]``), sorted by display
        path like sorting the (display, ...) tuples (stable); and (row, name) of those left out."""
        label_of = [index.get(n, -1) for n in self.names]
        row_label = array("i", [-1]) * len(self.table)  # each listing row is kept at most once
        kept, dropped = array("q"), []
        for row, nid in zip(self.rows, self.name_ids):
            if label_of[nid] >= 0:
                kept.append(row)
                row_label[row] = label_of[nid]
            else:
                dropped.append((row, self.names[nid]))
        sorted_rows = self.table.sorted_by_display(kept)
        return LabelledItems(self.table, sorted_rows, (row_label[r] for r in sorted_rows)), dropped

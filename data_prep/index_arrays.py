"""A DALI index as numpy columns, parsed without a Python object per sample.

``format.read_index`` gives a dict of tuples per sample: the loaders' ``ShardSet`` read ImageNet's 1,281,167
train samples that way in about 5 s and 200 MB per rank at start (every rank of every node does), where
these columns take a fraction of it. Only an index of the regular shape that data_prep (and ``wds2idx``)
write is read here: printable ASCII, one line per sample ending in a newline, the same members in the same
order on every line, digits-only offsets and sizes. Anything else returns None, and the caller reads the
file with ``read_index``, whose errors name the file and the line: for every index this accepts,
``read_index`` returns the same offsets and sizes (``tests/test_index_arrays.py`` compares them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection

import numpy as np

from .format import INDEX_VERSION

_MAX_DIGITS = 18  # 10**18 < 2**63: a longer number is left to read_index (Python ints)


def index_arrays(idx_path: str | Path, offsets: Collection[str] | None = None, sizes: Collection[str] | None = None
                 ) -> tuple[int, dict[str, tuple[np.ndarray | None, np.ndarray | None]]] | None:
    """(samples, ext -> (offsets, sizes)) of a regular index, for every member its lines list: int64 arrays
    with one entry per sample, for the members in ``offsets`` and ``sizes`` (default: all; None for the others, whose
    numbers are checked, not kept); None for an index of any other shape (read it with ``format.read_index``)
    or one that cannot be read."""
    try:
        raw = Path(idx_path).read_bytes()
    except OSError:
        return None
    head_end = raw.find(b"\n")
    if head_end < 0:
        return None
    head = raw[:head_end].split(b" ")
    if len(head) != 2 or head[0] != INDEX_VERSION.encode() or not head[1].isdigit() or not head[1].isascii():
        return None
    count = int(head[1])
    arr = np.frombuffer(raw, dtype=np.uint8, offset=head_end + 1)
    if count == 0 or len(arr) == 0 or arr[-1] != 10:
        return None
    newline = arr == 10
    if arr.max() > 0x7E or not ((arr >= 0x20) | newline).all():
        return None  # printable ASCII only: read_index splits lines at \r and other breaks as well, decodes UTF-8
    sep = np.flatnonzero(newline | (arr == 32))
    ends_line = newline[sep]
    per_line = int(np.argmax(ends_line)) + 1  # tokens on the first line
    if per_line % 4 or len(sep) != per_line * count:
        return None
    ends_line = ends_line.reshape(count, per_line)
    if not (ends_line[:, -1].all() and not ends_line[:, :-1].any()):
        return None  # count lines of per_line tokens each
    starts = np.empty_like(sep)
    starts[0] = 0
    starts[1:] = sep[:-1] + 1
    lengths = sep - starts
    if not (lengths > 0).all():
        return None  # an empty token (two spaces): read_index's groups of four differ
    tokens = raw[head_end + 1:].split()  # the file's words in order: spaces and newlines are its only blanks
    lengths = lengths.reshape(count, per_line)
    exts = [tokens[col].decode("ascii") for col in range(0, per_line, 4)]
    if len(set(exts)) != len(exts):
        return None  # a member twice on a line: read_index keeps the last
    columns: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
    for g, ext in enumerate(exts):
        if tokens[4 * g::per_line].count(tokens[4 * g]) != count:
            return None  # another member (or order) on some line
        pair = []
        for col, kept in ((4 * g + 1, offsets), (4 * g + 2, sizes)):
            words = tokens[col::per_line]
            if not b"".join(words).isdigit() or lengths[:, col].max() > _MAX_DIGITS:
                return None  # not a plain non-negative integer (or one past int64)
            pair.append(np.fromiter(map(int, words), dtype=np.int64, count=count) if kept is None or ext in kept else None)
        columns[ext] = (pair[0], pair[1])
    return count, columns

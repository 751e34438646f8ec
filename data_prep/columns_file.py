"""One file per split with every sample's read positions, so a training rank reads one file at start.

The loaders need three numbers per sample: where its JPEG starts in its shard, its size, and where its
4-byte label starts. They are in the per-shard DALI indexes, but ImageNet's train split has 1,500 of them
(150 MB of text): every rank of a 1,024-rank job opening and parsing them all was some 150 GB of reads and
1.5 million opens on the shared file system per start. ``finalize`` writes the same numbers once, as one
``.npy`` (three int64 rows, 31 MB for ImageNet train), and records its size and sha256 in the split's
manifest entry (``columns``); ``ShardSet`` reads it when it matches and the indexes otherwise (a manifest
of before 2026-12-05, a file replaced or cut short), and ``verify`` checks it against the indexes.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from .format import ManifestError, index_of_entry, read_index
from .index_arrays import index_arrays
from pipeline.wording import plural

ROWS = ("jpg offset", "jpg size", "lbl offset")


def columns_name(split: str) -> str:
    """The columns file of `split` (``train.columns.npy``: a split's name has no dot, so it is no shard's)."""
    return f"{split}.columns.npy"


def shard_columns(idx_path: Path, samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(jpg offsets, jpg sizes, lbl offsets) of one shard's index, which lists the manifest's ``samples``.
    A regular index (all data_prep writes) is parsed into arrays at once (``index_arrays``); any other
    through ``read_index``, sample by sample, whose errors name the line. ManifestError names the index."""
    parsed = index_arrays(idx_path, offsets=("jpg", "lbl"), sizes=("jpg",))
    if parsed is not None:
        count, columns = parsed
        entries = None
    else:
        columns, entries = None, read_index(idx_path)
        count = len(entries)
    if count != samples:
        raise ManifestError(f"index {str(idx_path)!r} lists {plural(count, 'sample')}, manifest says {samples}")
    if columns is not None:
        if "jpg" not in columns or "lbl" not in columns:
            raise ManifestError(f"index {str(idx_path)!r} has a sample without 'jpg' or 'lbl'")
        return columns["jpg"][0], columns["jpg"][1], columns["lbl"][0]
    for e in entries:
        if "jpg" not in e or "lbl" not in e:
            raise ManifestError(f"index {str(idx_path)!r} has a sample without 'jpg' or 'lbl'")
    jpg = np.array([e["jpg"] for e in entries], dtype=np.int64).reshape(-1, 2)
    return jpg[:, 0], jpg[:, 1], np.array([e["lbl"][0] for e in entries], dtype=np.int64)


def columns_of_indexes(root: Path, shards: Sequence[dict]) -> np.ndarray:
    """The (3, samples) int64 columns of a split's shards (manifest entries), in id order, from their indexes."""
    total = sum(int(s["samples"]) for s in shards)
    out = np.zeros((len(ROWS), total), dtype=np.int64)  # filled shard by shard: no second copy at the end
    at = 0
    for s in shards:
        n = int(s["samples"])
        out[0, at:at + n], out[1, at:at + n], out[2, at:at + n] = shard_columns(root / index_of_entry(s), n)
        at += n
    return out


def columns_bytes(columns: np.ndarray) -> bytes:
    """The ``.npy`` file of `columns` (the same bytes for the same columns: no time, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(columns, dtype=np.int64), allow_pickle=False)
    return buf.getvalue()


def columns_entry(name: str, data: bytes) -> dict:
    """The manifest's ``columns`` field for a columns file of these bytes."""
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_columns(root: Path, entry: dict) -> tuple[np.ndarray | None, str]:
    """(columns, "") from the split entry's columns file, or (None, why not) when the entry has none or the file
    is missing, of another size or sha256 than recorded, or not columns of the entry's samples: the caller
    reads the indexes then (the same numbers, slower)."""
    rec = entry.get("columns")
    if rec is None:
        return None, "the manifest lists no columns file (written by a data_prep of before 2026-12-05)"
    path = root / rec["name"]
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"{str(path)!r} cannot be read: {e.strerror or e}"
    if len(data) != rec["bytes"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
        return None, (f"{str(path)!r} is not the file the manifest recorded ({len(data)} bytes, manifest says "
                      f"{rec['bytes']}{', another sha256' if len(data) == rec['bytes'] else ''})")
    try:  # the array is a view of the bytes read (read-only): no second copy of 31 MB at start
        head = io.BytesIO(data)
        version = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(head)
        want = (len(ROWS), int(entry["samples"]))
        if dtype != np.int64 or shape != want or fortran:
            return None, f"{str(path)!r} holds {dtype} {shape}, not int64 {want}"
        columns = np.frombuffer(data, dtype=dtype, count=want[0] * want[1], offset=head.tell()).reshape(want)
    except ValueError as e:
        return None, f"{str(path)!r} is not a numpy array file: {e}"
    return columns, ""


def columns_problem(root: Path, split: str, entry: dict) -> str | None:
    """What ``verify`` says of a split's columns file: not the recorded file, or not the numbers of the
    indexes (naming the first shard that differs); None when it matches or the manifest lists none."""
    if "columns" not in entry:
        return None
    fix = f"`python -m data_prep finalize {root}` writes it again from the indexes"
    columns, why = read_columns(root, entry)
    if columns is None:
        return f"{split}: columns file {why}; the loaders read the indexes instead (slower at start); {fix}"
    try:
        expected = columns_of_indexes(root, entry["shards"])
    except ManifestError:
        return None  # the shard's own lines name its index
    differs = np.flatnonzero((columns != expected).any(axis=0))
    ends = np.cumsum([int(s["samples"]) for s in entry["shards"]])
    # the file is the one the manifest recorded: where an index no longer lists its tar's members, the index is the
    # damaged side (the shard's own line says so), and finalize would copy that damage into the columns file
    at = [int(i) for i in np.unique(np.searchsorted(ends, differs, side="right"))]
    wrong = [i for i in at if _index_matches_tar(root, entry["shards"][i])]
    if not wrong:
        return None
    differs = differs[np.isin(np.searchsorted(ends, differs, side="right"), wrong)]
    shard = entry["shards"][wrong[0]]["name"]
    return (f"{split}: columns file {entry['columns']['name']!r} differs from the indexes at "
            f"{plural(len(differs), 'sample')}, first in shard {shard!r} (the loaders would read the wrong bytes); "
            f"{fix}")


def _index_matches_tar(root: Path, shard: dict) -> bool:
    """Whether the shard's index lists its tar's members as data_prep wrote it (an unlistable tar: not known
    to be wrong, so the columns file is blamed as before)."""
    from .verify import index_of_tar  # (verify imports this module)

    expected = index_of_tar(root / shard["name"])
    if expected is None:
        return True
    try:
        return (root / index_of_entry(shard)).read_text(encoding="utf-8").splitlines(keepends=True) == expected
    except (OSError, UnicodeDecodeError):
        return False

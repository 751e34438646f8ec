"""Random access to the samples of one split of a sharded dataset (manifest + tars + indexes).

Every backend reads encoded JPEG bytes and labels through this class, by global sample id (the id
space of ``pipeline.data.contract``). Reads are ``os.pread`` calls at offsets from the split's columns file
(``data_prep.columns_file``; the per-shard indexes where there is none or it does not match),
so any process can fetch any sample without scanning a tar, and file descriptors are reopened after a
fork (DataLoader workers, DALI's parallel external source). A process keeps at most ``MAX_OPEN_SHARDS``
shards open (the least recently read is closed): each persistent worker reads every shard in an epoch, and
one descriptor per shard was ImageNet in 1,000-sample shards (1,282) past the usual limit of 1,024 open files.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from data_prep.columns_file import read_columns, shard_columns
from data_prep.format import MANIFEST_NAME, WORK_DIR, ManifestError, index_of_entry, load_manifest, plan_path
from pipeline.errors import ConfigError
from pipeline.file_access import describe_owner


class CorruptSampleError(RuntimeError):
    """A sample's bytes or label cannot be used; the message names the shard, the sample's position in it
    and its tar member (``ShardSet.describe``)."""


MAX_OPEN_SHARDS = 64  # per process; the shuffle reads from data.window_shards (4) shards at a time
TAR_BLOCK = 512  # a tar header, and the unit member data is padded to


def open_shards_for_window(window_shards: int) -> int:
    """Shards a training reader keeps open: two shuffle windows (one ending, the next beginning), at least
    ``MAX_OPEN_SHARDS``; at most a quarter of the process's limit of open files (a larger window then
    reopens shards, slower but not failing)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = soft // 4 if soft != resource.RLIM_INFINITY else 1 << 20
    return max(MAX_OPEN_SHARDS, min(2 * window_shards, cap))


def shard_read_error(error: OSError, path: str, offset: int, size: int) -> OSError:
    """A read of a shard that the file system failed (an I/O error, NFS's ``ESTALE``), as an OSError of the
    same errno that names the shard: ``os.pread``'s own said ``[Errno 5] Input/output error`` alone, at the
    end of a loader worker's traceback. Still an OSError with its errno: not a corrupt sample (the shard may
    be whole), and a crash, which the Slurm job script retries (the file system may be back by then)."""
    if error.errno == errno.ESTALE:
        why = ("the file was replaced or removed after this run opened it (data_prep writing into the shard "
               "folder during training? let it finish before training on it)")
    else:
        why = ("the file system's error, not the data's; a restart resumes from the last checkpoint (launch's "
               "batch script requeues the job), and `python -m data_prep verify` checks the shard if it recurs")
    return OSError(error.errno, f"{error.strerror or error} reading shard {path!r} (bytes {offset}-{offset + size}): "
                                f"{why}")


class ShardSet:
    """The samples of ``split`` under ``root``; checks at start that every shard is present and whole."""

    max_open = MAX_OPEN_SHARDS

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"data.root: shard directory {str(self.root)!r} does not exist")
        try:
            self.manifest = load_manifest(self.root)
        except ManifestError as e:
            raise ConfigError(f"data.root: {e}") from None
        splits = self.manifest.get("splits", {})
        if split not in splits:
            pending = ""
            if plan_path(self.root, split).is_file():  # data_prep began (again) on it
                pending = (f"; data_prep has not finished it (its {WORK_DIR}/{split}/ is there): rerun the same "
                           f"data_prep command, or after Slurm array tasks `python -m data_prep finalize "
                           f"{self.root}` once they all ended")
            raise ConfigError(
                f"split {split!r} is not in {self.root / MANIFEST_NAME} (it has: {sorted(splits)}){pending}"
            )
        self.split = split
        self.classes: list[str] = list(self.manifest["classes"])
        shards = splits[split]["shards"]
        self.shard_names = [s["name"] for s in shards]
        self.shard_sizes = np.array([int(s["samples"]) for s in shards], dtype=np.int64)
        self._paths = [str(self.root / s["name"]) for s in shards]
        self._index_paths = [self.root / index_of_entry(s) for s in shards]
        # why the indexes were read instead of the split's columns file ("" when it was read)
        columns, self.columns_fallback = read_columns(self.root, splits[split])
        if columns is None:  # the indexes, one by one, filled shard by shard: no second copy at the end
            total = int(self.shard_sizes.sum())
            columns = np.zeros((3, total), dtype=np.int64)
        self.offsets, self.sizes, self.label_offsets = columns  # contiguous rows
        at = 0
        for i, s in enumerate(shards):
            path = self.root / s["name"]
            actual = self._shard_size(path)
            if actual != int(s["bytes"]):
                raise ConfigError(
                    f"shard {str(path)!r} is truncated or altered: {actual} bytes, manifest says {s['bytes']}"
                )
            if not self.columns_fallback:
                continue  # the columns file gave its samples
            idx_path = self._index_paths[i]
            if not idx_path.is_file():
                raise ConfigError(f"index {str(idx_path)!r} of shard {s['name']!r} is missing")
            n = int(s["samples"])
            try:
                columns[:, at:at + n] = shard_columns(idx_path, n)
            except ManifestError as e:
                raise ConfigError(str(e)) from None
            at += n
        self.shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), self.shard_sizes)
        self._shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor, least recently read first
        self._pid = -1
        self._lock = threading.Lock()

    def _shard_size(self, path: Path) -> int:
        """The size of the shard at ``path``, which this user can open (a ``ConfigError`` naming it: missing, not
        a file, unreadable). One open and one fstat: every rank does this for every shard at its start, a
        million metadata operations at ImageNet's 1,500 shards on 1,024 ranks (it was a stat, a second stat and
        an open per shard)."""
        try:  # a shard this user cannot read (another user's file, mode 600) stopped a loader worker later,
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # in a traceback, after the run had started (a FIFO: no wait)
        except FileNotFoundError:
            raise ConfigError(f"shard {str(path)!r} listed in the manifest is missing") from None
        except OSError as e:
            raise ConfigError(f"shard {str(path)!r} listed in the manifest cannot be read: {e.strerror}"
                              f"{describe_owner(path, writing=False)}; give this user read access to the shards "
                              f"(e.g. chmod -R a+rX {self.root}, or their group's)") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"shard {str(path)!r} listed in the manifest is missing (a "
                              f"{'folder' if stat.S_ISDIR(st.st_mode) else 'special file'} is in its place)")
        return st.st_size

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _pread(self, shard: int, size: int, offset: int) -> bytes:
        """``size`` bytes at ``offset`` of a shard, through the process's open shards. Under a lock: a
        descriptor closed by another thread's read could be reused by a new file in between (a read from
        the wrong file)."""
        if self._pid != os.getpid():  # after a fork: descriptors (and the lock's state) belong to the parent
            self._fds, self._pid, self._lock = OrderedDict(), os.getpid(), threading.Lock()
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                while len(self._fds) >= self.max_open:
                    os.close(self._fds.popitem(last=False)[1])
                fd = self._fds[shard] = os.open(self._paths[shard], os.O_RDONLY)
            else:
                self._fds.move_to_end(shard)
            try:
                return os.pread(fd, size, offset)
            except OSError as e:
                raise shard_read_error(e, self._paths[shard], offset, size) from e

    def read_jpeg(self, sample_id: int) -> bytes:
        """The encoded image of one sample."""
        shard = int(self.shard_of[sample_id])
        data = self._pread(shard, int(self.sizes[sample_id]), int(self.offsets[sample_id]))
        if len(data) != self.sizes[sample_id]:
            # (no sample number: the caller names the sample as `verify` counts, in its shard; the split-wide id
            # here made one message say "sample 1" and "sample 151" of the same one)
            raise OSError(f"short read: {len(data)} of the image's {int(self.sizes[sample_id])} bytes in "
                          f"{self._paths[shard]!r} (the shard ends before its index says)")
        return data

    def read_label(self, sample_id: int) -> int:
        """The class index of one sample (from its fixed-width ``lbl`` member). A label outside the
        manifest's classes raises ValueError here, on the host, naming it: on a GPU it would end the run
        with a device-side assert in the loss, naming nothing.

        data_prep writes each sample's members in the order jpg, cls, lbl, so the ``cls`` member's data (the
        label in ASCII digits) is the 512-byte block before the ``lbl`` member's header: one read of 1,028
        bytes takes both, and a label whose two copies disagree raises ValueError too. A sector of zeros (a
        failing disk, a storage that returns zeros) made ``lbl`` 0, in range: trained and scored as class 0
        without a word; only ``data_prep verify`` said so."""
        shard = int(self.shard_of[sample_id])
        offset = int(self.label_offsets[sample_id])
        if offset < 2 * TAR_BLOCK:  # (not data_prep's layout: no cls block to compare with)
            raw, digits = self._pread(shard, 4, offset), None
        else:
            window = self._pread(shard, 2 * TAR_BLOCK + 4, offset - 2 * TAR_BLOCK)
            raw, digits = window[2 * TAR_BLOCK:], window[:TAR_BLOCK].rstrip(b"\0")
        if len(raw) != 4:
            raise OSError(f"short read of the label in {self._paths[shard]!r} (the shard ends before its index says)")
        label = struct.unpack("<i", raw)[0]
        if not 0 <= label < len(self.classes):
            raise ValueError(f"label {label} is outside the manifest's {len(self.classes)} classes")
        if digits and digits != str(label).encode("ascii"):  # (a cls block of zeros: nothing to compare with)
            raise ValueError(f"its lbl member says label {label}, its cls member {bytes(digits[:16])!r} (the shard "
                             f"is damaged there)")
        return label

    def labels(self) -> np.ndarray:
        """All labels of the split, in id order (reads 4 bytes per sample)."""
        return np.array([self.read_label(i) for i in range(len(self))], dtype=np.int64)

    def shard_name(self, sample_id: int) -> str:
        return self.shard_names[int(self.shard_of[sample_id])]

    def describe(self, sample_id: int) -> str:
        """A sample as a user finds it: its position in its shard (as ``python -m data_prep verify``
        counts), its tar member and the shard. Reads the shard's index: for messages, not the hot path."""
        shard = int(self.shard_of[sample_id])
        pos = int(sample_id - self._shard_starts[shard])
        member = "?"
        try:
            with open(self._index_paths[shard], encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if i == pos + 1:  # after the header line
                        parts = line.split()
                        member = next((parts[k + 3] for k in range(0, len(parts) - 3, 4) if parts[k] == "jpg"), "?")
                        break
        except OSError:
            pass
        return f"sample {pos} ({member}) of shard {self.shard_names[shard]!r}"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"], state["_pid"], state["_lock"] = OrderedDict(), -1, None
        return state

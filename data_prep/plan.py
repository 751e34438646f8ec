"""Deterministic shard plan: seeded global shuffle, then cut into shards by bytes or by count.

The plan depends only on the sorted inputs, the seed and the shard size, never on workers or tasks,
so array tasks, reruns and single runs all agree on which sample lands in which shard.
"""
from __future__ import annotations

import hashlib
import json
import random
from array import array
from typing import Callable, Sequence

from .sources import Ref

TAR_OVERHEAD = 3 * 1024  # three 512-byte headers plus padding, per sample (estimate)


def sample_key(split: str, index: int) -> str:
    """``__key__`` of the input at `index` in sorted input order: unique, seed-independent, ASCII."""
    return f"{split}_{index:08d}"


class ShardJob:
    """One shard to build: its number and its (input index, display, ref, label) entries in write order.

    The parent keeps only the shard's input indices (int64 array) and a reference to the shared
    items; `entries` is built on access, and a pickled job (what a worker receives) carries just
    its own shard's entries, so only the shards in flight are ever materialised.
    """

    __slots__ = ("split", "number", "plan_hash", "hash_without_mtimes", "opt_text", "_items", "_index", "_entries")

    def __init__(self, split: str, number: int, entries: Sequence[tuple[int, str, Ref, int]] | None,
                 plan_hash: str, items: Sequence[tuple[str, Ref, int]] | None = None,
                 index: Sequence[int] | None = None, hash_without_mtimes: str | None = None, opt_text: str = ""):
        self.split, self.number, self.plan_hash = split, number, plan_hash
        # the plan hash as a data_prep of before the inputs' mtimes were hashed computed it (older_plans.py);
        # the parent's alone: a worker builds to `plan_hash`
        self.hash_without_mtimes = hash_without_mtimes
        self.opt_text = opt_text  # the options as hashed (the parent's alone, for ``hash_with_displays``)
        self._entries = list(entries) if entries is not None else None
        self._items = items
        self._index = array("q", index) if index is not None else None

    @property
    def entries(self) -> list[tuple[int, str, Ref, int]]:
        if self._entries is not None:
            return self._entries
        items = self._items
        return [(key_index(items, i), *items[i]) for i in self._index]

    def hash_with_displays(self, display: Callable[[str], str]) -> str:
        """The plan hash this shard would have had with each input named ``display(its name)`` (the parent's
        alone): a shard built when SRC was named another way (``older_plans.respell_records``)."""
        return _job_hashes(self.opt_text, self.split, self._items, self._index, display)[0]

    def __len__(self) -> int:
        """Planned inputs of this shard (without building its entries)."""
        return len(self._entries) if self._entries is not None else len(self._index)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardJob):
            return NotImplemented
        return (self.split, self.number, self.plan_hash, self.entries) == \
            (other.split, other.number, other.plan_hash, other.entries)

    def __repr__(self) -> str:
        return f"ShardJob(split={self.split!r}, number={self.number}, inputs={len(self)}, plan_hash={self.plan_hash!r})"

    def __reduce__(self):
        return (ShardJob, (self.split, self.number, self.entries, self.plan_hash))


def key_index(items: Sequence, i: int) -> int:
    """Number in the key of item `i`: its position, or, for one side of a hold-out (``holdout.Subset``),
    its position among all the images of the split it was carved from, so the two sides never share a key
    number and a file keeps its number whatever the hold-out."""
    get = getattr(items, "key_index", None)
    return get(i) if get is not None else i


def _size(items, i: int) -> int:
    get = getattr(items, "size", None)
    return get(i) if get is not None else items[i][1][2]


def _mtime(items, i: int) -> int:
    """Modification time of item `i` for the plan hash; -1 (not hashed) for plain lists of tuples."""
    get = getattr(items, "mtime", None)
    return get(i) if get is not None else -1


def plan_shards(split: str, items: Sequence[tuple[str, Ref, int]], seed: int,
                shard_bytes: int | None, samples_per_shard: int | None, options: dict) -> list[ShardJob]:
    """Shuffle `items` (sorted) with `seed` and cut them into shards.

    Keys are ``<split>_<index in sorted input order>`` (:func:`key_index`: for one side of a hold-out, the
    order of all the inputs it was carved from), so a key names the same source file whatever the seed.
    With `shard_bytes`, a shard closes once its source bytes (+ tar overhead) reach it. `items` may be a
    list or a compact sequence (``inputs.LabelledItems``, ``holdout.Subset``); jobs only hold indices.
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    order = array("q", order)  # 8 bytes per input instead of a list of int objects
    cuts = []  # end position in `order` of each shard
    n_cur = 0
    cur_bytes = 0
    for pos, i in enumerate(order):
        n_cur += 1
        cur_bytes += max(_size(items, i), 0) + TAR_OVERHEAD
        full = (n_cur >= samples_per_shard) if samples_per_shard else (cur_bytes >= (shard_bytes or 0))
        if full:
            cuts.append(pos + 1)
            n_cur, cur_bytes = 0, 0
    if n_cur:
        cuts.append(len(order))
    opt_text = json.dumps(options, sort_keys=True)
    jobs = []
    start = 0
    for n, end in enumerate(cuts):
        index = order[start:end]
        plan_hash, older = _job_hashes(opt_text, split, items, index)
        jobs.append(ShardJob(split, n, None, plan_hash, items=items, index=index, hash_without_mtimes=older,
                             opt_text=opt_text))
        start = end
    return jobs


def _job_hashes(opt_text: str, split: str, items: Sequence, index: Sequence[int],
                display: Callable[[str], str] | None = None) -> tuple[str, str]:
    """A shard's plan hash (options, then each input's key, name, size, label and mtime), and the same without
    the mtimes (``older_plans``); ``display``: each input's name as given by it."""
    h, older = hashlib.sha256(opt_text.encode()), hashlib.sha256(opt_text.encode())
    for i in index:
        disp, ref, label = items[i]
        line = f"\n{sample_key(split, key_index(items, i))}\t{disp if display is None else display(disp)}" \
               f"\t{ref[2]}\t{label}"
        older.update(line.encode("utf-8", "surrogateescape"))
        mtime = _mtime(items, i)  # same size, new bytes (edited in place): a new plan for its shard
        if mtime >= 0:
            line += f"\t{mtime}"
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest(), older.hexdigest()

"""Deterministic shard plan: seeded global shuffle, then cut into shards by bytes or by count.

The plan depends only on the sorted inputs, the seed and the shard size, never on workers or tasks,
so array tasks, reruns and single runs all agree on which sample lands in which shard.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from .sources import Ref

TAR_OVERHEAD = 3 * 1024  # three 512-byte headers plus padding, per sample (estimate)


@dataclass
class ShardJob:
    """One shard to build: its number and its (key, display, ref, label) entries in write order."""

    split: str
    number: int
    entries: list[tuple[str, str, Ref, int]]
    plan_hash: str


def plan_shards(split: str, items: list[tuple[str, Ref, int]], seed: int,
                shard_bytes: int | None, samples_per_shard: int | None, options: dict) -> list[ShardJob]:
    """Shuffle `items` (sorted) with `seed` and cut them into shards.

    Keys are ``<split>_<index in sorted input order>``, so a key names the same source file whatever
    the seed. With `shard_bytes`, a shard closes once its source bytes (+ tar overhead) reach it.
    """
    keyed = [(f"{split}_{i:08d}", disp, ref, label) for i, (disp, ref, label) in enumerate(items)]
    order = list(range(len(keyed)))
    random.Random(seed).shuffle(order)
    shards: list[list] = []
    cur: list = []
    cur_bytes = 0
    for i in order:
        entry = keyed[i]
        cur.append(entry)
        cur_bytes += max(entry[2][2], 0) + TAR_OVERHEAD
        full = (len(cur) >= samples_per_shard) if samples_per_shard else (cur_bytes >= (shard_bytes or 0))
        if full:
            shards.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        shards.append(cur)
    opt_text = json.dumps(options, sort_keys=True)
    jobs = []
    for n, entries in enumerate(shards):
        h = hashlib.sha256(opt_text.encode())
        for key, disp, ref, label in entries:
            h.update(f"\n{key}\t{disp}\t{ref[2]}\t{label}".encode("utf-8", "surrogateescape"))
        jobs.append(ShardJob(split, n, entries, h.hexdigest()))
    return jobs

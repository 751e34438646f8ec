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


def sample_key(split: str, index: int) -> str:
    """``__key__`` of the input at `index` in sorted input order: unique, seed-independent, ASCII."""
    return f"{split}_{index:08d}"


@dataclass
class ShardJob:
    """One shard to build: its number and its (input index, display, ref, label) entries in write order."""

    split: str
    number: int
    entries: list[tuple[int, str, Ref, int]]
    plan_hash: str


def plan_shards(split: str, items: list[tuple[str, Ref, int]], seed: int,
                shard_bytes: int | None, samples_per_shard: int | None, options: dict) -> list[ShardJob]:
    """Shuffle `items` (sorted) with `seed` and cut them into shards.

    Keys are ``<split>_<index in sorted input order>``, so a key names the same source file whatever
    the seed. With `shard_bytes`, a shard closes once its source bytes (+ tar overhead) reach it.
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    shards: list[list] = []
    cur: list = []
    cur_bytes = 0
    for i in order:
        disp, ref, label = items[i]
        cur.append((i, disp, ref, label))
        cur_bytes += max(ref[2], 0) + TAR_OVERHEAD
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
        for i, disp, ref, label in entries:
            h.update(f"\n{sample_key(split, i)}\t{disp}\t{ref[2]}\t{label}".encode("utf-8", "surrogateescape"))
        jobs.append(ShardJob(split, n, entries, h.hexdigest()))
    return jobs

"""When a shard counts as done: its done-record (``OUT/.work/<split>/<shard>.json``, written last, after the
shard and its index) holds the hash of the shard's current plan. A record of an earlier plan means the
shard is rebuilt: not done, whatever else holds.

Three readers ask, at three costs, so by three rules (each stricter one implies the lighter ones):

- ``record_of_plan`` (``launch status``): the record alone; no shard file is looked at, nothing is
  hashed, so a status of a large OUT stays cheap while array tasks write it.
- ``record_with_shard`` (``finalize``, and a rerun's check that the manifest still lists the plan's
  shards): also the tar is there with the recorded size. Nothing is hashed (every shard's bytes would be
  read again; ``data_prep verify`` re-hashes on request) and the index file is not looked at.
- ``reusable_record`` (a rerun that would skip the shard): also the index is there and the tar's and
  index's sha256 match the record: a shard kept without being rebuilt must be the recorded bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

from .format import done_record_path
from .shardwriter import file_sha256


def record_of_plan(out: str | Path, split: str, shard: str, plan_hash: str) -> bool:
    """Whether shard `shard` of `split` has a readable done-record of this plan. Lightest rule: no shard
    file looked at (for ``launch status``); an unreadable record, or one that is not a JSON object, is
    not done."""
    try:
        rec = json.loads(done_record_path(out, split, shard).read_text(encoding="utf-8"))
        return rec.get("plan_hash") == plan_hash
    except (OSError, ValueError, AttributeError):
        return False


def record_with_shard(out: Path, split: str, shard: str, plan_hash: str) -> dict | None:
    """The done-record of shard `shard` when it is of this plan and the tar is there with the recorded size
    (for ``finalize``), else None. No hashing and no look at the index, unlike ``reusable_record``."""
    try:
        rec = json.loads(done_record_path(out, split, shard).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tar = out / rec["name"]
    if rec.get("plan_hash") != plan_hash or not tar.is_file() or tar.stat().st_size != rec["bytes"]:
        return None
    return rec


def reusable_record(out: str | Path, split: str, shard: str, plan_hash: str) -> dict | None:
    """The done-record of shard `shard` when it is of this plan and the tar and index on disk are the
    recorded bytes (size, sha256 of both), else None: a rerun then keeps the shard instead of building it.
    Strictest rule, and the costly one (it reads the tar and index in full)."""
    try:
        rec = json.loads(done_record_path(out, split, shard).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tar = Path(out) / rec.get("name", "")
    idx = Path(out) / rec.get("index", "")
    if rec.get("plan_hash") != plan_hash or not tar.is_file() or not idx.is_file():
        return None
    if tar.stat().st_size != rec.get("bytes") or file_sha256(tar) != rec.get("sha256"):
        return None
    if rec.get("index_sha256", None) not in (None, file_sha256(idx)):  # None: records before it was kept
        return None
    return rec

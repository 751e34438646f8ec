"""When a shard counts as done: its done-record (``OUT/.work/<split>/<shard>.json``, written last, after the
shard and its index) holds the hash of the shard's current plan. A record of an earlier plan means the
shard is rebuilt: not done, whatever else holds.

Three readers ask, at three costs, so by three rules (each stricter one implies the lighter ones):

- ``record_of_plan`` (``launch status``): the record alone; no shard file is looked at, nothing is
  hashed, so a status of a large OUT stays cheap while array tasks write it.
- ``record_with_shard`` (``finalize``, and a rerun's check that the manifest still lists the plan's
  shards): also the tar is there, and the record's counts agree with the shard (``count_problem``: the tar's
  size, the index header's sample count). Nothing is hashed (every shard's bytes would be read again;
  ``data_prep verify`` re-hashes on request) and of the index only the first line is read.
- ``reusable_record`` (a rerun that would skip the shard): also the index is there and the tar's and
  index's sha256 match the record: a shard kept without being rebuilt must be the recorded bytes. And no
  input of it failed to be read (``read_failures``: permission denied, an I/O error): such a reject says
  nothing about the image, so a rerun (after ``chmod``, a remount) reads it again rather than keep the shard
  without it; the shard is rebuilt, to the same bytes while the file stays unreadable.

A record that is there but broken (unreadable, not JSON, a field missing or of the wrong type, a negative
count, another shard's name: a hand edit, a damaged disk; data_prep writes each whole, via a rename) is read
alike by all three (``read_record``): ``BrokenRecord`` names the file and the field. ``launch status`` counts
the shard as not done, a rerun rebuilds it (and writes the record again), ``finalize`` stops with that one line
(the manifest would list what the record says); a missing record is a shard not done, for all three. For the
two that look at the shard, a record whose `samples` or `bytes` is a count but not the shard's is broken too
(``count_problem``; a hand edit, a record copied from another run): such a `samples` passed the rerun's
hashes, so the shard was kept and finalize's sum failed on every rerun.
"""
from __future__ import annotations

from pathlib import Path

from .errors import PrepError
from .format import done_record_path, index_count
from .json_record import read_json_record
from .record_fields import COUNT, first_problem, shown
from pipeline.wording import plural
from .shardwriter import file_sha256

# what the readers take from a record (runner.build_shard writes them), by kind (record_fields.KINDS): a negative
# `samples` passed a rerun's hash check, and finalize's count (`N written + M rejected != K inputs`) failed on every
# rerun; ``index_sha256`` may be missing (records before it was kept) or null
FIELDS = {"name": "a string", "index": "a string", "samples": COUNT, "bytes": COUNT, "sha256": "a string",
          "plan_hash": "a string", "rejects": "a list"}


# the reason runner.build_shard gives an input it could not read (an OSError: not the image's fault)
READ_FAILURE = "cannot read: "


def read_failures(rec: dict) -> list[str]:
    """The paths of the inputs of a done-record's shard that could not be read when it was built."""
    return [r["path"] for r in rec.get("rejects") or [] if isinstance(r, dict)
            and str(r.get("reason", "")).startswith(READ_FAILURE)]


class BrokenRecord(PrepError):
    """A done-record that is there but cannot be used; the message names its file and what is wrong (also
    ``path`` and ``problem``, for a rerun that says why it rebuilds the shard)."""

    def __init__(self, message: str, path: Path, problem: str) -> None:
        super().__init__(message)
        self.path, self.problem = path, problem


def _problem(rec: object, shard: str) -> str | None:
    """What makes a parsed record unusable, or None."""
    if not isinstance(rec, dict):
        return "is not a JSON object"
    problem = first_problem(rec, FIELDS)
    if problem is not None:
        return problem
    if rec["name"] != shard:
        return f"field 'name' is {shown(rec['name'])}, not this shard's {shard!r}"
    if rec.get("index_sha256") is not None and not isinstance(rec["index_sha256"], str):
        return f"field 'index_sha256' is {shown(rec['index_sha256'])}, not a string"
    for i, r in enumerate(rec["rejects"]):
        if not (isinstance(r, dict) and isinstance(r.get("path"), str) and isinstance(r.get("reason"), str)):
            return f"field 'rejects' item {i} is not an object with a string 'path' and 'reason'"
    return _labels_problem(rec)


def _labels_problem(rec: dict) -> str | None:
    """``labels`` (records since 2026-12-07; optional): [label, inputs, written] per label of the shard, the
    written ones adding up to ``samples``."""
    labels = rec.get("labels")
    if labels is None:
        return None
    if not (isinstance(labels, list) and all(isinstance(t, list) and len(t) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in t) and t[2] <= t[1] for t in labels)):
        return f"field 'labels' is {shown(labels)}, not a list of [label, inputs, written] counts"
    return None


def _broken(path: Path, shard: str, problem: str) -> BrokenRecord:
    return BrokenRecord(f"{path}: done-record {problem}; rerun the prep command: it rebuilds shard {shard} and "
                        f"writes its record again", path, problem)


def read_record(out: str | Path, split: str, shard: str) -> dict | None:
    """The done-record of shard `shard` of `split`, whatever its plan; None when there is none (the shard
    was never finished). BrokenRecord when it is there but cannot be used."""
    path = done_record_path(out, split, shard)
    return read_json_record(path, lambda rec: _problem(rec, shard), lambda problem: _broken(path, shard, problem))


def count_problem(out: str | Path, rec: dict) -> str | None:
    """How the counts of `rec` (a well-formed record) disagree with its shard on disk, or None: `bytes` with the
    tar's size, `samples` with the count the index header gives (not checked when there is no readable
    index). Neither is hashed, so a count edited by hand passed a rerun whose tar and index were unchanged."""
    tar, idx = Path(out) / rec["name"], Path(out) / rec["index"]
    size = tar.stat().st_size
    if size != rec["bytes"]:
        return (f"field 'bytes' is {rec['bytes']}, not the size of {tar} ({size}) (the shard cut short or replaced, "
                f"or the record edited by hand?)")
    count = index_count(idx)
    if count is not None and count != rec["samples"]:
        return (f"field 'samples' is {rec['samples']}, not the {plural(count, 'sample')} of {idx} (edited by hand, "
                f"or copied from another run?)")
    written = sum(t[2] for t in rec.get("labels") or [])
    if rec.get("labels") is not None and written != rec["samples"]:
        return f"field 'labels' counts {written} samples written, field 'samples' {rec['samples']} (edited by hand?)"
    return None


def record_of_plan(out: str | Path, split: str, shard: str, plan_hash: str) -> bool:
    """Whether shard `shard` of `split` has a done-record of this plan. Lightest rule: no shard file looked
    at (for ``launch status``); a broken record is not done."""
    try:
        rec = read_record(out, split, shard)
    except BrokenRecord:
        return False
    return rec is not None and rec["plan_hash"] == plan_hash


def record_with_shard(out: Path, split: str, shard: str, plan_hash: str) -> dict | None:
    """The done-record of shard `shard` when it is of this plan and the tar is there (for ``finalize``), else
    None; BrokenRecord for a broken one, or one whose counts are not the shard's (``count_problem``). No hashing,
    unlike ``reusable_record``."""
    rec = read_record(out, split, shard)
    if rec is None or rec["plan_hash"] != plan_hash:
        return None
    if rec["samples"] == 0 and not (Path(out) / rec["name"]).exists():
        return rec  # every input rejected: finalize removed its empty tar (a second finalize found it "not done")
    if not (Path(out) / rec["name"]).is_file():
        return None
    problem = count_problem(out, rec)
    if problem is not None:
        raise _broken(done_record_path(out, split, shard), shard, problem)
    return rec


def reusable_record(out: str | Path, split: str, shard: str, plan_hash: str) -> dict | None:
    """The done-record of shard `shard` when it is of this plan and the tar and index on disk are the
    recorded bytes (size, sha256 of both), else None (also for a broken record): a rerun then builds the
    shard instead of keeping it. Strictest rule, and the costly one (it reads the tar and index in full)."""
    try:
        rec = read_record(out, split, shard)
    except BrokenRecord:
        return None
    if rec is None or rec["plan_hash"] != plan_hash or read_failures(rec):
        return None
    tar, idx = Path(out) / rec["name"], Path(out) / rec["index"]
    if rec["samples"] == 0 and not tar.exists():
        return rec  # every input rejected (of the same bytes, by the plan's hash): its empty tar was removed
    if not tar.is_file() or not idx.is_file():
        return None
    if count_problem(out, rec) is not None or file_sha256(tar) != rec["sha256"]:
        return None
    if rec.get("index_sha256", None) not in (None, file_sha256(idx)):  # None: records before it was kept
        return None
    return rec

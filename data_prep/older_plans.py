"""Done-records of a data_prep of before 2026-12-03, whose plan hashes did not include the inputs' mtimes.

Since then each input's modification time is in its shard's plan hash (a file edited in place with the same
size is rebuilt). A rerun of the same command after upgrading finds every shard such an older version built
recorded under another plan, and rebuilds it: once, to the same bytes where no input was edited in place.
That is right (nothing recorded says an input is unchanged since), but it was said as "other settings or
inputs", or not at all for an unfinished split: a user who changed nothing saw a finished ImageNet split
leave the manifest, or an interrupted one start over, with no reason given. These shards are told apart by
the hash such an older version computed for the same settings and inputs (``ShardJob.hash_without_mtimes``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from pipeline.wording import plural

from .done_records import BrokenRecord, read_record
from .format import done_record_path, shard_name
from .plan import ShardJob, sample_key

MTIMES_HASHED_SINCE = "2026-12-03"
SRC_ABSOLUTE_SINCE = "2026-12-07"


def _records_of_other_plans(out: Path, jobs: Sequence[ShardJob]) -> Iterator[tuple[ShardJob, str, dict]]:
    """(job, shard name, done-record) of each shard of `jobs` whose (well-formed) record is of another plan."""
    for job in jobs:
        name = shard_name(job.split, job.number)
        try:
            rec = read_record(out, job.split, name)
        except BrokenRecord:
            continue
        if rec is not None and rec["plan_hash"] != job.plan_hash:
            yield job, name, rec


def built_before_mtimes(out: Path, jobs: Sequence[ShardJob]) -> list[str]:
    """The shard names of `jobs` whose done-record is of the same settings and inputs as planned now, hashed
    the way a data_prep of before MTIMES_HASHED_SINCE did (no mtimes): rebuilt by this run for that alone."""
    return [name for job, name, rec in _records_of_other_plans(out, jobs) if rec["plan_hash"] == job.hash_without_mtimes]


def why_rebuilt(older: int, total: int) -> str:
    """Why `older` of a split's `total` shards are rebuilt, and that a finalized split need not be."""
    were = "was" if older == 1 else "were"
    return (f"{older} of its {plural(total, 'shard')} {were} built by a data_prep of before {MTIMES_HASHED_SINCE}, "
            f"which did not record the inputs' modification times, and {'is' if older == 1 else 'are'} rebuilt "
            f"once (to the same bytes where no input was edited in place; a split such a version finalized is "
            f"read as it is by the loaders and verify, without preparing it again)")


def _common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def respell_records(out: Path, jobs: Sequence[ShardJob]) -> tuple[int, str, str] | None:
    """Keep the shards built when SRC was named another way: a data_prep of before 2026-12-07
    (``SRC_ABSOLUTE_SINCE``) named each input by SRC as typed (``data/train/...``), one since by SRC made
    absolute (``/home/me/data/train/...``), and the name is in the plan hash, so after the upgrade a relative
    SRC planned every shard anew and rebuilt it (hours for ImageNet), its split taken out of the manifest. A
    done-record of another plan whose inputs, renamed by the one prefix that turns its first sample's name
    into this plan's, give its own plan hash is of the same inputs and settings: its names (and plan hash) are
    rewritten to this plan's, so the shard counts as done (the rerun still checks its bytes). Returns (shards
    kept, the old prefix, the new one), or None."""
    from .runner import write_json_atomic

    kept, spelled = 0, None
    for job, name, rec in _records_of_other_plans(out, jobs):
        if not rec["sources"]:  # (every input rejected: rebuilt, in no time)
            continue
        new_names = {sample_key(job.split, index): display for index, display, _ref, _label in job.entries}
        key, old = rec["sources"][0]
        new = new_names.get(key)
        if new is None or new == old:
            continue
        n = _common_suffix(old, new)
        old_prefix, new_prefix = old[:len(old) - n], new[:len(new) - n]

        def as_before(display: str) -> str:
            return old_prefix + display[len(new_prefix):] if display.startswith(new_prefix) else display

        if job.hash_with_displays(as_before) != rec["plan_hash"]:
            continue

        def as_now(display: str) -> str:
            return new_prefix + display[len(old_prefix):] if display.startswith(old_prefix) else display

        rec = {**rec, "plan_hash": job.plan_hash, "sources": [[k, as_now(d)] for k, d in rec["sources"]],
               "rejects": [{**r, "path": as_now(r["path"])} for r in rec["rejects"]]}
        write_json_atomic(done_record_path(out, job.split, name), rec)
        kept, spelled = kept + 1, (old_prefix, new_prefix)
    return (kept, *spelled) if kept else None

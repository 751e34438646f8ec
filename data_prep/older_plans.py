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
from typing import Sequence

from pipeline.wording import plural

from .done_records import BrokenRecord, read_record
from .format import shard_name
from .plan import ShardJob

MTIMES_HASHED_SINCE = "2026-12-03"


def built_before_mtimes(out: Path, jobs: Sequence[ShardJob]) -> list[str]:
    """The shard names of `jobs` whose done-record is of the same settings and inputs as planned now, hashed
    the way a data_prep of before MTIMES_HASHED_SINCE did (no mtimes): rebuilt by this run for that alone."""
    names = []
    for job in jobs:
        name = shard_name(job.split, job.number)
        try:
            rec = read_record(out, job.split, name)
        except BrokenRecord:
            continue
        if rec is not None and rec["plan_hash"] != job.plan_hash and rec["plan_hash"] == job.hash_without_mtimes:
            names.append(name)
    return names


def why_rebuilt(older: int, total: int) -> str:
    """Why `older` of a split's `total` shards are rebuilt, and that a finalized split need not be."""
    were = "was" if older == 1 else "were"
    return (f"{older} of its {plural(total, 'shard')} {were} built by a data_prep of before {MTIMES_HASHED_SINCE}, "
            f"which did not record the inputs' modification times, and {'is' if older == 1 else 'are'} rebuilt "
            f"once (to the same bytes where no input was edited in place; a split such a version finalized is "
            f"read as it is by the loaders and verify, without preparing it again)")

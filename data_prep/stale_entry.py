"""Why the manifest's entry of a split no longer lists what the split's plan builds, said as it is.

A rerun into an OUT with a manifest takes such a split out of it until it is finalized again (shards are
rebuilt in place: ``prepare._unlist_changing_splits``) and says why. That was always "other settings or
inputs", also when the plan was the same and the shards were rebuilt to the same bytes for another reason: a
done-record broken by hand, done-records missing (OUT copied without its ``.work``), a shard file missing or
cut short, or the entry itself broken.
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection

from pipeline.wording import plural

from .done_records import BrokenRecord, read_failures, read_record, record_with_shard
from .errors import PrepError
from .format import work_dir
from .manifest import split_entry
from .manifest_shape import entry_problem
from .older_plans import why_rebuilt
from .plan_record import read_plan


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def why_stale(out: Path, split: str, entry: object, older: Collection[str] = ()) -> str | None:
    """Why the manifest's `entry` of `split` is not what finalize would write from the split's plan (just
    recorded by this run) and done-records now; None when it is. `older`: the shards whose done-records a
    data_prep of before the inputs' mtimes were hashed wrote for this same plan (``older_plans``)."""
    problem = entry_problem(split, entry)
    if problem is not None:
        return f"its entry there is broken ({problem}; edited by hand?) and is written again"
    plan = read_plan(out, split)  # written by this run
    shards = plan["shards"] if plan is not None else []
    broken: list[BrokenRecord] = []
    other_plan, older_plan, unrecorded, changed, unread = [], [], [], [], []
    for s in shards:
        try:
            rec = read_record(out, split, s["name"])
        except BrokenRecord as exc:
            broken.append(exc)
            continue
        if rec is None:
            unrecorded.append(s["name"])
        elif rec["plan_hash"] != s["plan_hash"]:
            (older_plan if s["name"] in older else other_plan).append(s["name"])
        else:
            unread += read_failures(rec)
            try:
                if record_with_shard(out, split, s["name"], s["plan_hash"]) is None:
                    changed.append(s["name"])
            except BrokenRecord as exc:  # its counts are not the shard's
                broken.append(exc)
    why = []
    if other_plan:
        why.append("its shards are being rebuilt with other settings or inputs")
    elif older_plan:
        why.append(why_rebuilt(len(older_plan), len(shards)))
    elif unrecorded:
        have = "has" if len(unrecorded) == 1 else "have"
        why.append(f"{len(unrecorded)} of its {plural(len(shards), 'shard')} {have} no done-record in "
                   f"{work_dir(out, split)} (removed, or OUT copied without them?) and are being rebuilt")
    if broken:
        more = f" (+{len(broken) - 1} more)" if len(broken) > 1 else ""
        why.append(f"the done-record {broken[0].path} {broken[0].problem}{more}, so its shard is being rebuilt")
    if changed:
        one = len(changed) == 1
        why.append(f"{'shard' if one else 'shards'} {_some(changed)} {'is' if one else 'are'} missing or not of the "
                   f"size {'its done-record gives' if one else 'their done-records give'}, and "
                   f"{'is' if one else 'are'} being rebuilt")
    if unread:
        one = len(unread) == 1
        why.append(f"{len(unread)} of its inputs could not be read when it was built "
                   f"({_some(unread)}: rejects.jsonl says why) and {'is' if one else 'are'} read again")
    if why:
        return "; ".join(why)
    try:
        _plan, now, _rejects, _emptied = split_entry(out, split)
    except PrepError as exc:  # done-records that do not add up to the plan's inputs
        return str(exc)
    if now["shards"] != entry["shards"]:
        return "its entry there lists other shards than their done-records (edited by hand?) and is written again"
    return None

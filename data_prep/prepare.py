"""Glue for the splits of one run: plan them, build this task's slice of shards, finalize when running alone."""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.wording import plural

from .class_list import claim_classes, claimed_classes, follow_classes
from .errors import PrepError
from .format import MANIFEST_NAME, ManifestError, index_name, load_manifest, plan_path, shard_name
from .holdout import SETTINGS, check_rerun, with_partners
from .imagefolder import Scan
from .manifest import finalize, write_plan_record
from .manifest_lock import manifest_lock
from .older_plans import SRC_ABSOLUTE_SINCE, built_before_mtimes, respell_records, why_rebuilt
from .plan import ShardJob, plan_shards
from .plan_record import BrokenPlan, read_plan
from .runner import run_jobs, write_json_atomic
from .stale_entry import why_stale
from .validate import EncodeOptions


@dataclass
class SplitPart:
    """One split a run writes: its scanned inputs, its hold-out record (None: no hold-out) and where its
    inputs came from (default: the run's source)."""

    split: str
    scan: Scan
    holdout: dict | None = None
    split_source: str | None = None


def prepare_splits(out: Path, parts: list[SplitPart], source: str, opts: EncodeOptions, seed: int,
                   shard_bytes: int | None, samples_per_shard: int | None, workers: int,
                   task_index: int = 0, num_tasks: int = 1, show_progress: bool = True) -> dict | None:
    """Write this task's shards of every split in `parts`; returns the manifest when num_tasks == 1.

    All splits are planned (plan records written) before any shard is built, and merged into the
    manifest together: the two sides of a hold-out never appear there one without the other.
    """
    if not 0 <= task_index < num_tasks:
        raise PrepError(f"--task-index {task_index} is outside 0..{num_tasks - 1} (--num-tasks {num_tasks})")
    check_rerun(out, {p.split: _settings(p.holdout) for p in parts})
    names = [p.split for p in parts]
    # the look at the manifest and the claim of each split's class list under the manifest lock: no finalize
    # of another split lists it in between, so a later task of this split's array finds the claim of an
    # earlier one (class_list.follow_classes)
    with manifest_lock(out):
        if (out / MANIFEST_NAME).exists():
            try:
                existing = load_manifest(out, rewriting=names)  # a broken entry of theirs is written again
            except ManifestError as exc:
                raise PrepError(str(exc)) from None
            others = sorted(set(existing["splits"]) - set(names))
            if others:  # a split with some of their classes takes their list; any other difference is refused
                parts = [replace(p, scan=follow_classes(out, p.split, p.scan, existing["classes"],
                                                        existing["class_names"], others, claimed_classes(out, p.split)))
                         for p in parts]
        for p in parts:
            claim_classes(out, p.split, p.scan.classes)
    out.mkdir(parents=True, exist_ok=True)
    planned = [(p.split, plan_split(out, p.split, source, p.scan, opts, seed, shard_bytes, samples_per_shard,
                                    p.split_source, holdout=p.holdout)) for p in parts]
    for split, jobs in planned:  # (before the look at stale shards: these are not)
        if respelled := respell_records(out, jobs):
            kept, before, now = respelled
            print(f"data_prep: split {split!r}: {kept} of its {plural(len(jobs), 'shard')} were built from SRC "
                  f"named another way (prefix {before!r} where this run's is {now!r}: a data_prep of before "
                  f"{SRC_ABSOLUTE_SINCE} named the inputs by SRC as typed, or a task read a copy at another path); "
                  f"the same inputs (names, sizes, times), kept", file=sys.stderr)
    older = {split: built_before_mtimes(out, jobs) for split, jobs in planned}
    unlisted = _unlist_changing_splits(out, planned, older)
    for split, jobs in planned:  # a split the manifest did not list (unfinished): said here
        if older[split] and split not in unlisted:
            print(f"data_prep: split {split!r}: {why_rebuilt(len(older[split]), len(jobs))}", file=sys.stderr)
    done = []
    for split, jobs in planned:
        mine = [j for j in jobs if j.number % num_tasks == task_index]
        label = f"{split}" + (f" task {task_index}/{num_tasks}" if num_tasks > 1 else "")
        run_jobs(out, mine, opts, workers, show_progress=show_progress, label=label)
        done.append((label, len(mine), len(jobs)))
    if num_tasks == 1:
        for split, jobs in planned:
            _check_plan_is_ours(out, split, jobs)
        return finalize(out, names)
    for label, mine_n, jobs_n in done:
        are = "is" if mine_n == 1 else "are"
        print(f"{label}: this task's {mine_n} of the split's {plural(jobs_n, 'shard')} {are} done", file=sys.stderr)
    return None


def _check_plan_is_ours(out: Path, split: str, jobs: list[ShardJob]) -> None:
    """Refuse to finalize `split` when its plan on disk is no longer the one this run wrote: another prep
    command of the split, run at the same time with other inputs or settings, planned after it. Finalizing
    then merged the other command's shards, deleted this one's as stale, and said the other's count, exit 0.
    (The shards named alike were overwritten by both: only a rerun of one command mends the split.)"""
    try:
        plan = read_plan(out, split)
    except BrokenPlan:
        return  # finalize says what is wrong with it
    if plan is None or [s["plan_hash"] for s in plan["shards"]] == [j.plan_hash for j in jobs]:
        return
    raise PrepError(f"split {split!r}: another prep command of this split replaced its plan while this one ran "
                    f"({plan_path(out, split)} now plans {plural(len(plan['shards']), 'shard')} from "
                    f"{plan.get('split_source', plan.get('source'))}, this run planned {plural(len(jobs), 'shard')}): "
                    "two prep commands of one split at once, with other inputs or settings, overwrite each other's "
                    "shards, so the split now mixes both; once the other has ended, rerun the prep command of the one "
                    "you want (it keeps the shards built to its plan)")


def _unlist_changing_splits(out: Path, planned: list[tuple[str, list[ShardJob]]],
                            older: dict[str, list[str]]) -> set[str]:
    """Take a split out of manifest.json before its shards are rebuilt to another plan (other settings or
    inputs): shards are replaced in place, so until the split is finalized again the old entry would list
    a mix of old and new shards, which the loaders' size checks do not see (shards are padded to 10 KiB
    records) and would read as duplicated and missing images. A split whose plan is unchanged (a rerun, a
    damaged shard rebuilt to its recorded bytes) keeps its entry. Said per split, with why
    (``stale_entry.why_stale``; `older`: shards of this plan built by a data_prep that did not hash the
    inputs' mtimes, ``older_plans``). Returns the splits taken out."""
    with manifest_lock(out):
        return _unlist_stale(out, planned, older)


def _unlist_stale(out: Path, planned: list[tuple[str, list[ShardJob]]], older: dict[str, list[str]]) -> set[str]:
    if not (out / MANIFEST_NAME).exists():
        return set()
    manifest = load_manifest(out, rewriting=[split for split, _ in planned])  # checked by prepare_splits before
    why = {}
    for split, _jobs in planned:
        if split in manifest["splits"]:
            reason = why_stale(out, split, manifest["splits"][split], older[split])
            if reason is not None:
                why[split] = reason
    for split in list(why):  # a hold-out's two sides together
        for other in with_partners(out, [split]):
            if other in manifest["splits"] and other not in why:
                why[other] = f"it is the other side of the hold-out of split {split!r}, which leaves it"
    if not why:
        return set()
    for split in why:
        del manifest["splits"][split]
    if manifest["splits"]:
        write_json_atomic(out / MANIFEST_NAME, manifest)
    else:
        (out / MANIFEST_NAME).unlink()
    for split, reason in why.items():
        print(f"data_prep: {out / MANIFEST_NAME} no longer lists split {split!r} until it is finalized again (this "
              f"run, or `python -m data_prep finalize {out}` after array tasks): {reason}", file=sys.stderr)
    return set(why)


def _settings(record: dict | None) -> dict | None:
    """The part of a hold-out record a rerun must repeat."""
    return None if record is None else {key: record[key] for _opt, key in SETTINGS}


def plan_split(out: Path, split: str, source: str, scan: Scan, opts: EncodeOptions, seed: int,
               shard_bytes: int | None, samples_per_shard: int | None,
               split_source: str | None = None, holdout: dict | None = None) -> list[ShardJob]:
    """Plan `split`'s shards and write its plan record: all the parent does between scan and dispatch.

    A hold-out's record goes into the options (so into every shard's plan hash and the manifest); without
    one the options, and so the plan hashes of earlier runs, are unchanged.
    """
    options = {"mode": "reencode" if opts.max_side else "passthrough", "max_side": opts.max_side,
               "quality": opts.quality, "seed": seed, "shard_bytes": shard_bytes,
               "samples_per_shard": samples_per_shard}
    if holdout is not None:
        options["holdout"] = holdout
    jobs = plan_shards(split, scan.items, seed, shard_bytes, samples_per_shard, options)
    write_plan_record(out, split, {
        "split": split, "source": source, "split_source": split_source or source, "options": options, "classes": scan.classes,
        "class_names": scan.class_names, "inputs": len(scan.items) + len(scan.rejects),
        "scan_rejects": [list(r) for r in scan.rejects],
        "shards": [{"name": shard_name(split, j.number), "index": index_name(split, j.number),
                    "planned": len(j), "plan_hash": j.plan_hash} for j in jobs],
    })
    return jobs

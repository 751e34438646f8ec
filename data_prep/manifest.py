"""Assemble ``manifest.json`` and ``rejects.jsonl`` from a split's plan and its done-records.

Used at the end of a single run and by ``python -m data_prep finalize`` after array tasks. Splits
already in the manifest are kept (merged) as long as the class list agrees.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from pipeline.wording import plural

from .columns_file import columns_bytes, columns_entry, columns_name, columns_of_indexes
from .class_list import first_names, mismatch
from .done_records import BrokenRecord, read_record, record_with_shard
from .errors import PrepError
from .format import (MANIFEST_NAME, MANIFEST_VERSION, PLAN_NAME, REJECTS_NAME, WORK_DIR, ManifestError,
                     load_manifest, plan_path, shard_file_pattern, work_dir)
from .holdout import with_partners
from .manifest_lock import manifest_lock
from .plan_record import read_plan
from .rejects_file import read_rejects
from .runner import TEMP_NAME, write_bytes_atomic, write_json_atomic, write_text_atomic
from .shardwriter import PARTIAL_SUFFIX, PARTIAL_TOKEN, file_sha256, remove_abandoned
from .split_wording import rerun_of, splits_named


def write_plan_record(out: Path, split: str, record: dict) -> None:
    """Store what finalize needs about a split's plan (identical for every array task)."""
    work_dir(out, split).mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_path(out, split), record)


def split_entry(out: Path, split: str) -> tuple[dict, dict, list[dict], list[tuple[str, int]]]:
    """(plan record, manifest entry, reject lines, classes whose every input was rejected: (name, inputs)) for
    one split; PrepError if shards are missing, or the plan or a done-record is missing or broken
    (plan_record.BrokenPlan, done_records.BrokenRecord, naming it). The entry's ``class_counts`` (samples per
    class) is there when every done-record counted its labels (those of before 2026-12-07 did not)."""
    plan = read_plan(out, split)
    if plan is None:
        raise PrepError(f"{plan_path(out, split)}: no plan for split {split!r} (run its prep command first)")
    shards, rejects, missing, changed_indexes = [], [], [], []
    inputs, written = [0] * len(plan["classes"]), [0] * len(plan["classes"])
    counted = True
    for r in plan["scan_rejects"]:
        rejects.append({"split": split, "path": r[0], "reason": r[1]})
    for s in plan["shards"]:
        rec = record_with_shard(out, split, s["name"], s["plan_hash"])
        if rec is None:
            missing.append(s["name"])
            continue
        rejects.extend({"split": split, "path": r["path"], "reason": r["reason"]} for r in rec["rejects"])
        labels = rec.get("labels")  # [label, inputs, written]; none in a record of before 2026-12-07
        counted = counted and labels is not None
        for label, n_in, n_out in labels or []:
            if label < len(inputs):  # (a label outside the classes is the loaders' corrupt sample)
                inputs[label] += n_in
                written[label] += n_out
        if rec["samples"] > 0:
            shards.append({k: rec[k] for k in ("name", "index", "samples", "bytes", "sha256")})
            now = _sha256_or_none(out / rec["index"]) if rec.get("index_sha256") is not None else None
            if now is not None and now != rec["index_sha256"]:
                changed_indexes.append(rec["index"])
    if changed_indexes:  # the columns file is written from them: the damage would reach the loaders
        more = f" (+{len(changed_indexes) - 5} more)" if len(changed_indexes) > 5 else ""
        raise PrepError(f"{out}: split {split!r}: {plural(len(changed_indexes), 'index', 'indexes')} changed since "
                        f"its shard was built (another sha256 than its record under {WORK_DIR}/{split}): "
                        f"{', '.join(changed_indexes[:5])}{more}; rerun the split's prep command to rebuild "
                        f"{'it' if len(changed_indexes) == 1 else 'them'}")
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise PrepError(f"{out}: split {split!r} is incomplete, {plural(len(missing), 'shard')} not done: "
                        f"{', '.join(missing[:5])}{more}; run the remaining tasks (or rerun) first"
                        + _other_plan(out, split, plan, missing))
    samples = sum(s["samples"] for s in shards)
    if samples + len(rejects) != plan["inputs"]:
        raise PrepError(f"{out}: split {split!r}: {samples} written + {len(rejects)} rejected != "
                        f"{plural(plan['inputs'], 'input')} (stale work files? rerun the split)")
    entry = {"shards": shards, "samples": samples, "rejected": len(rejects), "source": plan.get("split_source", plan["source"]),
             "options": plan["options"]}
    emptied = []
    if counted:
        entry["class_counts"] = written
        emptied = [(plan["classes"][c], n) for c, n in enumerate(inputs) if n and not written[c]]
    return plan, entry, rejects, emptied


def _sha256_or_none(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:  # a missing or unreadable index: the columns' own error names it
        return None


def _remove_stale_shards(out: Path, split: str, keep: set[str]) -> None:
    """Drop shards outside the plan and `.tmp` leftovers of killed or failed writers (all shards are done).
    A temporary file a live writer still holds is kept (``shardwriter.remove_abandoned``): another command
    building the same shards at once (an array task run again, a requeued task whose first run lives on) is
    writing it, and its rename would fail. Each file may vanish while this looks (its writer renamed it)."""
    pat = re.compile(rf"^{shard_file_pattern(split)}(({PARTIAL_TOKEN})?{re.escape(PARTIAL_SUFFIX)})?$")
    for p in out.iterdir():
        if pat.match(p.name) and p.name not in keep:
            if p.name.endswith(PARTIAL_SUFFIX):
                remove_abandoned(p)
            else:
                p.unlink(missing_ok=True)


def _remove_abandoned_temporaries(folder: Path, names: re.Pattern) -> None:
    """Remove the temp files ``write_bytes_atomic`` left in `folder` (``.NAME.<16 hex>.tmp``, NAME matching
    `names`) when killed mid-write: done-records and plan.json (``OUT/.work/<split>/``), the columns file, the
    manifest and rejects.jsonl. They were left for good (a 31 MB columns file per kill on ImageNet): the
    cleanup of a finished split swept only its shards' temporaries. A temp file a live writer holds (its
    ``flock``, ``shardwriter.remove_abandoned``) is kept: another command writing the same done-record at once."""
    pat = re.compile(rf"^{TEMP_NAME}$")
    try:
        listed = list(folder.iterdir())
    except FileNotFoundError:
        return
    for p in listed:
        m = pat.match(p.name)
        if m and names.fullmatch(m["name"]):
            remove_abandoned(p)


def _remove_stale_work(out: Path, split: str, keep: set[str]) -> None:
    """The cleanup of a split whose every shard is done: stale shards, and the temp files killed writers left
    of its shards, done-records, plan and columns file (``_remove_stale_shards``,
    ``_remove_abandoned_temporaries``)."""
    _remove_stale_shards(out, split, keep)
    _remove_abandoned_temporaries(work_dir(out, split), re.compile(r".+\.json"))  # records, plan.json, classes.json
    _remove_abandoned_temporaries(out, re.compile(re.escape(columns_name(split))))


def _other_plan(out: Path, split: str, plan: dict, missing: list[str]) -> str:
    """What to add when shards not done were built, to another plan: tasks that read other inputs (SRC at
    another path on each node, a `cp -r` copy with new times) each make the others' shards stale, so running
    the remaining tasks again never ends it."""
    planned = {s["name"]: s["plan_hash"] for s in plan["shards"]}
    other = []
    for name in missing:
        try:
            rec = read_record(out, split, name)
        except BrokenRecord:
            continue
        if rec is not None and rec["plan_hash"] != planned[name]:
            other.append(name)
    if not other:
        return ""
    return (f"; {plural(len(other), 'of them was', 'of them were')} built to another plan than "
            f"{plan_path(out, split)} (written by the task that started last): tasks that read SRC at different "
            "paths, or copies of it with other sizes or modification times, make each other's shards stale, so "
            "every task must read the same SRC path (per-node copies at one path, made with cp -a or rsync -a)")


def _write_columns(out: Path, split: str, shards: list[dict]) -> dict:
    """Write the split's columns file (its samples' read positions, from the indexes: one file for a training
    rank to read, not one per shard); return its manifest field."""
    try:
        data = columns_bytes(columns_of_indexes(out, shards))
    except ManifestError as exc:
        raise PrepError(f"{out}: split {split!r}: {exc}; rerun its prep command to rebuild the shard") from None
    name = columns_name(split)
    write_bytes_atomic(out / name, data)
    return columns_entry(name, data)


def finalize(out: str | Path, splits: list[str] | None = None) -> dict:
    """Merge the given splits (default: all with work records) into manifest.json; return it. A split
    carved by a hold-out brings the other side along. One finalize of an OUT at a time (``manifest_lock``).
    A split whose labels count a shorter class list than a bigger split written with it is left out, with a
    warning (the returned manifest lacks it)."""
    if not (Path(out) / WORK_DIR).is_dir():  # not an OUT (a typo'd folder): nothing written there, not even a lock
        raise PrepError(f"{out}: nothing to finalize (no {WORK_DIR}/<split>/{PLAN_NAME}; run a prep command first)")
    with manifest_lock(Path(out)):
        return _finalize(Path(out), splits)


def _shared_source(manifest: dict, plan_sources: dict[str, str]) -> str:
    """The top-level ``source``: the folder every listed split came from (it was the source of the split
    written last: train/ then val/ prepared apart read as if both came from val/). A split listed now gives
    the source its command was given (an ImageNet root), one listed before its own ``source``."""
    paths = [plan_sources.get(split, entry.get("source", "")) for split, entry in manifest["splits"].items()]
    if len(set(paths)) == 1:
        return paths[0]
    try:
        return os.path.commonpath(paths)
    except ValueError:  # relative beside absolute paths (by hand): the one written last, as before
        return next(reversed(plan_sources.values()), manifest.get("source", ""))


def planned_splits(out: Path) -> list[str]:
    """The splits with a plan record under OUT/.work: those a ``finalize`` without ``--splits`` writes."""
    wroot = out / WORK_DIR
    return sorted(p.name for p in wroot.iterdir() if plan_path(out, p.name).is_file()) if wroot.is_dir() else []


def _finalize(out: Path, splits: list[str] | None) -> dict:
    if splits is None:
        splits = planned_splits(out)
    if not splits:
        raise PrepError(f"{out}: nothing to finalize (no {WORK_DIR}/<split>/{PLAN_NAME}; run a prep command first)")
    splits = with_partners(out, splits)  # a hold-out's two sides are merged together
    try:
        manifest = load_manifest(out, rewriting=splits) if (out / MANIFEST_NAME).exists() else None
    except ManifestError as exc:
        raise PrepError(str(exc)) from None
    if manifest is None or set(manifest["splits"]) <= set(splits):
        # every split it lists is written again (a plain `finalize OUT`): its class list is theirs, from their
        # plans, not the manifest's (one edited by hand, two names swapped, was refused as a class mismatch)
        manifest = {"version": MANIFEST_VERSION, "splits": {}}
    rej_path = out / REJECTS_NAME
    old_rejects = read_rejects(rej_path)
    new_rejects = []
    entries = {split: split_entry(out, split) for split in splits}
    # splits left out of the manifest, whose labels count a shorter class list than the one written: (bigger
    # split, splits, the classes their labels count, whether they were listed before)
    left_out: list[tuple[str, list[str], list[str], bool]] = []
    listed_here: list[str] = []
    plan_sources: dict[str, str] = {}  # the source each split listed now was prepared from (an ImageNet root)
    # the split with the most classes first: one with some of them, planned at the same time with its own list
    # (array tasks of both at once), is then left out, or refused when it is all this finalize would write
    for split in sorted(splits, key=lambda s: -len(entries[s][0]["classes"])):
        plan, entry, rejects, _emptied = entries[split]
        others = sorted(set(manifest["splits"]) - {split}) if "classes" in manifest else []
        if others and manifest["classes"] != plan["classes"]:
            if set(plan["classes"]) > set(manifest["classes"]):
                # planned before they were listed (``class_list.follow_classes``: array tasks of both at once, the
                # smaller finished first): this split (hours of work behind it) is listed, their reruns relabel them
                left_out.append((split, others, manifest["classes"], True))
                for other in others:
                    del manifest["splits"][other]
            elif set(plan["classes"]) < set(manifest["classes"]) and set(others) & set(listed_here):
                if not any(split in names for _, names, _, _ in left_out):  # (taken out just now: said once)
                    left_out.append((listed_here[0], [split], plan["classes"], False))
                continue
            else:
                raise mismatch(out, split, plan["classes"], manifest["classes"], others, planned_alone=True,
                               finalize_first=[o for o in others if o in splits])
        manifest["classes"] = plan["classes"]
        manifest["class_names"] = plan["class_names"]
        plan_sources[split] = plan["source"]
        manifest["options"] = plan["options"]
        entry["columns"] = _write_columns(out, split, entry["shards"])
        manifest["splits"][split] = entry
        new_rejects.extend(rejects)
        _remove_stale_work(out, split, {s["name"] for s in entry["shards"]} | {s["index"] for s in entry["shards"]})
        listed_here.append(split)
    kept = [r for r in old_rejects if r.get("split") not in listed_here]  # one left out: its rerun rewrites them
    # by split (each in its plan's order): the same bytes whichever command lists which split (a single run wrote
    # train, minival, val; its finalize, or an array's, minival first)
    rows = sorted(kept + new_rejects, key=lambda r: str(r.get("split")))
    write_text_atomic(rej_path, "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows))
    manifest["splits"] = dict(sorted(manifest["splits"].items()))
    # top level: what every split shares (it was the split written last: a passthrough test split made a
    # --max-side train split look passthrough); each split's own are under splits.NAME
    opts = [e.get("options") or {} for e in manifest["splits"].values()]
    manifest["options"] = {k: v for k, v in opts[0].items() if all(k in o and o[k] == v for o in opts[1:])}
    manifest["source"] = _shared_source(manifest, plan_sources)
    ordered = {k: manifest[k] for k in ("version", "source", "options", "classes", "class_names", "splits")}
    write_json_atomic(out / MANIFEST_NAME, ordered)
    # (under the manifest lock: what a killed finalize or rerun left of these two; a live writer's is held)
    _remove_abandoned_temporaries(out, re.compile(f"{re.escape(MANIFEST_NAME)}|{re.escape(REJECTS_NAME)}"))
    for by, names, classes, before in left_out:
        its = "its" if len(names) == 1 else "their"
        more = first_names(sorted(set(ordered["classes"]) - set(classes)))
        why = (f"no longer lists {splits_named(names)}: {its} labels count the {len(classes)} classes it listed "
               f"before split {by!r} (with {more} besides) was finalized" if before else
               f"does not list {splits_named(names)}: {its} labels count {its} own {len(classes)} classes (planned "
               f"before split {by!r}, with {more} besides, was in the manifest: array tasks of both at once?)")
        print(f"data_prep: warning: {out / MANIFEST_NAME} {why}; {rerun_of(names)}: {its} labels then follow the "
              f"manifest's classes (shards are rebuilt where a label changes)", file=sys.stderr)
    for split in listed_here:  # a class gone from a split: its images were all rejected (a folder of HEIC photos)
        for name, n in entries[split][3]:
            print(f"data_prep: warning: split {split!r}: every input of class {name!r} was rejected "
                  f"({plural(n, 'file')}; {out / REJECTS_NAME} says why), so the split has no sample of it",
                  file=sys.stderr)
    return ordered

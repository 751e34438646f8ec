"""How far a data_prep output folder is, read from its files alone (no Slurm): per split, shards done of
those planned, and what manifest.json holds. For ``launch status`` on a prep run directory, where the array
tasks' logs are many and the manifest appears only when the finalize job has run."""
from __future__ import annotations

import datetime as _dt
import shlex
from dataclasses import dataclass
from pathlib import Path

from pipeline.wording import plural

from .done_records import record_of_plan
from .format import MANIFEST_NAME, WORK_DIR, ManifestError, load_manifest
from .plan_record import BrokenPlan, read_plan
from .split_wording import rerun_of


@dataclass
class SplitProgress:
    """One split of OUT: ``done`` shards (done-records of the current plan, ``done_records.record_of_plan``:
    no shard file looked at) of ``planned``; ``samples`` once in the manifest."""

    split: str
    planned: int | None  # None: no readable plan (the split was never planned here)
    done: int
    samples: int | None = None
    rejected: int | None = None
    broken: str | None = None  # the plan is there but broken (plan_record.BrokenPlan): what its message says
    classes: list[str] | None = None  # the plan's: those its labels count


def split_progress(out: Path) -> list[SplitProgress]:
    """Every split with a plan under OUT/.work or an entry in OUT/manifest.json, in name order."""
    found: dict[str, SplitProgress] = {}
    work = Path(out) / WORK_DIR
    for d in sorted(work.iterdir()) if work.is_dir() else []:
        if not d.is_dir():
            continue
        try:
            plan = read_plan(out, d.name)
        except BrokenPlan as exc:
            found[d.name] = SplitProgress(d.name, None, 0, broken=str(exc))
            continue
        if plan is None:
            continue
        shards = [(s["name"], s["plan_hash"]) for s in plan["shards"]]
        found[d.name] = SplitProgress(d.name, len(shards), sum(record_of_plan(out, d.name, n, h) for n, h in shards),
                                      classes=plan["classes"])
    for split, entry in (_manifest(out)[0] or {}).get("splits", {}).items():
        p = found.setdefault(split, SplitProgress(split, None, len(entry["shards"])))
        p.samples, p.rejected = entry["samples"], entry.get("rejected")
    return [found[s] for s in sorted(found)]


def _manifest(out: Path) -> tuple[dict | None, str | None]:
    """(OUT's manifest, None); (None, why it cannot be used: format.load_manifest's line); (None, None)
    when there is none yet."""
    if not (Path(out) / MANIFEST_NAME).exists():
        return None, None
    try:
        return load_manifest(out), None
    except ManifestError as exc:
        return None, str(exc)


def describe(out: Path, stopped_tasks: list[str] = ()) -> list[str]:
    """``launch status`` lines for OUT: shards built per split, then the manifest (or why there is none).
    ``stopped_tasks``: array tasks of the latest submission that ended without success ("35_1 FAILED"): their
    finalize job never runs (Slurm cancels it, its dependency never met)."""
    out = Path(out)
    splits = split_progress(out)
    # tasks that ended without success: said where nothing of them is to be seen ("no array task has started"
    # was said of tasks that had FAILED, e.g. their SRC moved away); without them (Slurm not asked, tasks not
    # ended) nothing is claimed of the tasks
    failed = (f" (array task{'s' if len(stopped_tasks) > 1 else ''} {', '.join(stopped_tasks)}: see "
              f"{'their logs' if len(stopped_tasks) > 1 else 'its log'})") if stopped_tasks else ""
    stopped = (f"not yet, and no finalize job will write it: array task{'s' if len(stopped_tasks) > 1 else ''} "
               f"{', '.join(stopped_tasks)} (the task's prep-*-JOB_TASK.out says why); fix that and submit the "
               f"same prep again (the shards built are kept): its finalize writes it")
    if not out.is_dir():
        if failed:
            return [f"shards       {out}: does not exist{failed}", f"manifest     {stopped}"]
        return [f"shards       {out}: does not exist yet (the first array task makes it)"]
    built = "; ".join(f"{p.split} {p.done:,} of {p.planned:,} done" if p.planned is not None
                      else f"{p.split}: {p.broken}" if p.broken is not None
                      else f"{p.split} {p.done:,} done" for p in splits) or f"none planned{failed or ' yet'}"
    lines = [f"shards       {out}: {built}"]
    manifest = out / MANIFEST_NAME
    doc, broken = _manifest(out)
    if doc is None:
        why = broken or "not yet: the finalize job writes it once every array task succeeded"
        if not broken and splits and all(p.planned is not None and p.done == p.planned for p in splits):
            why = (f"not yet, though every shard is built: the finalize job writes it (where it failed or was "
                   f"cancelled, `python -m data_prep finalize {shlex.quote(str(out))}` writes it or says why)")
        elif not broken and stopped_tasks:
            why = stopped
        return lines + [f"manifest     {why}"]
    when = _dt.datetime.fromtimestamp(manifest.stat().st_mtime, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    held = ", ".join(f"{p.split} {plural(p.samples, 'sample', grouped=True)} ({p.rejected or 0} rejected)"
                     for p in splits if p.samples is not None)
    # every shard built, yet not listed: its finalize failed or has not run (finalize lists it or says why), or
    # its labels count another class list than the manifest's (a bigger split's finalize took it out: only its
    # command run again relabels it)
    built = [p for p in splits if p.samples is None and p.planned is not None and p.done == p.planned]
    relabel = [p.split for p in built if p.classes != doc["classes"]]
    unlisted = [p.split for p in built if p.classes == doc["classes"]]
    if unlisted:
        held += (f"; not listed: {', '.join(unlisted)}, whose shards are all built (`python -m data_prep finalize "
                 f"{shlex.quote(str(out))} --splits {','.join(unlisted)}` lists "
                 f"{'it' if len(unlisted) == 1 else 'them'} or says why)")
    if relabel:
        held += (f"; not listed: {', '.join(relabel)}, whose labels count another class list than the manifest's "
                 f"({rerun_of(relabel)} to relabel {'it' if len(relabel) == 1 else 'them'})")
    return lines + [f"manifest     {manifest} ({when}): {held}"]

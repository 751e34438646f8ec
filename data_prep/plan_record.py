"""Reading a split's plan record (``OUT/.work/<split>/plan.json``, written by ``prepare.plan_split`` before any
shard): ``finalize`` assembles the manifest from it, ``launch status`` counts the shards it plans, the
hold-out checks read its options.

A plan that is there but broken (unreadable, not JSON, a field missing or of the wrong type: a hand edit, a
half-copied OUT; data_prep writes it whole, via a rename) is read alike by all of them (``read_plan``):
``BrokenPlan`` names the file and the field. Every run of the prep command writes the plan again before it
builds anything, from its inputs and options alone, so a rerun repairs it and keeps the shards already built
to it; ``finalize`` stops with that one line (it was a KeyError traceback, or a manifest holding the plan's
wrong values).
"""
from __future__ import annotations

from pathlib import Path

from .errors import PrepError
from .format import plan_path, shard_name
from .json_record import read_json_record
from .record_fields import COUNT, first_problem, shown

# what the readers take from a plan, by kind (record_fields.KINDS); ``split_source`` may be missing (plans
# written before it was kept)
FIELDS = {"source": "a string", "split_source": "a string", "options": "an object", "classes": "a list of strings",
          "class_names": "a list of strings", "inputs": COUNT, "scan_rejects": "a list", "shards": "a list"}


class BrokenPlan(PrepError):
    """A plan record that is there but cannot be used; the message names its file and what is wrong."""


def _problem(plan: object, split: str) -> str | None:
    """What makes a parsed plan unusable, or None."""
    if not isinstance(plan, dict):
        return "is not a JSON object"
    problem = first_problem(plan, FIELDS, optional=("split_source",))
    if problem is not None:
        return problem
    for i, r in enumerate(plan["scan_rejects"]):
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r)):
            return f"field 'scan_rejects' item {i} is {shown(r)}, not a [path, reason] pair of strings"
    for i, s in enumerate(plan["shards"]):
        if not isinstance(s, dict):
            return f"field 'shards' item {i} is {shown(s)}, not an object"
        problem = first_problem(s, {"name": "a string", "plan_hash": "a string"}, f"shards[{i}].")
        if problem is not None:
            return problem
        if s["name"] != shard_name(split, i):
            return f"field 'shards[{i}].name' is {shown(s['name'])}, not {shard_name(split, i)!r}"
    holdout = plan["options"].get("holdout")
    if holdout is not None:  # its two splits are merged together (holdout.with_partners)
        if not isinstance(holdout, dict):
            return f"field 'options.holdout' is {shown(holdout)}, not an object"
        return first_problem(holdout, {"split": "a string", "holdout_split": "a string"}, "options.holdout.")
    return None


def read_plan(out: str | Path, split: str) -> dict | None:
    """The plan record of `split`; None when there is none (the split was never planned in OUT). BrokenPlan
    when it is there but cannot be used."""
    path = plan_path(out, split)
    return read_json_record(path, lambda plan: _problem(plan, split), lambda problem: BrokenPlan(
        f"{path}: plan {problem}; rerun the prep command of split {split!r}: it writes the plan again (the shards "
        f"already built to it are kept)"), not_json_cause="edited by hand, or cut short?")

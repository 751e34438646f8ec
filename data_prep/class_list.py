"""One class list per OUT: a label means the same class in every split of it.

A split whose class folders are some of the classes of the splits already in OUT (a validation folder
without a rare class) is labelled by their list, in their order, and a ``note:`` line names the missing
classes; alone its own sorted names would have moved the labels of every class after the missing one. Any
other difference is an error naming the classes that differ and the order that works: the split with every
class first, then the others. Except where array tasks of that split began before the others were listed
(array tasks of both at once, the smaller finished first): it keeps its own list, with a warning, and once it
is finalized the manifest no longer lists theirs (``manifest.finalize``); their commands run again relabel them.
"""
from __future__ import annotations

import json
import shlex
import sys
import unicodedata
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from .errors import PrepError
from .format import MANIFEST_NAME, WORK_DIR, work_dir
from .holdout import Subset
from .imagefolder import Scan
from .inputs import LabelledItems
from .plan_record import BrokenPlan, read_plan
from .runner import write_json_atomic
from .split_wording import rerun_of, splits_named


CLAIM_NAME = "classes.json"


def follow_classes(out: Path, split: str, scan: Scan, classes: list[str], class_names: list[str],
                   others: list[str], planned: list[str] | None = None) -> Scan:
    """`scan` labelled by `classes` (those of the splits `others` already in OUT) when its classes are some
    of them; a PrepError naming the difference otherwise. `planned`: the classes an earlier run of this split
    labelled it by (``claimed_classes``): where they are the scan's, more than the others', the split's array
    tasks began before the others were listed (array tasks of both at once, the smaller finished first), and
    the split keeps them: finalize lists it and unlists the others, whose reruns relabel them."""
    if scan.classes == classes:
        return scan
    if set(scan.classes) > set(classes) and planned == scan.classes:
        it, its = ("it", "its") if len(others) == 1 else ("them", "their")
        print(f"data_prep: warning: split {split!r} has {len(scan.classes)} classes, {splits_named(others)} "
              f"{len(classes)} ({class_diff(scan.classes, classes)}), labelled by {its} shorter list: once this "
              f"split is finalized, {out / MANIFEST_NAME} no longer lists {it}; then {rerun_of(others)}: {its} "
              f"labels then follow this split's classes (shards are rebuilt where a label changes)", file=sys.stderr)
        return scan
    if not set(scan.classes) < set(classes):
        raise mismatch(out, split, scan.classes, classes, others)
    index = {c: i for i, c in enumerate(classes)}
    missing = [c for c in classes if c not in set(scan.classes)]
    print(f"data_prep: note: split {split!r} has {len(scan.classes)} of the {len(classes)} classes of "
          f"{splits_named(others)} (none of {first_names(missing)}); its labels follow their list", file=sys.stderr)
    return replace(scan, classes=list(classes), class_names=list(class_names),
                   items=_relabelled(scan.items, [index[c] for c in scan.classes]))


def claim_classes(out: Path, split: str, classes: list[str]) -> None:
    """Record the class list `split`'s labels count (``OUT/.work/<split>/classes.json``), written under the
    manifest lock with the look at the manifest that chose it (``prepare.prepare_splits``)."""
    path = work_dir(out, split) / CLAIM_NAME
    if claimed_classes(out, split, plan_too=False) != classes:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"classes": classes})


def claimed_classes(out: Path, split: str, plan_too: bool = True) -> list[str] | None:
    """The class list an earlier run of `split` labelled it by: its claim, or (an OUT prepared before claims
    were written) its plan record's; None when there is neither, or it cannot be read."""
    try:
        claim = json.loads((work_dir(out, split) / CLAIM_NAME).read_text())
        if isinstance(claim, dict) and isinstance(claim.get("classes"), list):
            return claim["classes"]
    except (OSError, ValueError):
        pass
    if not plan_too:
        return None
    try:
        plan = read_plan(out, split)
    except BrokenPlan:
        return None
    return None if plan is None else plan["classes"]


def mismatch(out: Path, split: str, new: list[str], old: list[str], others: list[str],
             planned_alone: bool = False, finalize_first: Sequence[str] = ()) -> PrepError:
    """Why split `split` (classes `new`) cannot join `others` (classes `old`) in OUT, and what to do.
    `planned_alone`: at finalize, `split` was planned before `others` were in the manifest (array tasks of
    several splits at once), so its labels count its own list even where it is a subset of theirs;
    `finalize_first`: those of `others` that this finalize was writing too."""
    where = f"{out / MANIFEST_NAME}: split {split!r} has {len(new)} classes, {splits_named(others)} {len(old)}"
    if set(new) < set(old) and planned_alone:
        first = (f"finalize {'it' if len(finalize_first) == 1 else 'them'} alone (`python -m data_prep finalize "
                 f"{shlex.quote(str(out))} --splits {','.join(finalize_first)}`), then " if finalize_first else "")
        return PrepError(
            f"{where} ({class_diff(new, old)}): it was planned before "
            f"{'that split was' if len(others) == 1 else 'they were'} "
            f"in the manifest (array tasks of several splits at once?), so its labels count its own "
            f"{len(new)} classes and would not match; {first}run the data_prep command of split {split!r} again: "
            f"its labels then follow their classes (its shards are rebuilt)")
    if set(new) > set(old):
        return PrepError(
            f"{where} ({class_diff(new, old)}), labelled by their own shorter list, so their labels would not match "
            f"this split's; the split with every class goes first, then the others, whose labels then follow its "
            f"classes: remove {out / MANIFEST_NAME} (data_prep writes it again from what {out / WORK_DIR} "
            f"records), run this command again, then run the data_prep command of {splits_named(others)} again "
            f"(their shards are rebuilt)")
    return PrepError(
        f"{where} ({class_diff(new, old)}), so its labels would not match theirs; give every split the same "
        f"class folders (an empty folder does not count; a split with some of the classes of those already in OUT "
        f"takes their list), or use another OUT for a separate dataset")


def _relabelled(items: Sequence, label_of: list[int]) -> Sequence:
    """`items` (a scan's: listing rows, or a hold-out's side of them) with each label `l` as `label_of[l]`."""
    if isinstance(items, Subset):
        return Subset(_relabelled(items.items, label_of), items.positions)
    if isinstance(items, LabelledItems):
        return LabelledItems(items.table, items.rows, [label_of[label] for label in items.labels])
    return [(disp, ref, label_of[label]) for disp, ref, label in items]


def first_names(names: list[str]) -> str:
    return f"{names[:5]}" + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def class_diff(new: list[str], old: list[str]) -> str:
    """Which class names differ (the first few), so the user can find the folder at fault."""
    only_new, only_old = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    if not only_new and not only_old:
        return "same names, different order"
    parts = ([f"only in this split: {first_names(only_new)}"] if only_new else []) + \
        ([f"only in the existing: {first_names(only_old)}"] if only_old else [])
    # names that print alike: one folder written in composed Unicode (NFC, as Linux tools write it), the other
    # decomposed (NFD, as macOS's file systems gave it): 'café' and 'café'
    nfc = unicodedata.normalize
    alike = sorted({nfc("NFC", n) for n in only_new} & {nfc("NFC", n) for n in only_old})
    if alike:
        shown = [ascii(n) for n in sorted(set(only_new) | set(only_old)) if nfc("NFC", n) in alike]
        parts.append(f"{first_names(alike)} written in two Unicode forms ({', '.join(shown[:4])}): rename the folders "
                     f"to one form, e.g. NFC (`convmv -f utf8 -t utf8 --nfc -r --notest FOLDER`)")
    return ", ".join(parts)

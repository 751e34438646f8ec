"""Seeded, stratified hold-out: carve a validation split out of a training split's scanned inputs.

He et al. (2016) tuned CIFAR-10 on a 45k/5k split of its 50k training images; ImageNet users carve a
"minival" out of train because the official val serves as the test set. The choice is made on the sorted
file list, before anything is decoded, from the seed and the class names alone: every array task scans
the same tree and so computes the same two splits, and a rerun the same ones. It does not depend on the
shuffle, the shard size, workers or tasks (each side is then shuffled and sharded like any split).

Both sides record the hold-out in their options (``options["holdout"]``), so a later run into the same
OUT with another hold-out, which would move images between the two splits, is refused by name.
"""
from __future__ import annotations

import json
import random
import re
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.wording import plural

from .errors import PrepError
from .format import MANIFEST_NAME, SPLIT_NAME, WORK_DIR, plan_path
from .imagefolder import Scan
from .plan_record import BrokenPlan, read_plan

# What a rerun must repeat (option name, key in the record); the count drawn follows from these and the inputs.
SETTINGS = (("--holdout", "size"), ("--holdout-split", "holdout_split"), ("--split", "split"), ("--seed", "seed"))


@dataclass(frozen=True)
class Holdout:
    """What to hold out: `size` images (an int) or that fraction of them (a float in (0, 1)) of `split`,
    into `holdout_split`, drawn with `seed`."""

    size: int | float
    split: str
    holdout_split: str
    seed: int

    def settings(self) -> dict:
        """The comparable part of the record (see :data:`SETTINGS`)."""
        return {key: getattr(self, key) for _opt, key in SETTINGS}


def parse_holdout(text: str) -> int | float:
    """``--holdout`` text -> a count of images (``5000``) or a fraction of them (``0.1``)."""
    t = text.strip()
    if re.fullmatch(r"[+-]?\d+", t):
        n = int(t)
        if n <= 0:
            raise PrepError(f"--holdout {text}: must be a positive count of images (or a fraction, e.g. 0.1)")
        return n
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+)", t):
        f = float(t)
        if not 0 < f < 1:
            raise PrepError(f"--holdout {text}: a fraction of the images must lie strictly between 0 and 1 "
                            f"(a count of images is a whole number, e.g. 5000)")
        return f
    raise PrepError(f"--holdout {text!r}: expected a count of images (e.g. 5000) or a fraction of them (e.g. 0.1)")


def check_names(split: str, holdout_split: str | None, reserved: dict[str, str] | None = None) -> str:
    """Validate ``--holdout-split`` (given with ``--holdout``): a split name of its own. `reserved` maps
    other names it may not take (ImageNet's ``val``) to why."""
    example = next(n for n in ("val", "minival", "holdout") if n != split.lower() and n not in (reserved or {}))
    if holdout_split is None:
        raise PrepError(f"--holdout needs --holdout-split NAME: the split the held-out images go to (e.g. {example})")
    if not SPLIT_NAME.fullmatch(holdout_split):
        raise PrepError(f"--holdout-split {holdout_split!r}: use letters, digits, '_' or '-' only, "
                        f"at most 64 characters")
    if holdout_split.lower() == split.lower():  # also Val vs val: one file name on a case-insensitive disk
        raise PrepError(f"--holdout-split {holdout_split!r} is the split it is carved out of ({split!r}): "
                        f"the held-out images need a split of their own, e.g. {example}")
    for name, why in (reserved or {}).items():
        if holdout_split.lower() == name.lower():
            raise PrepError(f"--holdout-split {holdout_split!r}: {why}")
    return holdout_split


def quotas(counts: Sequence[int], n: int) -> list[int]:
    """Per class, round(n * count / total), rounded so that the quotas add up to exactly `n`: each class
    gets the floor of its share, and the classes with the largest remainders (ties: lower class index)
    one more (largest-remainder apportionment, in integers so no float rounding can differ)."""
    total = sum(counts)
    base = [n * c // total for c in counts]
    order = sorted(range(len(counts)), key=lambda k: (-(n * counts[k] % total), k))
    for k in order[:n - sum(base)]:
        base[k] += 1
    return base


class Subset(Sequence):
    """Some of a split's items (positions in its sorted order), as ``Scan.items``: each keeps its key
    number (``key_index``), its size and mtime for the plan, without copying the listing."""

    def __init__(self, items: Sequence, positions: Sequence[int]):
        self.items = items
        self.positions = array("q", positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return self.items[self.positions[k]]

    def size(self, k: int) -> int:
        get = getattr(self.items, "size", None)
        p = self.positions[k]
        return get(p) if get is not None else self.items[p][1][2]

    def mtime(self, k: int) -> int:
        get = getattr(self.items, "mtime", None)
        return get(self.positions[k]) if get is not None else -1

    def key_index(self, k: int) -> int:
        get = getattr(self.items, "key_index", None)
        p = self.positions[k]
        return get(p) if get is not None else p


def _labels(items: Sequence) -> np.ndarray:
    labels = getattr(items, "labels", None)
    if labels is None:
        labels = [it[2] for it in items]
    return np.asarray(labels, dtype=np.int64)


def split_scan(scan: Scan, h: Holdout) -> tuple[Scan, Scan, dict]:
    """(the rest, the held-out images, the record both splits keep in ``options["holdout"]``).

    Per class, its quota (:func:`quotas`) is drawn from the class's images in sorted path order with
    ``random.Random`` seeded by the seed and the class name, so one class's draw depends on nothing else.
    Scan rejects stay with the rest (they were inputs of that split).
    """
    total = len(scan.items)
    n = h.size if isinstance(h.size, int) else round(h.size * total)
    if n >= total:
        raise PrepError(f"--holdout {h.size}: split {h.split!r} has {plural(total, 'image')}, so holding out {n} "
                        f"would leave none for it; hold out fewer")
    if n <= 0:
        raise PrepError(f"--holdout {h.size}: that fraction of the {plural(total, 'image')} of split {h.split!r} is "
                        f"no image; hold out more")
    labels = _labels(scan.items)
    counts = np.bincount(labels, minlength=len(scan.classes)).tolist()
    want = quotas(counts, n)
    full = [c for c, (q, have) in enumerate(zip(want, counts)) if have and q >= have]
    if full:
        c = full[0]
        more = f" (and {len(full) - 1} more {'class' if len(full) == 2 else 'classes'})" if len(full) > 1 else ""
        raise PrepError(f"--holdout {h.size}: class {scan.classes[c]!r} has {plural(counts[c], 'image')} and its "
                        f"share of the hold-out is {want[c]}, which would leave none of it in split {h.split!r}{more}; "
                        f"hold out fewer images")
    order = np.argsort(labels, kind="stable")  # positions grouped by class, each group in sorted order
    starts = np.concatenate(([0], np.cumsum(counts)))
    held = []
    for c, q in enumerate(want):
        if q:
            rng = random.Random(f"data_prep holdout {h.seed} {scan.classes[c]}")
            held.extend(int(order[starts[c] + k]) for k in rng.sample(range(counts[c]), q))
    mask = np.zeros(total, dtype=bool)
    mask[held] = True
    rest_pos, held_pos = np.flatnonzero(~mask), np.flatnonzero(mask)
    record = {"size": h.size, "count": n, "of": total, "seed": h.seed, "split": h.split,
              "holdout_split": h.holdout_split}
    rest = Scan(scan.classes, scan.class_names, Subset(scan.items, rest_pos.tolist()), list(scan.rejects))
    kept = Scan(scan.classes, scan.class_names, Subset(scan.items, held_pos.tolist()), [])
    return rest, kept, record


def _recorded(out: Path, split: str) -> list[tuple[str, dict | None]]:
    """The hold-out settings OUT holds for `split` (None: prepared without one), from its plan record and
    its manifest entry, where they exist."""
    found = []
    options = _plan_options(out, split)
    if options is not None:
        found.append((str(plan_path(out, split)), options.get("holdout")))
    try:
        entry = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))["splits"][split]
        held = entry["options"].get("holdout")
        if held is None or isinstance(held, dict):  # else a broken entry, which this run writes again
            found.append((str(out / MANIFEST_NAME), held))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return [(where, None if rec is None else {key: rec.get(key) for _o, key in SETTINGS}) for where, rec in found]


def _flags(rec: dict) -> str:
    return " ".join(f"{opt} {rec[key]}" for opt, key in SETTINGS)


def check_rerun(out: Path, settings: dict[str, dict | None]) -> None:
    """Refuse to write a split whose recorded hold-out (or lack of one) differs from this run's: the images
    would move between the two splits, and a split left from before would overlap the new one. `settings`:
    per split this run writes, :meth:`Holdout.settings` or None."""
    out = Path(out)
    for split, new in settings.items():
        for where, old in _recorded(out, split):
            if old == new:
                continue
            if old is None:
                raise PrepError(f"{where}: split {split!r} was prepared without --holdout, and this run writes it "
                                f"as part of a hold-out ({_flags(new)}); use another OUT (or delete this one) to "
                                f"carve the splits anew")
            if new is None:
                other = old["holdout_split"] if split == old["split"] else old["split"]
                raise PrepError(f"{where}: split {split!r} was prepared as part of a hold-out ({_flags(old)}); "
                                f"rerun with those options, or use another OUT: without them it would overlap "
                                f"split {other!r}")
            diff = [(opt, key) for opt, key in SETTINGS if old[key] != new[key]]
            raise PrepError(f"{where}: split {split!r} was prepared with "
                            f"{', '.join(f'{opt} {old[key]}' for opt, key in diff)}, this run has "
                            f"{', '.join(f'{opt} {new[key]}' for opt, key in diff)}: another hold-out would move "
                            f"images between split {old['split']!r} and {old['holdout_split']!r}; rerun with the "
                            f"recorded setting, or use another OUT (or delete this one)")


def with_partners(out: Path, splits: list[str]) -> list[str]:
    """`splits` plus the other side of each one's hold-out (from its plan record): the two are merged into
    the manifest together, never one alone (``launch submit prep``'s finalize names only ``--split``)."""
    out = Path(out)
    result = list(splits)
    for split in splits:
        rec = _plan_holdout(out, split)
        if rec is None:
            continue
        other = rec["holdout_split"] if split == rec["split"] else rec["split"]
        theirs = _plan_holdout(out, other)
        if theirs is not None and theirs != rec:
            raise PrepError(f"{out / WORK_DIR}: the plans of split {split!r} and {other!r} record different "
                            f"hold-outs ({_flags(rec)} / {_flags(theirs)}); rerun the prep command")
        if other not in result:
            result.append(other)
    return result


def _plan_holdout(out: Path, split: str) -> dict | None:
    options = _plan_options(out, split)
    return None if options is None else options.get("holdout")


def _plan_options(out: Path, split: str) -> dict | None:
    """The options of `split`'s plan record in OUT; None without one, or with a broken one (the rerun writes it
    again; finalize names it: plan_record.read_plan)."""
    try:
        plan = read_plan(out, split)
    except BrokenPlan:
        return None
    return None if plan is None else plan["options"]

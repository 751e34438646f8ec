"""ImageFolder layout: ``<class>/<file>`` (optionally under one top folder) in a folder or a tar."""
from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import PrepError
from .inputs import KeptRows
from .sources import Listing, Ref, common_top, is_hidden, list_source

# Folder names that mark SRC as holding splits (train/<class>/...) rather than classes.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev"})


@dataclass
class Scan:
    """Labelled inputs of one split, ready for planning."""

    classes: list[str]
    class_names: list[str]
    items: Sequence[tuple[str, Ref, int]]  # (display path, ref, label), sorted by display path
    rejects: list[tuple[str, str]] = field(default_factory=list)


def scan_imagefolder(src: Path, split: str | None = None) -> Scan:
    """Label every file by its class folder; class index = position in the sorted folder names.

    When SRC holds several split folders (``train/``, ``val/``, each with class folders) and one is
    named like `split`, only that one is used.
    """
    listing: Listing = list_source(src)
    table = listing.files
    rejects = list(listing.rejects)
    kept = array("q")  # rows of the listing's compact table; FileEntry objects are never all built
    loose = []  # files directly in SRC (README, LICENSE): never samples, and must not hide the layout
    for i in range(len(table)):
        parts = table.parts(i)
        if is_hidden(parts):
            rejects.append((table.display(i), "hidden file or folder"))
        elif len(parts) < 2:
            loose.append((table.display(i), "not inside a class folder"))
        else:
            kept.append(i)
    tops = set()
    all_deep = True
    for i in kept:
        parts = table.parts(i)
        if len(parts) >= 3:
            tops.add(parts[0])
        else:
            all_deep = False
    if split is not None and len(tops) > 1 and all_deep:
        if split in tops:
            kept = array("q", (i for i in kept if table.parts(i)[0] == split))
            rejects = [r for r in rejects if _in_split(r[0], src, split)]
        elif tops & SPLIT_NAMES:
            raise PrepError(f"{src}: holds split folders {sorted(tops)} but none named {split!r}; "
                            "pass --split with one of them")
    rejects += loose
    top = common_top(lambda: (table.parts(i) for i in kept))
    strip = 1 if top is not None else 0
    by_class = KeptRows(table)
    for i in kept:
        parts = table.parts(i)[strip:]
        if len(parts) < 2:
            rejects.append((table.display(i), "not inside a class folder"))
        else:
            by_class.add(i, parts[0])
    classes = sorted(by_class.names)
    if not classes:
        raise PrepError(f"{src}: no class folders with files found (expected <class>/<image> layout)")
    empty = sorted({d[strip] for d in listing.dirs if len(d) == strip + 1 and (top is None or d[0] == top)
                    and not is_hidden(d)} - set(classes))
    if empty:  # not a class (no input to label), but say so: a silently missing class shifts labels
        print(f"data_prep: {src}: skipping {len(empty)} folder(s) without files, not classes: "
              f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}", file=sys.stderr)
    items, _ = by_class.items({c: i for i, c in enumerate(classes)})  # every class is in the index
    return Scan(classes, list(classes), items, sorted(rejects))


def _in_split(display: str, src: Path, split: str) -> bool:
    rel = display.split(":", 1)[1] if not src.is_dir() and ":" in display else display[len(str(src)) + 1:]
    return rel.lstrip("./").startswith(split + "/")

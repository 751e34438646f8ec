"""ImageFolder layout: ``<class>/<file>`` (optionally under one top folder) in a folder or a tar."""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import PrepError
from .inputs import LabelledItems
from .sources import Listing, Ref, common_top, is_hidden, list_source


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
    for i in range(len(table)):
        if is_hidden(table.parts(i)):
            rejects.append((table.display(i), "hidden file or folder"))
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
    if split is not None and split in tops and len(tops) > 1 and all_deep:
        kept = array("q", (i for i in kept if table.parts(i)[0] == split))
        rejects = [r for r in rejects if _in_split(r[0], src, split)]
    strip = 1 if common_top(lambda: (table.parts(i) for i in kept)) is not None else 0
    rows, class_ids = array("q"), array("i")
    names: list[str] = []
    ids: dict[str, int] = {}
    for i in kept:
        parts = table.parts(i)[strip:]
        if len(parts) < 2:
            rejects.append((table.display(i), "not inside a class folder"))
            continue
        cid = ids.get(parts[0])
        if cid is None:
            cid = ids[parts[0]] = len(names)
            names.append(parts[0])
        rows.append(i)
        class_ids.append(cid)
    classes = sorted(names)
    if not classes:
        raise PrepError(f"{src}: no class folders with files found (expected <class>/<image> layout)")
    index = {c: i for i, c in enumerate(classes)}
    row_label = array("i", [-1]) * len(table)  # each listing row is kept at most once
    for row, cid in zip(rows, class_ids):
        row_label[row] = index[names[cid]]
    del class_ids
    sorted_rows = table.sorted_by_display(rows)  # stable, like sorting the (display, ...) tuples
    items = LabelledItems(table, sorted_rows, (row_label[r] for r in sorted_rows))
    return Scan(classes, list(classes), items, sorted(rejects))


def _in_split(display: str, src: Path, split: str) -> bool:
    rel = display.split(":", 1)[1] if not src.is_dir() and ":" in display else display[len(str(src)) + 1:]
    return rel.lstrip("./").startswith(split + "/")

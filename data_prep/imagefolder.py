"""ImageFolder layout: ``<class>/<file>`` (optionally under one top folder) in a folder or a tar."""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import PrepError
from .inputs import KeptRows
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
    items, _ = by_class.items({c: i for i, c in enumerate(classes)})  # every class is in the index
    return Scan(classes, list(classes), items, sorted(rejects))


def _in_split(display: str, src: Path, split: str) -> bool:
    rel = display.split(":", 1)[1] if not src.is_dir() and ":" in display else display[len(str(src)) + 1:]
    return rel.lstrip("./").startswith(split + "/")

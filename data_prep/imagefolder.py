"""ImageFolder layout: ``<class>/<file>`` (optionally under one top folder) in a folder or a tar."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import PrepError
from .sources import Listing, Ref, is_hidden, list_source, strip_common_top


@dataclass
class Scan:
    """Labelled inputs of one split, ready for planning."""

    classes: list[str]
    class_names: list[str]
    items: list[tuple[str, Ref, int]]  # (display path, ref, label), sorted by display path
    rejects: list[tuple[str, str]] = field(default_factory=list)


def scan_imagefolder(src: Path, split: str | None = None) -> Scan:
    """Label every file by its class folder; class index = position in the sorted folder names.

    When SRC holds several split folders (``train/``, ``val/``, each with class folders) and one is
    named like `split`, only that one is used.
    """
    listing: Listing = list_source(src)
    rejects = list(listing.rejects)
    kept = []
    for f in listing.files:
        if is_hidden(f.parts):
            rejects.append((f.display, "hidden file or folder"))
        else:
            kept.append(f)
    tops = {f.parts[0] for f in kept if len(f.parts) >= 3}
    if split is not None and split in tops and len(tops) > 1 and all(len(f.parts) >= 3 for f in kept):
        kept = [f for f in kept if f.parts[0] == split]
        rejects = [r for r in rejects if _in_split(r[0], src, split)]
    strip_common_top(kept)
    by_class: list[tuple[str, str, Ref]] = []
    for f in kept:
        if len(f.parts) < 2:
            rejects.append((f.display, "not inside a class folder"))
        else:
            by_class.append((f.parts[0], f.display, f.ref))
    classes = sorted({c for c, _, _ in by_class})
    if not classes:
        raise PrepError(f"{src}: no class folders with files found (expected <class>/<image> layout)")
    index = {c: i for i, c in enumerate(classes)}
    items = sorted(((d, r, index[c]) for c, d, r in by_class), key=lambda t: t[0])
    return Scan(classes, list(classes), items, sorted(rejects))


def _in_split(display: str, src: Path, split: str) -> bool:
    rel = display.split(":", 1)[1] if not src.is_dir() and ":" in display else display[len(str(src)) + 1:]
    return rel.lstrip("./").startswith(split + "/")

"""ImageFolder layout: ``<class>/<file>`` (optionally under one top folder) in a folder or a tar."""
from __future__ import annotations

import os
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline.wording import plural

from .errors import PrepError
from .inputs import KeptRows
from .sources import Listing, Ref, common_top, is_hidden, list_source

# Folder names that mark SRC as holding splits (train/<class>/...) rather than classes.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev"})
TRAIN_NAMES = frozenset({"train", "training"})


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
    tops, structured = set(), set()  # top folders; those holding <class>/<file> (files two levels below)
    all_deep = True
    for i in kept:
        parts = table.parts(i)
        tops.add(parts[0])
        all_deep = all_deep and len(parts) >= 3
        if len(parts) >= 3:
            structured.add(parts[0])
    split_names = {t for t in tops if t.lower() in SPLIT_NAMES}
    split_like = len(tops) > 1 and split_names == tops  # train/, val/*.jpg, Test/
    named = sorted(t for t in tops if split is not None and t.lower() == split.lower())
    # split folders beside other folders (meta/, out/): the named one holds classes, or two split names
    # side by side (never classes: those are refused below); else train/, val/ and meta/ became 3 classes
    beside = bool(split_names & structured) or (bool(named) and len(split_names) > 1)
    if split is not None and len(tops) > 1 and (all_deep or split_like or beside):
        if named:
            if named[0] not in structured:
                raise PrepError(f"{src}: the split folder {named[0]!r} holds its images directly, not in class "
                                f"folders, so they have no labels (ImageNet's flat val/: `data_prep imagenet` reads "
                                f"its labels from the devkit or LOC_val_solution.csv)")
            others = sorted(tops - split_names)
            if others:
                folders = "folder" if len(others) == 1 else "folders"
                print(f"data_prep: note: {src}: using the split folder {named[0]!r}; not reading the {folders} "
                      f"beside the split folders: {', '.join(others[:10])}{' ...' if len(others) > 10 else ''}",
                      file=sys.stderr)
            kept = array("q", (i for i in kept if table.parts(i)[0] == named[0]))
            rejects = [r for r in rejects if _in_split(r[0], src, named[0])]
        elif split_names:
            raise PrepError(f"{src}: holds split folders {sorted(tops)} but none named {split!r}; "
                            "pass --split with one of them")
    rejects += loose
    top = common_top(lambda: (table.parts(i) for i in kept))
    strip = 1 if top is not None else 0
    if top is not None and split is not None and top.lower() in SPLIT_NAMES and \
            (top.lower() in TRAIN_NAMES) != (split.lower() in TRAIN_NAMES):  # CIFAR's test/ as val is fine
        raise PrepError(f"{src}: holds only the split folder {top!r}, but --split is {split!r}; pass "
                        f"--split {top}, or the source of the {split!r} split")
    named_as = Path(src).name
    if top is None and split is not None and named_as.lower() in SPLIT_NAMES and \
            (named_as.lower() in TRAIN_NAMES) != (split.lower() in TRAIN_NAMES):  # SRC itself: .../train
        raise PrepError(f"{src}: is a split folder named {named_as!r}, but --split is {split!r}; pass --split "
                        f"{named_as}, or the source of the {split!r} split")
    if top is not None and split is not None and top.lower() in SPLIT_NAMES and split.lower() not in SPLIT_NAMES:
        # a typo (--split tset) would otherwise become a split that no config names
        print(f"data_prep: note: {src} holds the split folder {top!r}; writing it as split {split!r} "
              f"(the name training settings refer to)", file=sys.stderr)
    by_class = KeptRows(table)
    for i in kept:
        parts = table.parts(i)[strip:]
        if len(parts) < 2:
            rejects.append((table.display(i), "not inside a class folder"))
        else:
            by_class.add(i, parts[0])
    for path, reason in listing.rejects:  # a class folder that cannot be read: a class lost, labels shifted
        if src.is_dir() and reason.startswith(("cannot list folder", "folder already listed")):
            rel = Path(path).relative_to(src).parts if Path(path).is_relative_to(src) else None
            if rel == () or (rel is not None and len(rel) <= strip and rel[0] == top):
                # SRC itself, or the split folder in it: it said "no class folders with files found"
                raise PrepError(f"{path}: {reason}; fix its permissions and run again")
            if rel is not None and len(rel) == strip + 1 and (top is None or rel[0] == top) and not is_hidden(rel):
                raise PrepError(f"{path}: class folder {rel[-1]!r}: {reason}; its class would be missing and the "
                                f"labels of the classes after it would move: fix it (permissions, or remove the "
                                f"duplicate link) and run again")
    classes = sorted(by_class.names)
    _check_utf8_names(src, top, classes)
    if not classes:
        raise PrepError(f"{src}: no class folders with files found (expected <class>/<image> layout)")
    if len(classes) > 1 and all(c.lower() in SPLIT_NAMES for c in classes):
        raise PrepError(f"{src}: the folders that would be the classes, {classes}, are split names: pass the "
                        f"split's own folder as SRC (its subfolders are the classes), or a folder holding "
                        f"<split>/<class>/<image> with --split naming one")
    empty = sorted({d[strip] for d in listing.dirs if len(d) == strip + 1 and (top is None or d[0] == top)
                    and not is_hidden(d)} - set(classes))
    if empty:  # not a class (no input to label), but say so: a silently missing class shifts labels
        classes_ = "a class" if len(empty) == 1 else "classes"
        print(f"data_prep: {src}: skipping {plural(len(empty), 'folder')} without files, not {classes_}: "
              f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}", file=sys.stderr)
    items, _ = by_class.items({c: i for i, c in enumerate(classes)})  # every class is in the index
    return Scan(classes, list(classes), items, sorted(rejects))


def _check_utf8_names(src: Path, top: str | None, classes: list[str]) -> None:
    """Class names go into manifest.json (text): a folder name that is not UTF-8 (``caf\\xe9``, Latin-1)
    would be stored as escapes that do not round-trip, so it is an error naming the folder's bytes."""
    for name in classes:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raw = os.fsencode(name)  # the folder's (or member name's) original bytes
            inner = f"{top}/" if top is not None else ""
            where = f"{src}/{inner}" if src.is_dir() else f"{src}:{inner}"
            where = os.fsencode(where).decode("utf-8", "backslashreplace")
            fix = "rename the folder" if src.is_dir() else "re-create the archive with the folder renamed"
            raise PrepError(f"{where}{raw.decode('utf-8', 'backslashreplace')}: class folder name {raw!r} is not "
                            f"valid UTF-8, and class names go into manifest.json: {fix} to a UTF-8 name (e.g. "
                            f"`convmv -f latin1 -t utf8` for Latin-1 names) and run again") from None


def _in_split(display: str, src: Path, split: str) -> bool:
    rel = display.split(":", 1)[1] if not src.is_dir() and ":" in display else display[len(str(src)) + 1:]
    return rel.lstrip("./").startswith(split + "/")

"""What a folder without ``manifest.json`` holds, said as the data_prep command that shards it (or as the
subfolder that is data_prep's output, where the folder is one level too high).

``data.root`` (or ``data_prep verify``) pointed at the images rather than at data_prep's output is a common
first mistake, and "manifest not found (run `python -m data_prep ...` first)" left the user to work out which
command, with which arguments. Only names are looked at, and only the first entries of a folder: this is a hint
in an error message, and the folder may be ImageNet's 1.3 million files on a network file system.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from .format import MANIFEST_NAME
from .imagenet import TRAIN_TAR, VAL_TAR, WNID

# the names an image folder's files have (data_prep itself reads any file and rejects what does not decode)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SCAN = 64  # entries looked at per folder
SPLIT_NAMES = ("train", "val", "validation", "test")


def shard_command(folder: str | Path) -> str | None:
    """What ``folder`` holds and the data_prep command that shards it into an ``OUT`` to fill in; None when
    it does not look like a dataset data_prep reads (empty, shards without their manifest, ...). A subfolder that
    is data_prep's output is named instead."""
    folder = Path(folder)
    src = shlex.quote(str(folder))
    names = _entries(folder)
    outputs = [folder / n for n in sorted(names) if (folder / n / MANIFEST_NAME).is_file()]
    if outputs:  # one level too high: the data root of `make demo` is data/demo/shards, not data/demo
        if len(outputs) == 1:
            return f"its subfolder {outputs[0]} is (use that folder)"
        return f"its subfolders {', '.join(str(o) for o in outputs[:3])} are (use one of them)"
    if TRAIN_TAR in names or VAL_TAR in names:
        return f"it holds ImageNet's archives: shard them with `python -m data_prep imagenet {src} OUT`"
    splits = [n for n in SPLIT_NAMES if n in names and _is_class_tree(folder / n)]
    if "train" in splits and any(WNID.fullmatch(n) for n in _entries(folder / "train")):
        return f"it holds an extracted ImageNet: shard it with `python -m data_prep imagenet {src} OUT`"
    if splits:
        each = " and ".join(f"`python -m data_prep imagefolder {shlex.quote(str(folder / s))} OUT --split {s}`"
                            for s in splits)
        return f"it holds a folder of classes per split: shard them into one OUT with {each}"
    if _is_class_tree(folder):  # a folder named val/ or test/ is no train split (imagefolder refuses it as one)
        from .imagefolder import SPLIT_NAMES as SPLIT_WORDS, TRAIN_NAMES

        name = Path(os.path.abspath(folder)).name.lower()
        split = "val" if name in SPLIT_WORDS and name not in TRAIN_NAMES else "train"
        return f"it holds a folder of images per class: shard it with `python -m data_prep imagefolder {src} OUT " \
               f"--split {split}`"
    return None


def _entries(folder: Path) -> list[str]:
    """The names of the first ``SCAN`` entries of ``folder`` (none when it cannot be listed)."""
    try:
        with os.scandir(folder) as it:
            return [e.name for _, e in zip(range(SCAN), it)]
    except OSError:
        return []


def _is_class_tree(folder: Path) -> bool:
    """``folder/<class>/<image>``: one of its first subfolders holds an image among its first entries."""
    subfolders = [folder / n for n in _entries(folder) if not n.startswith(".") and (folder / n).is_dir()]
    return any(n.lower().endswith(IMAGE_SUFFIXES) for sub in subfolders[:8] for n in _entries(sub))

"""ILSVRC2012 inputs: the original archives (read in place, nested tars included) or extracted folders.

Train: ``ILSVRC2012_img_train.tar`` (1000 inner ``<wnid>.tar``) or ``train/<wnid>/*.JPEG``.
Val: ``ILSVRC2012_img_val.tar`` or ``val/`` (flat, or in ``<wnid>/`` folders). Flat val labels come
from the devkit (ground truth IDs mapped to wnids through ``meta.mat``) or Kaggle's
``LOC_val_solution.csv``. Class index = position in the sorted wnids (torchvision convention).
"""
from __future__ import annotations

import csv
import io
import re
import sys
import tarfile
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pipeline.wording import plural

from .class_list import first_names
from .errors import PrepError
from .holdout import Holdout, check_rerun, split_scan
from .imagefolder import Scan
from .inputs import KeptRows, LabelledItems
from .sources import (FileEntry, Listing, is_hidden, iter_tar_members, last_of_each_name, list_dir, list_tar,
                      open_tar, tar_mtime_ns)

if TYPE_CHECKING:
    from .validate import EncodeOptions

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
VAL_CSV = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
WNID = re.compile(r"n\d{8}")


class Devkit:
    """The 1000 ILSVRC2012 classes (wnid -> words) and val ground truth (file stem -> wnid)."""

    def __init__(self, synsets: dict[int, tuple[str, str]], truth: list[int], where: str):
        self.where = where
        self.names = {wnid: words for _id, (wnid, words) in sorted(synsets.items())}
        self.val_labels = {}
        for i, ilsvrc_id in enumerate(truth, start=1):
            if ilsvrc_id not in synsets:
                raise PrepError(f"{where}: ground truth line {i} has ILSVRC2012_ID {ilsvrc_id} not in meta.mat")
            self.val_labels[f"ILSVRC2012_val_{i:08d}"] = synsets[ilsvrc_id][0]


def _parse_devkit(meta_bytes: bytes, truth_text: str, where: str) -> Devkit:
    try:
        import scipy.io
    except ImportError:
        raise PrepError(f"{where}: reading the devkit's meta.mat needs scipy (pip install scipy), "
                        f"or pass --val-csv {VAL_CSV} instead") from None
    try:
        syn = scipy.io.loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
        ids = [int(x) for x in syn["ILSVRC2012_ID"]]
        wnids = [str(x) for x in syn["WNID"]]
        words = [str(x) for x in syn["words"]]
        children = [int(x) for x in syn["num_children"]] if "num_children" in syn.dtype.names else [0] * len(ids)
    except Exception as exc:
        raise PrepError(f"{where}: cannot read data/meta.mat synsets ({exc})") from None
    synsets = {i: (w, n) for i, w, n, c in zip(ids, wnids, words, children) if c == 0 and 1 <= i <= 1000}
    try:
        truth = [int(line) for line in truth_text.split()]
    except ValueError:
        raise PrepError(f"{where}: ILSVRC2012_validation_ground_truth.txt has a non-integer line") from None
    return Devkit(synsets, truth, where)


def load_devkit(path: Path) -> Devkit:
    """Read meta.mat + validation ground truth from the devkit .tar.gz (or its extracted folder)."""
    meta = truth = None
    if path.is_dir():
        cands = list(path.rglob("meta.mat"))
        gts = list(path.rglob("ILSVRC2012_validation_ground_truth.txt"))
        if cands and gts:
            meta, truth = cands[0].read_bytes(), gts[0].read_text()
    else:
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    if m.isfile() and m.name.endswith("data/meta.mat"):
                        meta = tf.extractfile(m).read()
                    elif m.isfile() and m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                        truth = tf.extractfile(m).read().decode("ascii")
        except (tarfile.TarError, OSError, EOFError) as exc:
            # (tarfile's "could not be opened" lists each compression it tried, a line each: one line here)
            why = ("not a tar or .tar.gz archive" if str(exc).startswith("file could not be opened")
                   else str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise PrepError(f"{path}: cannot read devkit archive ({why}; --devkit takes "
                            "ILSVRC2012_devkit_t12.tar.gz or the folder it was extracted to)") from None
    if meta is None or truth is None:
        raise PrepError(f"{path}: devkit lacks data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt")
    return _parse_devkit(meta, truth, str(path))


def load_val_csv(path: Path) -> dict[str, str]:
    """Kaggle LOC_val_solution.csv: ImageId -> wnid (first token of PredictionString)."""
    labels = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a CSV saved by Excel starts with a BOM
            for row in csv.DictReader(f):
                tokens = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not tokens or not WNID.fullmatch(tokens[0]):
                    raise PrepError(f"{path}: bad row {row!r} (expected ImageId,PredictionString '<wnid> ...')")
                labels[row["ImageId"]] = tokens[0]
    except OSError as exc:
        raise PrepError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise PrepError(f"{path}: not UTF-8 text (save the CSV as UTF-8)") from None
    if not labels:
        raise PrepError(f"{path}: no rows")
    return labels


def load_synset_mapping(path: Path) -> dict[str, str]:
    """Kaggle LOC_synset_mapping.txt: '<wnid> <words>' per line."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            wnid, _, words = line.strip().partition(" ")
            out[wnid] = words
    return out


def _list_train_archive(path: Path) -> Listing:
    """Members of every inner ``<wnid>.tar`` with absolute offsets into the outer archive."""
    listing = Listing()
    with open_tar(path) as outer:
        for m, off, display in last_of_each_name(iter_tar_members(outer, str(path), 0, str(path), listing), listing):
            stem = Path(m.name).name
            if is_hidden(Path(m.name).parts):  # macOS's ._<wnid>.tar, a .DS_Store: no class archive
                listing.rejects.append((display, "hidden file or folder"))
                continue
            if not stem.endswith(".tar"):
                listing.rejects.append((display, "unexpected file in train archive (not <wnid>.tar)"))
                continue
            wnid = stem[:-4]
            try:
                inner = tarfile.open(fileobj=outer.extractfile(m), mode="r:")
            except tarfile.TarError as exc:  # a whole class: not a reject
                raise PrepError(f"{display}: inner archive unreadable ({exc}); its class would be lost: "
                                f"re-download or re-create {path}") from None
            with inner:
                members = last_of_each_name(iter_tar_members(inner, str(path), off, display, listing), listing)
                for im, ioff, idisp in members:
                    listing.files.append(FileEntry((wnid, Path(im.name).name), idisp, (str(path), ioff, im.size),
                                                   tar_mtime_ns(im)))
    return listing


class ImageNetSource:
    """Locates train/val inputs and label sources under SRC."""

    def __init__(self, src: Path, devkit: Path | None, val_csv: Path | None):
        if not src.is_dir():
            raise PrepError(f"{src}: ImageNet source must be a folder (with the ILSVRC2012 archives or train/, val/)")
        self.src = src
        data = src / "ILSVRC" / "Data" / "CLS-LOC"  # Kaggle layout
        self.data = data if data.is_dir() else src
        self.devkit_path = devkit if devkit is not None else (src / DEVKIT if (src / DEVKIT).exists() else None)
        self.csv_path = val_csv if val_csv is not None else (src / VAL_CSV if (src / VAL_CSV).exists() else None)
        self._csv_given = val_csv is not None  # a --val-csv names the val labels, over any devkit
        for p, opt in ((devkit, "--devkit"), (val_csv, "--val-csv")):
            if p is not None and not p.exists():
                raise PrepError(f"{opt} {p}: does not exist")
        self._devkit = None

    def devkit(self) -> Devkit | None:
        if self._devkit is None and self.devkit_path is not None:
            self._devkit = load_devkit(self.devkit_path)
        return self._devkit

    def check_output(self, out: Path, splits: list[str]) -> None:
        """Refuse an output folder inside a split folder that is read: a rerun listed the shards as a class
        of their own (the class count changed, exit 0)."""
        for split in splits:
            folder = self.data / split
            if folder.is_dir() and out.resolve().is_relative_to(folder.resolve()):
                raise PrepError(f"{out}: output folder is inside {folder}, which is read as the {split} split, so a "
                                f"rerun would list the shards as a class of their own; use a folder outside it")

    def list_split(self, split: str) -> tuple[Listing, str]:
        """Files of a split and a description of where they came from."""
        archive = self.src / (TRAIN_TAR if split == "train" else VAL_TAR)
        folder = self.data / split
        if folder.is_dir():
            if archive.is_file():  # (a train/ extracted in part would hide the archive without a word)
                print(f"data_prep: {split}: reading the folder {folder}; {archive} beside it is read only when "
                      f"there is no {split}/ folder", file=sys.stderr)
            return list_dir(folder), str(folder)
        if archive.is_file():
            return (_list_train_archive(archive) if split == "train" else list_tar(archive)), str(archive)
        packed = sorted(p.name for p in self.src.glob(archive.name + ".*") if p.is_file())  # .tar.gz, .tar.zst
        if packed:
            raise PrepError(f"{self.src / packed[0]}: a compressed {archive.name}; the images are read from the "
                            f"uncompressed archive by byte offset: decompress it first (to {archive.name})")
        raise PrepError(f"{self.src}: no {split} data (expected {archive.name} or {split}/ folder)")

    def val_labels(self) -> dict[str, str]:
        """File stem -> wnid for a flat val set: from ``--val-csv`` where given (a devkit found in SRC, or given
        too, only names the classes then: it was read over the user's CSV without a word), else from the devkit,
        else from the Kaggle CSV in SRC. Where both are at hand, a line says which one labels val."""
        if self._csv_given:
            if self.devkit_path is not None:
                print(f"data_prep: val: labels from --val-csv {self.csv_path}; the devkit {self.devkit_path} "
                      f"names the classes", file=sys.stderr)
            return load_val_csv(self.csv_path)
        dk = self.devkit()
        if dk is not None:
            if self.csv_path is not None:
                print(f"data_prep: val: labels from the devkit {self.devkit_path}, not {self.csv_path} "
                      f"(--val-csv {self.csv_path} would label val from it)", file=sys.stderr)
            return dk.val_labels
        if self.csv_path is not None:
            return load_val_csv(self.csv_path)
        raise PrepError(f"{self.src}: val images are not in class folders and no labels were found "
                        f"(put {DEVKIT} or {VAL_CSV} in SRC, or pass --devkit/--val-csv)")

    def class_names(self, classes: list[str]) -> list[str]:
        dk = self.devkit()
        names = dict(dk.names) if dk is not None else {}
        mapping = self.src / SYNSET_MAPPING
        if not names and mapping.is_file():
            names = load_synset_mapping(mapping)
        return [names.get(c, c) for c in classes]


OFFICIAL_VAL_IMAGES = 50_000  # ILSVRC2012's val set: its devkit's ground truth has a line for each


def _check_ground_truth_lines(labels: dict[str, str], stems: list[str], devkit: str) -> None:
    """The devkit labels val by line (line i is ILSVRC2012_val_<i>), so a ground truth with a line too many or too
    few at the top or in the middle shifted every label after it: wrong labels, exit 0 (7 of 8 in a trial). Its
    lines must number the official 50,000, or the highest image number here (a miniature, a copy of part of
    val; one whose last images were left out cuts its ground truth to match); the labelled images that are not
    here are named in a note. A count is all that can be checked: a line lost and another added match it."""
    numbers = [int(s.rsplit("_", 1)[1]) for s in stems if re.fullmatch(r"ILSVRC2012_val_\d{8}", s)]
    if numbers and len(labels) not in (OFFICIAL_VAL_IMAGES, max(numbers)):
        raise PrepError(f"{devkit}: ILSVRC2012_validation_ground_truth.txt has {len(labels)} lines, but the val "
                        f"images here are numbered up to {max(numbers)}: it labels by line (line i is "
                        f"ILSVRC2012_val_<i>), so a line too many or too few shifts the labels after it; use the "
                        f"devkit these images came with, or label val by file name with --val-csv "
                        f"LOC_val_solution.csv"
                        + (f" (if the images after ILSVRC2012_val_{max(numbers):08d} were left out on purpose, cut "
                           f"the file to its first {max(numbers)} lines: the labels by line stay)"
                           if len(labels) > max(numbers) else ""))
    here = set(stems)
    absent = [stem for stem in labels if stem not in here]
    if absent and len(absent) < len(labels):
        more = ", ..." if len(absent) > 3 else ""
        print(f"data_prep: note: val: {plural(len(absent), 'image')} of the devkit's ground truth "
              f"{'is' if len(absent) == 1 else 'are'} not in SRC ({', '.join(absent[:3])}{more})", file=sys.stderr)


def _labelled(listing: Listing, split: str, src: ImageNetSource) -> tuple[KeptRows, list]:
    """Kept rows with their wnid plus rejects, for class-folder or flat layouts."""
    rejects = list(listing.rejects)
    table = listing.files
    files = array("q")
    flat_count = 0
    for i in range(len(table)):
        parts = table.parts(i)
        if is_hidden(parts):
            rejects.append((table.display(i), "hidden file or folder"))
        else:
            files.append(i)
            flat_count += len(parts) == 1
    flat = flat_count * 2 > len(files)
    labels = src.val_labels() if (split == "val" and flat) else None
    if labels is not None and src.devkit() is not None and labels is src.devkit().val_labels:
        _check_ground_truth_lines(labels, [Path(table.parts(i)[0]).stem for i in files if len(table.parts(i)) == 1],
                                  src.devkit().where)
    out = KeptRows(table)
    for i in files:
        parts = table.parts(i)
        if labels is not None:
            if len(parts) != 1:
                rejects.append((table.display(i), "unexpected folder in flat val set"))
                continue
            wnid = labels.get(Path(parts[0]).stem)
            if wnid is None:
                rejects.append((table.display(i), "no label for this file in devkit/CSV"))
                continue
        else:
            if len(parts) < 2:
                rejects.append((table.display(i), "not inside a <wnid> class folder"))
                continue
            wnid = parts[0]
        out.add(i, wnid)
    return out, rejects


def _check_split_folder(listing: Listing, folder: Path, split: str) -> None:
    """A split folder, or a class folder in it, that cannot be listed (``chmod 000``, another group's) stops the
    scan, as in ``imagefolder``: it was one reject (``cannot list folder``) standing for a whole class of images
    (``train: 18 samples, 1 rejected`` with 6 images gone), and without the devkit the class list comes from
    the train folders, so the labels of the classes after it moved."""
    for path, reason in listing.rejects:
        if not reason.startswith(("cannot list folder", "folder already listed")):
            continue
        rel = Path(path).relative_to(folder).parts if Path(path).is_relative_to(folder) else None
        if rel == ():
            raise PrepError(f"{path}: the {split} folder: {reason}; fix its permissions and run again")
        if rel is not None and len(rel) == 1 and not is_hidden(rel):
            raise PrepError(f"{path}: class folder {rel[0]!r} of split {split!r}: {reason}; its images would be "
                            f"missing (and without the devkit the labels of the classes after it would move): fix "
                            f"it (permissions, or remove the duplicate link) and run again")


def scan_imagenet(src: ImageNetSource, splits: list[str]) -> tuple[dict[str, Scan], dict[str, str]]:
    """Scan the requested splits with one shared class list; returns ({split: Scan}, {split: where})."""
    # what labels the splits need before the train listing (minutes on its archive): a bad --devkit, or a flat
    # val with nothing to label it by, was said only after it
    src.devkit()
    raw, where, folders = {}, {}, set()
    for split in sorted(splits, key=lambda s: s != "val"):
        listing, where[split] = src.list_split(split)
        if Path(where[split]).is_dir():
            _check_split_folder(listing, Path(where[split]), split)
        raw[split] = _labelled(listing, split, src)
        # class folders, empty ones too (a train/ extracted in part): their classes keep their labels
        folders |= {d[0] for d in listing.dirs if len(d) == 1 and not is_hidden(d)}
        del listing
        if not len(raw[split][0].rows) and all(why == "hidden file or folder" for _, why in raw[split][1]):
            raise _no_images(src, split, where[split])
    dk = src.devkit()
    mapping = src.src / SYNSET_MAPPING
    if dk is not None:
        classes, listed_by = sorted(dk.names), "devkit"
    elif mapping.is_file():  # Kaggle's: its 1000 wnids
        classes, listed_by = sorted(load_synset_mapping(mapping)), SYNSET_MAPPING
    else:
        # every class a split names (its folders, empty ones too, and the val labels): from the train folders
        # alone, an empty or missing class folder dropped its class and moved the labels of those after it
        classes = sorted(set(folders).union(*(raw[s][0].names for s in raw)))
        listed_by = "class folders and val labels" if len(raw) > 1 else "class folders"
    if not classes:
        raise PrepError(f"{src.src}: no ImageNet classes found")
    index = {c: i for i, c in enumerate(classes)}
    names = src.class_names(classes)
    scans = {}
    for split in list(raw):
        kept, rejects = raw.pop(split)
        items, dropped = kept.items(index)
        for row, wnid in dropped:
            rejects.append((kept.table.display(row), f"class {wnid!r} is not one of the "
                                                     f"{len(classes)} ILSVRC2012 classes"))
        del kept, dropped
        scans[split] = Scan(classes, names, items, sorted(rejects))
        _warn_classes_without_input(split, classes, items, listed_by)
    return scans, where


def _no_images(src: ImageNetSource, split: str, where: str) -> PrepError:
    """A split with nothing to read, before any work: an empty val/ (made by hand, or a `tar -x` not yet run)
    was 0 samples, exit 0, and hid the archive beside it."""
    archive = src.src / (TRAIN_TAR if split == "train" else VAL_TAR)
    beside = (f"; {archive} beside it is read only when there is no {split}/ folder: remove the folder (or finish "
              "extracting into it)" if Path(where).is_dir() and archive.is_file() else "")
    return PrepError(f"{where}: no {split} image in it{beside}")


def _warn_classes_without_input(split: str, classes: list[str], items: LabelledItems, listed_by: str) -> None:
    """Classes of the list (the devkit's, Kaggle's mapping, else every class a split names) with no input in
    `split` (a train/ folder extracted in part): their labels stay, with no sample, so the run goes on; said
    here, or a model trained on part of ImageNet is a surprise."""
    seen = [False] * len(classes)
    for label in items.labels:
        seen[label] = True
    missing = [c for c, here in zip(classes, seen) if not here]
    if missing:
        print(f"data_prep: warning: split {split!r} has no input of {len(missing)} of the {len(classes)} classes "
              f"({listed_by}): {first_names(missing)} (a folder extracted in part?); they keep their labels, with "
              "no sample", file=sys.stderr)


def prepare_imagenet(src: Path, out: Path, splits: list[str], opts: EncodeOptions, seed: int,
                     shard_bytes: int | None, samples_per_shard: int | None, workers: int, task_index: int = 0,
                     num_tasks: int = 1, devkit: Path | None = None, val_csv: Path | None = None,
                     show_progress: bool = True, holdout: Holdout | None = None,
                     on_holdout: Callable[[dict], None] | None = None) -> dict | None:
    """Scan and shard the requested ImageNet splits; returns the manifest when running as one task.

    With `holdout` (``split == "train"``), its images are carved out of train into their own split.
    """
    from .prepare import SplitPart, prepare_splits

    source = ImageNetSource(src, devkit, val_csv)
    source.check_output(out, splits)
    settings = {s: holdout.settings() if holdout is not None and s == "train" else None for s in splits}
    if holdout is not None:
        settings[holdout.holdout_split] = holdout.settings()
    check_rerun(out, settings)  # before the scan, which takes minutes on the archives
    scans, where = scan_imagenet(source, splits)
    parts = []
    for split in splits:
        split_source = str(Path(where[split]).resolve())
        if holdout is not None and split == "train":
            rest, held, record = split_scan(scans[split], holdout)
            if on_holdout is not None:
                on_holdout(record)
            parts += [SplitPart(split, rest, record, split_source),
                      SplitPart(holdout.holdout_split, held, record, split_source)]
        else:
            parts.append(SplitPart(split, scans[split], None, split_source))
    return prepare_splits(out, parts, str(src.resolve()), opts, seed, shard_bytes, samples_per_shard, workers,
                          task_index, num_tasks, show_progress)

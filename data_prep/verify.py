"""``python -m data_prep verify OUT``: re-check every shard against the manifest.

Checks size and sha256, the index (sample count, jpg/cls/lbl present, offsets inside the tar,
cls text == lbl int32) and fully decodes a few evenly spaced JPEGs per shard, every JPEG of a shard whose
checksum no longer matches (so the damaged samples are named); each split's columns file against the recorded
size and sha256 and against its indexes (``columns_file.columns_problem``); and each split's lines of
``rejects.jsonl`` against its ``rejected`` count (``rejects_file.count_problems``); and the manifest's class list
against the one each split's labels count (``class_list_problems``).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import re
import struct
from pathlib import Path

from .class_list import CLAIM_NAME, claimed_classes
from .columns_file import columns_problem
from .format import (INDEX_VERSION, MANIFEST_NAME, SAMPLE_EXTS, WORK_DIR, ManifestError, index_of_entry, load_manifest,
                     plan_path, read_index, work_dir)
from .plan_record import BrokenPlan, read_plan
from .rejects_file import count_problems
from .runner import map_in_processes
from .shardwriter import file_sha256
from pipeline.wording import plural


def verify_shard(out: Path, split: str, shard: dict, n_classes: int,
                 decode: int) -> tuple[list[str], list[int] | None]:
    """(problems found in one shard, empty when it is sound; its samples per class read from its labels, None
    when it has problems)."""
    counts = [0] * n_classes
    problems = _check_shard(out, split, shard, n_classes, decode, counts)
    return problems, counts if not problems else None


def _check_shard(out: Path, split: str, shard: dict, n_classes: int, decode: int, counts: list[int]) -> list[str]:
    from PIL import Image

    tar = Path(out) / shard["name"]
    index_file = index_of_entry(shard)
    where = f"{split}/{shard['name']}"
    if not tar.is_file():
        return [f"{where}: shard file missing"]
    size = tar.stat().st_size
    if size != shard["bytes"]:
        return [f"{where}: size {size} != manifest {shard['bytes']}"]
    problems = []
    try:
        changed = file_sha256(tar) != shard["sha256"]
    except OSError as exc:  # another user's file (mode 600), an I/O error: a finding, and the other shards go on
        return [f"{where}: cannot read: {exc.strerror or exc}"]
    if changed:  # then decode every sample, to name the damaged ones (as the loaders' errors do)
        problems.append(f"{where}: sha256 mismatch (file changed or corrupt); decoding all its samples")
    try:
        index = read_index(Path(out) / index_file)
    except ManifestError as exc:
        return problems + [f"{where}: {exc}"]
    if len(index) != shard["samples"]:
        problems.append(f"{where}: index has {plural(len(index), 'sample')}, manifest says {shard['samples']}")
    expected = index_of_tar(tar)
    if expected is None:
        problems.append(f"{where}: cannot list the tar's members")
    else:
        lines = (Path(out) / index_file).read_text(encoding="utf-8").splitlines(keepends=True)
        wrong = [i for i, (a, b) in enumerate(zip(lines, expected)) if a != b]
        if wrong or len(lines) != len(expected):
            at = wrong[0] if wrong else min(len(lines), len(expected))
            problems.append(f"{where}: index {index_file} does not match the tar's members from line {at + 1} "
                            f"(an entry points at another sample's data): rebuild the shard (rerun the split's prep "
                            f"command: it builds the shards that are not as recorded and keeps the others)")
    step = max(1, len(index) // max(decode, 1)) if decode else 0
    with open(tar, "rb") as f:
        for i, entry in enumerate(index):
            if set(entry) != set(SAMPLE_EXTS):
                problems.append(f"{where}: sample {i} has members {sorted(entry)}")
                continue
            if any(off + n > size for off, n in entry.values()):
                problems.append(f"{where}: sample {i} points past the end of the tar")
                continue
            f.seek(entry["cls"][0])
            cls = f.read(entry["cls"][1])
            f.seek(entry["lbl"][0])
            lbl = f.read(entry["lbl"][1])
            if len(lbl) != 4 or not cls.isdigit() or int(cls) != struct.unpack("<i", lbl)[0] \
                    or not 0 <= int(cls) < n_classes:
                problems.append(f"{where}: sample {i} has inconsistent labels cls={cls!r} lbl={lbl!r}")
            else:
                counts[int(cls)] += 1
            if changed or (step and i % step == 0 and i // step < decode):
                f.seek(entry["jpg"][0])
                try:
                    im = Image.open(io.BytesIO(f.read(entry["jpg"][1])))
                    im.load()
                    if im.format != "JPEG" or im.mode != "RGB":
                        problems.append(f"{where}: sample {i} is {im.format} {im.mode}, not an RGB JPEG")
                except Exception as exc:  # any decode failure is a finding, not a crash
                    why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc)).strip()
                    problems.append(f"{where}: sample {i} does not decode: {why}")
    return problems


def class_list_problems(out: Path, manifest: dict) -> list[str]:
    """The manifest's ``classes`` (and ``class_names``) against the class list each listed split's labels count:
    its plan record (``OUT/.work/<split>/plan.json``, from which finalize wrote them), else its claim
    (``classes.json``). Its samples carry their label alone (``KEY.cls``, ``KEY.lbl``; KEY is no class name), so
    the shards cannot tell two swapped names, and a class appended has no sample: both passed verify, and the
    labels then meant other classes (or the class count changed) for training and evaluation. Where no split has
    either record (``OUT/.work`` not copied along), the order alone is checked: data_prep writes the classes
    sorted (a label is a class's position in that order). A name listed twice is ``load_manifest``'s
    (``manifest_shape.duplicate_class``). One plan record read per split: a constant beside the shards' pass."""
    path, classes, names = out / MANIFEST_NAME, manifest["classes"], manifest.get("class_names")
    fix = (f"move it aside and run `python -m data_prep finalize {out}`: it writes the manifest again from "
           f"{out / WORK_DIR}")
    counted: dict[tuple[str, ...], list[tuple[str, Path]]] = {}  # class list -> (split, record) counting it
    named: list[tuple[str, Path, list[str]]] = []  # (split, plan, its class_names)
    for split in manifest["splits"]:
        try:
            plan = read_plan(out, split)
        except BrokenPlan:  # finalize's and the rerun's to say; the claim may still tell
            plan = None
        if plan is not None:
            counted.setdefault(tuple(plan["classes"]), []).append((split, plan_path(out, split)))
            named.append((split, plan_path(out, split), plan["class_names"]))
        elif (claim := claimed_classes(out, split, plan_too=False)) is not None \
                and all(isinstance(c, str) for c in claim):
            counted.setdefault(tuple(claim), []).append((split, work_dir(out, split) / CLAIM_NAME))
    if not counted:
        problems = []
        if names is not None and len(names) != len(classes):
            problems.append(f"{path}: class_names lists {len(names)} names, classes {len(classes)} (edited by hand?); "
                            f"rerun the prep commands that wrote {out} (there is no {WORK_DIR}/ there to check "
                            f"them against)")
        wrong = next((i for i in range(len(classes) - 1) if not classes[i] < classes[i + 1]), None)
        if wrong is not None:
            problems.append(f"{path}: classes[{wrong}] is {classes[wrong]!r}, before classes[{wrong + 1}] "
                            f"{classes[wrong + 1]!r}: data_prep writes the classes sorted (a label is a class's "
                            f"position in that order), so the labels would mean other classes (edited by hand?); "
                            f"rerun the prep commands that wrote {out} (there is no {WORK_DIR}/ there to check "
                            f"the list against)")
        return problems
    problems = []
    for theirs, splits in counted.items():
        if list(theirs) == classes:
            continue
        i = next(c for c in range(max(len(theirs), len(classes)))
                 if c >= len(theirs) or c >= len(classes) or theirs[c] != classes[c])
        ours = f"is {classes[i]!r}" if i < len(classes) else "is not there"
        label = f"label {i} of {_splits([s for s, _ in splits])} is {theirs[i]!r}" if i < len(theirs) else \
            f"{_splits([s for s, _ in splits])} {'has' if len(splits) == 1 else 'have'} no label {i}"
        differ = sum(a != b for a, b in zip(theirs, classes))
        how = (f"{differ} of the {len(classes)} classes differ" if len(theirs) == len(classes) else
               f"{len(theirs)} classes there, {len(classes)} in the manifest")
        problems.append(f"{path}: classes[{i}] {ours}, but {label} ({', '.join(str(f) for _, f in splits)}: {how}; "
                        f"edited by hand?); {fix}")
    if problems or names is None:
        return problems
    for split, plan, theirs in named:  # the list agrees: the names shown for it
        if theirs != names:
            i = next(c for c in range(max(len(theirs), len(names)))
                     if c >= len(theirs) or c >= len(names) or theirs[c] != names[c])
            ours = f"is {names[i]!r}" if i < len(names) else "is not there"
            said = f"names class {i} ({classes[i]!r}) {theirs[i]!r}" if i < len(theirs) else f"has no class {i}"
            return [f"{path}: class_names[{i}] {ours}, but the plan of split {split!r} {said} ({plan}; edited by "
                    f"hand?); {fix}"]
    return []


def _splits(names: list[str]) -> str:
    return f"split {names[0]!r}" if len(names) == 1 else "splits " + ", ".join(repr(n) for n in names)


def index_of_tar(tar: Path) -> list[str] | None:
    """The index lines (header first) that ``write_index`` (and DALI's ``wds2idx``) makes for this tar's
    members; None when the tar cannot be listed."""
    import tarfile

    samples: list[list[str]] = []
    last = None
    try:
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rpartition(".")
                if key != last:
                    samples.append([])
                    last = key
                samples[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
                tf.members.clear()
    except (tarfile.TarError, OSError):
        return None
    return [f"{INDEX_VERSION} {len(samples)}\n"] + [" ".join(s) + "\n" for s in samples]


def _star(args) -> tuple[list[str], list[int] | None]:
    return verify_shard(*args)


def verify(out: str | Path, decode: int = 4, workers: int = 1) -> list[str]:
    """All problems found in OUT (empty list = OK); ManifestError when there is no usable manifest."""
    out = Path(out)
    manifest = load_manifest(out)  # every field verify reads is there, of its type
    jobs = []
    problems = class_list_problems(out, manifest)
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            jobs.append((out, split, shard, len(manifest["classes"]), decode))
    if workers > 1 and len(jobs) > 1:
        results = list(map_in_processes(_star, jobs, min(workers, len(jobs)), mp.get_context("fork"),
                                        doing="verifying shards"))
    else:
        results = [_star(j) for j in jobs]
    per_split: dict[str, list[int] | None] = {}
    for (_out, split, *_rest), (found, counts) in zip(jobs, results):
        problems.extend(found)
        total = per_split.setdefault(split, [0] * len(manifest["classes"]))
        per_split[split] = None if total is None or counts is None else [a + b for a, b in zip(total, counts)]
    for split, entry in manifest["splits"].items():  # a shard with problems is said already: its counts are not
        got, recorded = per_split.get(split, [0] * len(manifest["classes"])), entry.get("class_counts")
        if recorded is not None and len(recorded) > len(manifest["classes"]):  # (next() below: a StopIteration)
            problems.append(f"{out / MANIFEST_NAME}: splits.{split}.class_counts has {len(recorded)} counts, but "
                            f"classes lists {len(manifest['classes'])} (edited by hand?); `python -m data_prep "
                            f"finalize {out}` writes it again")
        elif got is not None and recorded is not None and got != recorded:
            wrong = next(c for c in range(len(got)) if c >= len(recorded) or got[c] != recorded[c])
            problems.append(f"{out / MANIFEST_NAME}: splits.{split}.class_counts says "
                            f"{recorded[wrong] if wrong < len(recorded) else 'nothing'} for class "
                            f"{manifest['classes'][wrong]!r}, the shards' labels {got[wrong]} (edited by hand?); "
                            f"`python -m data_prep finalize {out}` writes it again")
    for split, entry in manifest["splits"].items():
        if (problem := columns_problem(out, split, entry)) is not None:
            problems.append(problem)
    return problems + count_problems(out, manifest)

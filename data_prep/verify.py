"""``python -m data_prep verify OUT``: re-check every shard against the manifest.

Checks size and sha256, the index (sample count, jpg/cls/lbl present, offsets inside the tar,
cls text == lbl int32) and fully decodes a few evenly spaced JPEGs per shard, every JPEG of a shard whose
checksum no longer matches (so the damaged samples are named); each split's columns file against the recorded
size and sha256 and against its indexes (``columns_file.columns_problem``); and each split's lines of
``rejects.jsonl`` against its ``rejected`` count (``rejects_file.count_problems``).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import re
import struct
from pathlib import Path

from .columns_file import columns_problem
from .format import INDEX_VERSION, MANIFEST_NAME, SAMPLE_EXTS, ManifestError, index_of_entry, load_manifest, read_index
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
                            f"(an entry points at another sample's data): rebuild the shard")
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
    problems = []
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
        if got is not None and recorded is not None and got != recorded:
            wrong = next(c for c in range(len(got)) if c >= len(recorded) or got[c] != recorded[c])
            problems.append(f"{out / MANIFEST_NAME}: splits.{split}.class_counts says "
                            f"{recorded[wrong] if wrong < len(recorded) else 'nothing'} for class "
                            f"{manifest['classes'][wrong]!r}, the shards' labels {got[wrong]} (edited by hand?); "
                            f"`python -m data_prep finalize {out}` writes it again")
    for split, entry in manifest["splits"].items():
        if (problem := columns_problem(out, split, entry)) is not None:
            problems.append(problem)
    return problems + count_problems(out, manifest)

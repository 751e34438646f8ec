"""On-disk contract between data_prep and the loaders: manifest, shard names, index files, and where
data_prep keeps its work records (plan, done-records) under ``OUT/.work``.

Kept tiny and free of heavy imports so training code can import it cheaply.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Collection

from .manifest_shape import manifest_problem
from .record_fields import shown
from pipeline.wording import plural

SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a split's name: in shard and file names

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
INDEX_VERSION = "v1.2"  # DALI wds2idx index format version
SAMPLE_EXTS = ("jpg", "cls", "lbl")
WORK_DIR = ".work"  # OUT/.work/<split>/: the split's plan and one done-record per shard (resume, finalize)
PLAN_NAME = "plan.json"
REJECTS_NAME = "rejects.jsonl"  # OUT/rejects.jsonl: why each rejected input was left out


class ManifestError(Exception):
    """The manifest or an index file is missing, unreadable, broken, or of an unknown version."""


def shard_name(split: str, number: int) -> str:
    """Name of shard `number` of `split` (e.g. ``train-000003.tar``)."""
    return f"{split}-{number:06d}.tar"


def index_name(split: str, number: int) -> str:
    """Name of the DALI index that belongs to :func:`shard_name`."""
    return index_name_of(shard_name(split, number))


def index_name_of(shard: str) -> str:
    """The index name that belongs to a shard's file name (``train-000003.tar`` -> ``train-000003.idx``):
    the fallback of :func:`index_of_entry` for a manifest entry without ``index``."""
    return Path(shard).with_suffix(".idx").name


def index_of_entry(shard: dict) -> str:
    """The index file name of a manifest's shard entry: its ``index``, or for an entry without one
    :func:`index_name_of` its shard (what the loaders and ``verify`` read)."""
    return shard.get("index", index_name_of(shard["name"]))


def shard_file_pattern(split: str) -> str:
    """Regular expression (unanchored) for the names :func:`shard_name` and :func:`index_name` give `split`'s
    shards and indexes."""
    return rf"{re.escape(split)}-\d{{6}}\.(tar|idx)"


def work_dir(out: str | Path, split: str) -> Path:
    """Where the plan and the done-records of `split` live (``OUT/.work/<split>/``)."""
    return Path(out) / WORK_DIR / split


def plan_path(out: str | Path, split: str) -> Path:
    """The plan record of `split`: written before its shards, read by resume, finalize and the loaders' advice."""
    return work_dir(out, split) / PLAN_NAME


def done_record_path(out: str | Path, split: str, shard: str) -> Path:
    """The done-record of shard file `shard` of `split`: written last, after the shard and its index."""
    return work_dir(out, split) / (shard + ".json")


def load_manifest(out_dir: str | Path, rewriting: Collection[str] = ()) -> dict:
    """Read and check ``OUT/manifest.json``: every field its readers take is there with its type
    (``manifest_shape``); raise ManifestError naming the path, the field and what to do. The entries of the
    splits in `rewriting` are not checked (finalize and a rerun write them again)."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        work = Path(out_dir) / WORK_DIR
        if work.is_dir():  # a data_prep run began here: unfinished, or array tasks not yet finalized
            raise ManifestError(
                f"{path}: manifest not found: data_prep has not finished {out_dir} (its {WORK_DIR}/ is there): "
                f"rerun the same data_prep command to finish it, or after Slurm array tasks "
                f"`python -m data_prep finalize {out_dir}` once they all ended") from None
        from .source_hint import shard_command  # the error's path only: it imports the ImageNet reader

        hint = shard_command(out_dir)
        raise ManifestError(f"{path}: manifest not found (" + (
            f"{out_dir} is not data_prep's output: {hint}" if hint else "run `python -m data_prep ...` first") +
            ")") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from None
    except UnicodeDecodeError:
        raise _broken(out_dir, "manifest is not valid JSON (not UTF-8 text)") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _broken(out_dir, f"manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise _broken(out_dir, "manifest is not a JSON object")
    if "version" not in manifest:
        raise _broken(out_dir, "manifest has no field 'version'")
    if manifest["version"] != MANIFEST_VERSION or isinstance(manifest["version"], bool):
        raise _other_version(out_dir, manifest["version"])
    found = manifest_problem(manifest, rewriting)
    if found is not None:
        raise _broken(out_dir, f"manifest {found[0]}", found[1])
    return manifest


def _other_version(out_dir: str | Path, version: object) -> ManifestError:
    """A manifest of another format version (written by another version of this code, whose fields may mean
    other things): no reader takes it, so the error says which version this code reads and how to get one."""
    return ManifestError(
        f"{Path(out_dir) / MANIFEST_NAME}: manifest version {shown(version)}, but this data_prep reads version "
        f"{MANIFEST_VERSION} only: read it with the resnet-pipeline version that wrote it, or move it aside and "
        f"rerun the prep commands that wrote {out_dir} with this one (after Slurm array tasks, then "
        f"`python -m data_prep finalize {out_dir}`)")


def _broken(out_dir: str | Path, problem: str, split: str | None = None) -> ManifestError:
    """A manifest that is there but broken: the error names it and says what writes it again. A split's entry
    is written again by finalize from the split's plan and done-records under OUT/.work; the whole file is,
    once moved aside, from those of every split planned there (any other split needs its prep command)."""
    path = Path(out_dir) / MANIFEST_NAME
    planned = sorted(p.parent.name for p in (Path(out_dir) / WORK_DIR).glob(f"*/{PLAN_NAME}"))
    if split is not None and split in planned:
        fix = (f"`python -m data_prep finalize {out_dir}` writes the entry of split {split!r} again from "
               f"{work_dir(out_dir, split)}")
    elif split is not None:
        fix = (f"rerun the prep command of split {split!r} ({work_dir(out_dir, split)} is not there for finalize to "
               f"write its entry again from)")
    elif planned:
        fix = (f"move it aside and run `python -m data_prep finalize {out_dir}`: it writes the manifest again from "
               f"{Path(out_dir) / WORK_DIR}, with the splits planned there ({', '.join(planned)})")
    else:
        fix = (f"move it aside and rerun the prep commands that wrote {out_dir} (there is no {WORK_DIR}/ there to "
               f"write the manifest again from)")
    return ManifestError(f"{path}: {problem} (edited by hand, or cut short?); {fix}")


def shard_paths(out_dir: str | Path, manifest: dict, split: str) -> list[Path]:
    """Absolute paths of the shards of `split`, in manifest order."""
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ManifestError(f"{Path(out_dir) / MANIFEST_NAME}: no split {split!r} (have {sorted(splits)})")
    return [Path(out_dir) / shard["name"] for shard in splits[split]["shards"]]


def index_paths(out_dir: str | Path, manifest: dict, split: str) -> list[Path]:
    """Absolute paths of the DALI index files of `split`, parallel to :func:`shard_paths`."""
    shard_paths(out_dir, manifest, split)  # validates the split
    return [Path(out_dir) / index_of_entry(shard) for shard in manifest["splits"][split]["shards"]]


def write_index(idx_path: str | Path, samples: list[list[tuple[str, int, int, str]]]) -> None:
    """Write a DALI webdataset index (same bytes as ``wds2idx``).

    `samples` holds, per sample, (ext, data offset, size, member name) for each member in tar order.
    fsynced before it returns, as the tar is: NFS and Lustre may report a failed write (the quota, an I/O
    error) only at fsync, and an index whose bytes never reached the server was renamed into place and its
    shard recorded as done.
    """
    lines = [f"{INDEX_VERSION} {len(samples)}\n"]
    for members in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in members) + "\n")
    with open(idx_path, "w", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())


def index_count(idx_path: str | Path) -> int | None:
    """The sample count the header of a DALI index gives (its first line alone: cheap for a large index), or
    None when the file is not there or its header is not ``INDEX_VERSION N`` (``read_index`` says why). A
    done-record's ``samples`` is checked against it: a wrong one (edited, or copied from another run) made
    finalize's count check fail on every rerun, while the rerun kept the shard."""
    try:
        with open(idx_path, "rb") as f:
            head = f.readline(64).split()
    except OSError:
        return None
    if len(head) != 2 or head[0] != INDEX_VERSION.encode() or not head[1].isdigit():
        return None
    return int(head[1])


def read_index(idx_path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """Parse a DALI index: per sample, ext -> (byte offset of the member data in the tar, size). A broken one
    (cut short, edited, not text; data_prep writes each whole, via a rename) is a ManifestError naming the
    file and the line: a rerun of the prep command rebuilds a shard whose index changed (its done-record
    holds the index's sha256)."""
    path = Path(idx_path)
    fix = "rerun the prep command that wrote it: it rebuilds the shard with its index"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read index: {exc}") from None
    except UnicodeDecodeError:  # was a traceback in the loaders and verify
        raise ManifestError(f"{path}: index is not text (not UTF-8); {fix}") from None
    if not lines:
        raise ManifestError(f"{path}: empty index file; {fix}")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdecimal():
        raise ManifestError(f"{path}: bad index header {lines[0]!r} (expected '{INDEX_VERSION} N'); {fix}")
    count = int(head[1])
    body = lines[1:]
    if len(body) != count:
        raise ManifestError(f"{path}: header says {plural(count, 'sample')}, found {plural(len(body), 'line')}; {fix}")
    out: list[dict[str, tuple[int, int]]] = []
    for lineno, line in enumerate(body, start=2):
        parts = line.split(" ")
        if len(parts) % 4:
            raise ManifestError(f"{path}:{lineno}: expected groups of 'ext offset size name'; {fix}")
        entry: dict[str, tuple[int, int]] = {}
        for i in range(0, len(parts), 4):
            try:
                offset, size = int(parts[i + 1]), int(parts[i + 2])
            except ValueError:
                raise ManifestError(f"{path}:{lineno}: non-integer offset or size; {fix}") from None
            if offset < 0 or size < 0:  # verify's seek failed naming no file; a read in training, an EINVAL traceback
                raise ManifestError(f"{path}:{lineno}: negative offset or size; {fix}")
            entry[parts[i]] = (offset, size)
        out.append(entry)
    return out

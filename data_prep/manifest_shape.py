"""The fields the readers of ``manifest.json`` take from it, and their types: the loaders' ``ShardSet`` (and the
checkpoint's dataset digests), ``verify``, ``finalize`` and a rerun merging into it, ``launch status``.
``format.load_manifest`` checks them for all of them, so a manifest that parses but is of the wrong shape (a
hand edit, a copy cut short at a place that still parses) is one line naming the field, where the readers
raised KeyError, TypeError or AttributeError, or used it as is (a shard listed twice is read twice; a
``samples`` of ``"8"`` passed ``int()`` and changed the checkpoint's digest of the split; a split's
``samples`` other than its shards' sum was shown by ``launch status``).

Kept free of heavy imports: the loaders import it through ``format``.
"""
from __future__ import annotations

from typing import Collection

from .record_fields import COUNT, KINDS, first_problem, shown

# top level (the version is checked first, on its own; `classes` may not list a name twice: duplicate_class);
# `class_names` and `options` are rewritten by every finalize, and only type-checked
TOP_FIELDS = {"classes": "a list of strings", "splits": "an object", "class_names": "a list of strings",
              "options": "an object"}
# splits.NAME; `rejected` and `options` only type-checked
SPLIT_FIELDS = {"shards": "a list", "samples": COUNT, "rejected": COUNT, "options": "an object"}
# splits.NAME.shards[i]; `index` may be missing (the loaders and verify take the shard's name with .idx:
# format.index_of_entry)
MIN_SAMPLE_BYTES = 2048  # two tar members at least (jpg, lbl), each a 512-byte header and a 512-byte block
SHARD_FIELDS = {"name": "a string", "index": "a string", "samples": COUNT, "bytes": COUNT, "sha256": "a string"}
# splits.NAME.columns (optional: a finalize of before 2026-12-05 wrote none; data_prep/columns_file.py)
COLUMNS_FIELDS = {"name": "a string", "bytes": COUNT, "sha256": "a string"}


def entry_problem(split: str, entry: object) -> str | None:
    """What is wrong with the manifest's entry of `split`, or None."""
    where = f"splits.{split}"
    if not isinstance(entry, dict):
        return f"field {where!r} is {shown(entry)}, not an object"
    problem = first_problem(entry, SPLIT_FIELDS, where + ".", optional=("rejected", "options"))
    if problem is not None:
        return problem
    holdout = entry.get("options", {}).get("holdout")
    if holdout is not None and not isinstance(holdout, dict):  # a rerun compares its settings (holdout.check_rerun)
        return f"field '{where}.options.holdout' is {shown(holdout)}, not an object"
    if "columns" in entry:
        columns = entry["columns"]
        if not isinstance(columns, dict):
            return f"field '{where}.columns' is {shown(columns)}, not an object"
        problem = first_problem(columns, COLUMNS_FIELDS, where + ".columns.")
        if problem is not None:
            return problem
    first_of: dict[str, int] = {}
    for i, shard in enumerate(entry["shards"]):
        at = f"{where}.shards[{i}]"
        if not isinstance(shard, dict):
            return f"field {at!r} is {shown(shard)}, not an object"
        problem = first_problem(shard, SHARD_FIELDS, at + ".", optional=("index",))
        if problem is not None:
            return problem
        if shard["samples"] > shard["bytes"] // MIN_SAMPLE_BYTES:  # the loaders size arrays by it: a MemoryError
            return (f"field '{at}.samples' is {shard['samples']}, more than its {shard['bytes']} bytes can hold (a "
                    f"sample takes {MIN_SAMPLE_BYTES} bytes of tar at least)")
        if shard["name"] in first_of:  # the loaders would read its samples twice
            return f"field '{at}.name' is {shown(shard['name'])}, which shards[{first_of[shard['name']]}] lists already"
        first_of[shard["name"]] = i
    total = sum(shard["samples"] for shard in entry["shards"])
    if entry["samples"] != total:  # `launch status` and the summary say it; the loaders count the shards'
        return f"field '{where}.samples' is {entry['samples']}, not the sum of its shards' samples ({total})"
    counts = entry.get("class_counts")  # optional: a finalize of before 2026-12-07 wrote none
    if counts is not None and not (isinstance(counts, list) and all(KINDS[COUNT](n) for n in counts)
                                   and sum(counts) == total):
        return f"field '{where}.class_counts' is {shown(counts)}, not a count per class adding up to {total}"
    return None


def duplicate_class(classes: list[str]) -> str | None:
    """The first class name `classes` lists twice, said as a problem of field ``classes``, or None. data_prep
    never writes one (class folders and wnids are unique); a hand edit (``classes[1] = "cat"`` where ``cat``
    is ``classes[3]`` too) made two labels one class, and `verify` said OK. (``class_names`` may repeat one:
    ImageNet's devkit calls two wnids ``crane``.)"""
    first_at: dict[str, int] = {}
    for i, name in enumerate(classes):
        if name in first_at:
            return (f"field 'classes' lists {name!r} twice (classes[{first_at[name]}] and classes[{i}]): "
                    f"two labels would be one class")
        first_at[name] = i
    return None


def manifest_problem(manifest: dict, rewriting: Collection[str] = ()) -> tuple[str, str | None] | None:
    """(what is wrong, the split whose entry it is in, or None for the top level), or None when the manifest
    is sound. The entries of the splits in `rewriting` are not looked at: the caller writes them again."""
    problem = first_problem(manifest, TOP_FIELDS, optional=("class_names", "options"))
    if problem is None:
        problem = duplicate_class(manifest["classes"])
    if problem is not None:
        return problem, None
    for split, entry in manifest["splits"].items():
        if split not in rewriting:
            problem = entry_problem(split, entry)
            if problem is not None:
                return problem, split
    return None

"""data_prep.index_arrays: a regular DALI index parsed into arrays, with the numbers ``read_index`` gives, and
``None`` (so the caller reads it with ``read_index``, whose errors name the line) for anything else. The
loaders' ``ShardSet`` reads its indexes this way at start (every rank: ImageNet's 1.28M samples took 5 s per
rank sample by sample)."""
from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from data_prep import format as fmt
from data_prep.format import INDEX_VERSION, ManifestError, read_index, write_index
from data_prep.index_arrays import index_arrays
from pipeline.data.shards import ShardSet


def _regular(rng: random.Random, n: int, exts=("jpg", "cls", "lbl")) -> list[list[tuple[str, int, int, str]]]:
    samples, off = [], 0
    for i in range(n):
        members = []
        for ext in exts:
            size = rng.randrange(0, 10 ** rng.randrange(1, 12))
            members.append((ext, off + 512, size, f"s{i:06d}.{ext}"))
            off += 512 + size + (-size) % 512
        samples.append(members)
    return samples


def _same_as_read_index(path) -> bool:
    """index_arrays gives read_index's numbers, or declines; returns whether it parsed the file."""
    parsed = index_arrays(path)
    if parsed is None:
        return False
    count, columns = parsed
    entries = read_index(path)  # an index index_arrays takes is one read_index takes
    assert count == len(entries)
    for ext, (offsets, sizes) in columns.items():
        assert offsets.dtype == np.int64 and sizes.dtype == np.int64
        assert [(int(o), int(s)) for o, s in zip(offsets, sizes)] == [e[ext] for e in entries]
    assert all(set(e) == set(columns) for e in entries)
    return True


def test_regular_indexes_are_parsed_with_read_indexs_numbers(tmp_path):
    rng = random.Random(0)
    for k, exts in enumerate([("jpg", "cls", "lbl"), ("cls", "jpg", "lbl"), ("jpg",), ("jpg", "lbl", "json", "x")]):
        for n in (1, 2, 7, 300):
            path = tmp_path / f"{k}-{n}.idx"
            write_index(path, _regular(rng, n, exts))
            assert _same_as_read_index(path), path.read_text()[:300]
    count, columns = index_arrays(path, offsets=("jpg",), sizes=())
    assert columns["jpg"][1] is None and columns["lbl"] == (None, None) and count == 300


@pytest.mark.parametrize("mutation", range(400))
def test_any_other_index_gets_read_indexs_numbers_or_none(tmp_path, mutation):
    """Damaged and unusual indexes: whatever index_arrays accepts, read_index reads alike (a byte changed,
    inserted or removed; a line dropped or doubled; members in another order on one line)."""
    rng = random.Random(mutation)
    path = tmp_path / "a.idx"
    write_index(path, _regular(rng, rng.randrange(1, 6)))
    data = bytearray(path.read_bytes())
    special = [b"\r", b"\n", b" ", b"  ", b"x", b"-", b"+", b"_", b"0", b"9", "\u0663".encode(), b"\x85", b"\t",
               b"\x0c", b"jpg", b"lbl", b"99999999999999999999"]
    for _ in range(rng.randrange(1, 3)):
        at = rng.randrange(len(data) + 1)
        how = rng.randrange(4)
        if how == 0:
            data[at:at + rng.randrange(1, 3)] = rng.choice(special)
        elif how == 1:
            data[at:at] = rng.choice(special)
        elif how == 2:
            del data[at:at + rng.randrange(1, 4)]
        else:
            lines = bytes(data).split(b"\n")
            i = rng.randrange(1, len(lines))
            choice = rng.randrange(3)
            if choice == 0:
                lines.insert(i, lines[i])
            elif choice == 1:
                del lines[i]
            else:
                words = lines[i].split(b" ")
                groups = [words[g:g + 4] for g in range(0, len(words), 4)]
                rng.shuffle(groups)
                lines[i] = b" ".join(w for g in groups for w in g)
            data = bytearray(b"\n".join(lines))
    path.write_bytes(bytes(data))
    try:
        read_index(path)
    except ManifestError:
        assert index_arrays(path) is None
        return
    _same_as_read_index(path)


def test_irregular_but_valid_indexes_are_left_to_read_index(tmp_path):
    lines = [f"{INDEX_VERSION} 2\n", "jpg 512 10 a.jpg lbl 1024 4 a.lbl\n"]
    cases = {
        "other order": lines + ["lbl 2048 4 b.lbl jpg 1536 10 b.jpg\n"],
        "no final newline": lines + ["jpg 1536 10 b.jpg lbl 2048 4 b.lbl"],
        "crlf": [s.replace("\n", "\r\n") for s in lines + ["jpg 1536 10 b.jpg lbl 2048 4 b.lbl\n"]],
        "a member twice": lines + ["jpg 1536 10 b.jpg jpg 2048 4 b.lbl\n"],
        "fewer members": lines + ["jpg 1536 10 b.jpg\n"],
        "20 digits": lines + ["jpg 1536 10 b.jpg lbl 10000000000000000000 4 b.lbl\n"],
        "non-ascii name": lines + ["jpg 1536 10 b\u00e9.jpg lbl 2048 4 b.lbl\n"],
    }
    for name, text in cases.items():
        path = tmp_path / "x.idx"
        path.write_bytes("".join(text).encode())
        assert index_arrays(path) is None, name
        read_index(path)  # valid all the same: read_index (and so ShardSet) reads it
    (tmp_path / "missing.idx").unlink(missing_ok=True)
    assert index_arrays(tmp_path / "missing.idx") is None


def _without_columns(digits_shards, copy):
    """A copy of the shards whose manifest lists no columns file (as a finalize of before 2026-12-05 wrote it):
    ShardSet reads the indexes."""
    import json

    shutil.copytree(digits_shards, copy)
    path = copy / fmt.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for entry in manifest["splits"].values():
        del entry["columns"]
    path.write_text(json.dumps(manifest))
    return copy


def test_shard_set_reads_regular_indexes_without_read_index(digits_shards, tmp_path, monkeypatch):
    """Read from the indexes (no columns file), ShardSet's columns are the ones read_index gives, and at start
    it makes no object per sample for an index data_prep wrote (read_index is not called); an index it declines
    still loads through read_index, and a broken one still fails naming the line."""
    from pipeline.errors import ConfigError

    indexes = _without_columns(digits_shards, tmp_path / "indexes")
    expected = ShardSet(indexes, "train")
    assert "before 2026-12-05" in expected.columns_fallback
    want_offsets, want_sizes, want_labels = [], [], []
    for p in expected._index_paths:
        for e in read_index(p):
            want_offsets.append(e["jpg"][0])
            want_sizes.append(e["jpg"][1])
            want_labels.append(e["lbl"][0])
    assert expected.offsets.tolist() == want_offsets and expected.sizes.tolist() == want_sizes
    assert expected.label_offsets.tolist() == want_labels
    assert expected.shard_of.dtype == np.int32
    assert expected.shard_of.tolist() == [i for i, n in enumerate(expected.shard_sizes) for _ in range(n)]

    def refused(path):
        raise AssertionError(f"read_index({path}) at start")

    import data_prep.columns_file as columns_module

    monkeypatch.setattr(columns_module, "read_index", refused)
    fast = ShardSet(indexes, "train")
    monkeypatch.undo()
    for name in ("shard_of", "offsets", "sizes", "label_offsets", "shard_sizes"):
        got, want = getattr(fast, name), getattr(expected, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name

    copy = indexes
    idx = copy / fmt.index_of_entry(fmt.load_manifest(copy)["splits"]["train"]["shards"][0])
    text = idx.read_text()
    idx.write_bytes(text.replace("\n", "\r\n").encode())  # valid, not regular: read through read_index
    crlf = ShardSet(copy, "train")
    assert np.array_equal(crlf.offsets, expected.offsets) and np.array_equal(crlf.label_offsets, expected.label_offsets)
    head, first, rest = text.split("\n", 2)
    idx.write_text(head + "\n" + first.replace(" ", " x", 1) + "\n" + rest)
    with pytest.raises(ConfigError, match=f"{idx}:2: "):
        ShardSet(copy, "train")


def test_shard_set_says_which_regular_index_disagrees_with_the_manifest(digits_shards, tmp_path):
    from pipeline.errors import ConfigError

    copy = _without_columns(digits_shards, tmp_path / "copy")
    entry = fmt.load_manifest(copy)["splits"]["train"]["shards"][0]
    idx = copy / fmt.index_of_entry(entry)
    entries = read_index(idx)
    rows = [[(ext, *where, f"s{i}.{ext}") for ext, where in e.items()] for i, e in enumerate(entries)]
    write_index(idx, rows[:-1])
    with pytest.raises(ConfigError, match=f"index '{idx}' lists {len(rows) - 1} samples, manifest says {len(rows)}"):
        ShardSet(copy, "train")
    write_index(idx, [[m for m in r if m[0] != "lbl"] for r in rows])
    with pytest.raises(ConfigError, match=f"index '{idx}' has a sample without 'jpg' or 'lbl'"):
        ShardSet(copy, "train")


def test_a_manifest_count_no_shard_can_hold_is_named_before_any_array_is_sized(digits_shards, tmp_path):
    """The arrays are sized from the manifest's counts before the indexes are read: a count edited to 10**13
    (with the split's total to match) was `MemoryError: Unable to allocate 72.8 TiB`. Now the manifest's
    check names the field, as for any count of the wrong shape (data_prep.manifest_shape)."""
    import json

    from pipeline.errors import ConfigError

    for bad in (10 ** 13, 1_000_000):
        copy = tmp_path / f"copy{bad}"
        shutil.copytree(digits_shards, copy)
        path = copy / fmt.MANIFEST_NAME
        manifest = json.loads(path.read_text())
        split = manifest["splits"]["train"]
        shard = split["shards"][0]
        split["samples"] += bad - shard["samples"]
        shard["samples"] = bad
        path.write_text(json.dumps(manifest))
        with pytest.raises(ConfigError, match=rf"{path}: manifest field 'splits.train.shards\[0\].samples' is {bad}, "
                                              rf"more than its {shard['bytes']} bytes can hold .*data_prep finalize"):
            ShardSet(copy, "train")

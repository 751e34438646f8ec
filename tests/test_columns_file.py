"""A split's columns file (data_prep/columns_file.py): finalize writes it, ShardSet reads it instead of every
index, and one that is not the recorded file (or not the indexes' numbers) is never used as it is."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import data_prep.columns_file as columns_module
from data_prep import format as fmt
from data_prep.columns_file import columns_bytes, columns_entry, columns_of_indexes
from data_prep.manifest import finalize
from data_prep.verify import verify
from pipeline.data.shards import ShardSet
from pipeline.errors import ConfigError


def _manifest(root):
    return json.loads((root / fmt.MANIFEST_NAME).read_text())


def test_finalize_writes_the_columns_and_a_rank_reads_no_index(digits_shards, monkeypatch):
    """The file holds the indexes' numbers (read_index's, sample by sample), the manifest records it, and
    ShardSet reads it alone: no index is opened at start."""
    entry = _manifest(digits_shards)["splits"]["train"]
    assert entry["columns"]["name"] == "train.columns.npy"
    want = [[], [], []]
    for shard in entry["shards"]:
        for e in fmt.read_index(digits_shards / shard["index"]):
            want[0].append(e["jpg"][0])
            want[1].append(e["jpg"][1])
            want[2].append(e["lbl"][0])
    data = (digits_shards / "train.columns.npy").read_bytes()
    assert columns_entry("train.columns.npy", data) == entry["columns"]
    assert np.load(digits_shards / "train.columns.npy").tolist() == want

    def refused(*args):
        raise AssertionError(f"an index read at start: {args}")

    monkeypatch.setattr(columns_module, "shard_columns", refused)
    monkeypatch.setattr(columns_module, "read_index", refused)
    shards = ShardSet(digits_shards, "train")
    assert shards.columns_fallback == ""
    assert [shards.offsets.tolist(), shards.sizes.tolist(), shards.label_offsets.tolist()] == want
    assert shards.read_label(len(shards) - 1) == int(shards.labels()[-1])
    assert shards.read_jpeg(0)[:2] == b"\xff\xd8"


@pytest.mark.parametrize("damage", ["cut short", "same size, other bytes", "missing"])
def test_a_columns_file_that_is_not_the_recorded_one_is_not_used(digits_shards, tmp_path, damage):
    """The loaders read the indexes then (the same numbers), say why, and verify names the file; finalize
    writes it again."""
    copy = tmp_path / "copy"
    shutil.copytree(digits_shards, copy)
    expected = ShardSet(digits_shards, "train")
    path = copy / "train.columns.npy"
    data = path.read_bytes()
    if damage == "cut short":
        path.write_bytes(data[:-8])
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(data[:-8] + (7).to_bytes(8, "little"))
    shards = ShardSet(copy, "train")
    assert str(path) in shards.columns_fallback
    for name in ("offsets", "sizes", "label_offsets"):
        assert np.array_equal(getattr(shards, name), getattr(expected, name)), name
    problems = verify(copy, decode=0)
    assert len(problems) == 1 and problems[0].startswith("train: columns file ") and str(path) in problems[0]
    assert "data_prep finalize" in problems[0]
    finalize(copy)
    assert path.read_bytes() == data and verify(copy, decode=0) == []


def test_verify_names_a_recorded_columns_file_that_differs_from_the_indexes(digits_shards, tmp_path):
    """A columns file whose size and sha256 the manifest records but whose numbers are not the indexes' (written
    by hand, or an index rebuilt without finalize) is named with the first shard where they differ."""
    copy = tmp_path / "copy"
    shutil.copytree(digits_shards, copy)
    manifest = _manifest(copy)
    entry = manifest["splits"]["train"]
    columns = columns_of_indexes(copy, entry["shards"])
    first = entry["shards"][0]["samples"]
    columns[0, first + 3] += 512  # a sample of the second shard
    data = columns_bytes(columns)
    (copy / "train.columns.npy").write_bytes(data)
    entry["columns"] = columns_entry("train.columns.npy", data)
    (copy / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    problems = verify(copy, decode=0)
    assert problems == [f"train: columns file 'train.columns.npy' differs from the indexes at 1 sample, first in "
                        f"shard {entry['shards'][1]['name']!r} (the loaders would read the wrong bytes); "
                        f"`python -m data_prep finalize {copy}` writes it again from the indexes"]


def test_a_columns_field_of_the_wrong_shape_is_named(digits_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(digits_shards, copy)
    manifest = _manifest(copy)
    manifest["splits"]["val"]["columns"]["bytes"] = "12"
    (copy / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"manifest field 'splits.val.columns.bytes' is \"12\", not a count"):
        ShardSet(copy, "val")


def test_rank_zero_alone_says_the_loaders_read_the_indexes(digits_shards, tmp_path, caplog):
    """A split of several shards without its columns file: the first rank names the fallback and the fix
    once per split it opens; the other ranks (1,024 of them on a big job) say nothing; a split with the file
    and a one-shard split (its one index is as cheap as the file) say nothing."""
    from types import SimpleNamespace

    from pipeline.datamodule import ShardDataModule

    def warnings_of(root, rank_zero: bool | None) -> list[str]:
        caplog.clear()
        dm = ShardDataModule(str(root), backend="cpu", batch_size=8, num_workers=0)
        if rank_zero is not None:  # None: no trainer yet (the CLI's checks before the loggers start)
            dm.trainer = SimpleNamespace(is_global_zero=rank_zero)
        with caplog.at_level("WARNING", logger="pipeline.datamodule"):
            assert len(dm.train_shards) == len(ShardSet(digits_shards, "train"))
            assert len(dm.val_shards) == len(ShardSet(digits_shards, "val"))
        return [r.getMessage() for r in caplog.records if r.name == "pipeline.datamodule"]

    assert len(ShardSet(digits_shards, "train").shard_names) > 1 and len(ShardSet(digits_shards, "val").shard_names) == 1
    assert warnings_of(digits_shards, True) == []
    copy = tmp_path / "copy"
    shutil.copytree(digits_shards, copy)
    (copy / "train.columns.npy").unlink()
    (copy / "val.columns.npy").unlink()
    for rank_zero in (True, None):
        said = warnings_of(copy, rank_zero)
        assert len(said) == 1, said  # train's (3 shards), not val's (1 shard)
        assert said[0].startswith("data.root: read the 3 indexes of split 'train', not its columns file: ")
        assert str(copy / "train.columns.npy") in said[0] and f"python -m data_prep finalize {copy}`" in said[0]
    assert warnings_of(copy, False) == []


def test_a_damaged_index_is_blamed_and_finalize_does_not_copy_it_into_the_columns(digits_shards, tmp_path):
    """An index edited in place (one JPEG size, the sample count kept) beside the recorded columns file: verify
    blamed the columns file ("the loaders would read the wrong bytes"; they read the right ones through it) and
    advised finalize, which wrote the columns again from the damaged index: the loaders then read a cut-short
    JPEG. Verify blames the index, and says how to rebuild its shard; finalize refuses an index that is not the
    one its shard's record hashed; the prep command rebuilds the shard, after which all is sound."""
    from data_prep.errors import PrepError
    from tests.conftest import run_module

    copy = tmp_path / "shards"
    shutil.copytree(digits_shards, copy)
    shard = _manifest(copy)["splits"]["train"]["shards"][1]
    idx = copy / shard["index"]
    lines = idx.read_text().splitlines(keepends=True)
    fields = lines[1].split(" ")
    fields[2] = str(int(fields[2]) - 67)  # the first sample's jpg size
    lines[1] = " ".join(fields)
    idx.write_text("".join(lines))
    columns = (copy / "train.columns.npy").read_bytes()

    problems = verify(copy, decode=0)
    assert not [p for p in problems if "columns file" in p], problems
    assert [p for p in problems if f"index {shard['index']} does not match the tar's members from line 2" in p
            and "rerun the split's prep command" in p], problems
    with pytest.raises(PrepError, match=rf"1 index changed since its shard was built .*: {shard['index']}; rerun "
                                        r"the split's prep command to rebuild it"):
        finalize(copy)
    assert (copy / "train.columns.npy").read_bytes() == columns
    assert ShardSet(copy, "train").read_jpeg(_first_id(copy, 1))[-2:] == b"\xff\xd9"  # the loaders: whole JPEG

    rerun = run_module("data_prep", "imagefolder", str(digits_shards.parent / "images" / "train"), str(copy),
                       "--split", "train", "--samples-per-shard", "500", "--workers", "1")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert verify(copy, decode=0) == []
    assert idx.read_bytes() == (digits_shards / shard["index"]).read_bytes()


def _first_id(root, shard_number: int) -> int:
    """The sample id of the first sample of the split's shard ``shard_number``."""
    return sum(s["samples"] for s in _manifest(root)["splits"]["train"]["shards"][:shard_number])

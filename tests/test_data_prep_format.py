"""data_prep.format: the manifest/index contract the loaders rely on."""
import json
import subprocess
import sys

import pytest

from data_prep.format import (MANIFEST_NAME, WORK_DIR, ManifestError, load_manifest, index_paths, read_index, shard_paths,
                              write_index)


def test_load_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(ManifestError, match=str(tmp_path / MANIFEST_NAME) + ".*not found"):
        load_manifest(tmp_path)
    (tmp_path / WORK_DIR).mkdir()  # array tasks wrote shards, nobody ran finalize: say so (and how)
    with pytest.raises(ManifestError, match=f"data_prep has not finished .*`python -m data_prep finalize {tmp_path}`"):
        load_manifest(tmp_path)
    from pipeline.data.shards import ShardSet
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^data.root: {tmp_path / MANIFEST_NAME}: manifest not found: data_prep"):
        ShardSet(tmp_path, "train")
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="manifest is not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"version": 7, "classes": [], "splits": {}}))
    with pytest.raises(ManifestError, match="version 7"):
        load_manifest(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"version": 1, "classes": ["a"], "splits": {
        "train": {"samples": 3, "shards": [{"name": "train-000000.tar", "index": "train-000000.idx", "samples": 3,
                                             "bytes": 30720, "sha256": "0" * 64}]}}}))
    m = load_manifest(tmp_path)
    assert shard_paths(tmp_path, m, "train") == [tmp_path / "train-000000.tar"]
    with pytest.raises(ManifestError, match="no split 'val'"):
        shard_paths(tmp_path, m, "val")
    del m["splits"]["train"]["shards"][0]["index"]  # an entry without one: the name the loaders and verify read
    assert index_paths(tmp_path, m, "train") == [tmp_path / "train-000000.idx"]


def test_index_roundtrip_and_bad_header(tmp_path):
    samples = [[("jpg", 512, 900, "k_0.jpg"), ("cls", 2048, 1, "k_0.cls")], [("jpg", 3072, 5, "k_1.jpg")]]
    write_index(tmp_path / "a.idx", samples)
    assert (tmp_path / "a.idx").read_text() == "v1.2 2\njpg 512 900 k_0.jpg cls 2048 1 k_0.cls\njpg 3072 5 k_1.jpg\n"
    assert read_index(tmp_path / "a.idx") == [{"jpg": (512, 900), "cls": (2048, 1)}, {"jpg": (3072, 5)}]
    (tmp_path / "b.idx").write_text("v1.1 1\njpg 1 2 x.jpg\n")
    with pytest.raises(ManifestError, match="b.idx.*bad index header"):
        read_index(tmp_path / "b.idx")
    (tmp_path / "c.idx").write_text("v1.2 3\njpg 1 2 x.jpg\n")
    with pytest.raises(ManifestError, match="header says 3"):
        read_index(tmp_path / "c.idx")


def test_format_module_stays_light():
    code = "import sys, data_prep.format; bad = {'PIL','numpy','torch','nvidia.dali'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

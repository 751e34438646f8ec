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


def _run_hint(hint: str, out) -> None:
    """Run each command of a hint (backquoted) with OUT filled in, as a user would copy it."""
    import re
    import shlex

    from tests.conftest import run_module

    commands = re.findall(r"`python -m (data_prep [^`]+)`", hint)
    assert commands, hint
    for command in commands:
        argv = [str(out) if a == "OUT" else a for a in shlex.split(command)]
        run_module(*argv, "--no-progress")


def test_a_folder_of_images_instead_of_shards_is_told_the_command_that_shards_it(tmp_path):
    """data.root (or verify) pointed at the images: "run `python -m data_prep ...` first" left the user to work
    out which command; the hint names it for each layout data_prep reads, and the command it names works."""
    from pipeline.data.shards import ShardSet
    from pipeline.errors import ConfigError
    from tests.fixtures_images import build_imagenet, write_imagefolder

    classes = tmp_path / "my photos"  # a space: the command is quoted for the shell
    write_imagefolder(classes, ["cat", "dog"], 2)
    with pytest.raises(ConfigError) as e:
        ShardSet(classes, "train")
    said = str(e.value)
    assert said.startswith(f"data.root: {classes / MANIFEST_NAME}: manifest not found ({classes} is not data_prep's "
                           f"output: it holds a folder of images per class: shard it with `python -m data_prep "
                           f"imagefolder '{classes}' OUT --split train`)"), said
    _run_hint(said, tmp_path / "out1")
    assert load_manifest(tmp_path / "out1")["splits"]["train"]["samples"] == 4

    splits = tmp_path / "splits"
    for split, seed in (("train", 0), ("val", 1)):
        write_imagefolder(splits / split, ["cat", "dog"], 2, seed=seed)
    with pytest.raises(ManifestError) as e:
        load_manifest(splits)
    said = str(e.value)
    assert (f"it holds a folder of classes per split: shard them into one OUT with `python -m data_prep imagefolder "
            f"{splits / 'train'} OUT --split train` and `python -m data_prep imagefolder {splits / 'val'} OUT --split "
            f"val`") in said, said
    _run_hint(said, tmp_path / "out2")
    assert sorted(load_manifest(tmp_path / "out2")["splits"]) == ["train", "val"]

    for extracted in (False, True):
        imagenet = tmp_path / f"imagenet-{extracted}"
        imagenet.mkdir()
        build_imagenet(imagenet, per_class=1, n_val=2, extracted=extracted)
        with pytest.raises(ManifestError) as e:
            load_manifest(imagenet)
        said = str(e.value)
        what = "an extracted ImageNet: shard it" if extracted else "ImageNet's archives: shard them"
        assert f"it holds {what} with `python -m data_prep imagenet {imagenet} OUT`" in said, said
    _run_hint(said, tmp_path / "out3")
    assert sorted(load_manifest(tmp_path / "out3")["splits"]) == ["train", "val"]

    # one level too high: the folder that holds data_prep's output (`make demo`'s data/demo, not data/demo/shards)
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path)
    outs = ", ".join(str(tmp_path / f"out{i}") for i in (1, 2, 3))
    assert str(e.value).endswith(f"({tmp_path} is not data_prep's output: its subfolders {outs} are (use one of "
                                 f"them))"), str(e.value)
    (tmp_path / "demo").mkdir()
    (tmp_path / "out3").rename(tmp_path / "demo" / "shards")
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path / "demo")
    assert str(e.value).endswith(f"its subfolder {tmp_path / 'demo' / 'shards'} is (use that folder))"), str(e.value)

    # nothing data_prep reads: the general line (an empty folder, shards copied without their manifest.json)
    copied = tmp_path / "copied"
    copied.mkdir()
    for shard in (tmp_path / "out1").glob("train-*"):
        (copied / shard.name).write_bytes(shard.read_bytes())
    assert len(list(copied.iterdir())) >= 2
    for folder in (tmp_path / "empty", copied):
        folder.mkdir(exist_ok=True)
        with pytest.raises(ManifestError, match=r"manifest not found \(run `python -m data_prep \.\.\.` first\)$"):
            load_manifest(folder)

"""--holdout: a seeded, stratified hold-out split carved out of a split's scanned inputs (45k/5k CIFAR-10)."""
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from data_prep.cli import check_arguments, main
from data_prep.errors import PrepError
from data_prep.format import load_manifest
from data_prep.holdout import quotas
from tests.fixtures_images import build_imagenet, write_imagefolder
from tests.test_data_prep_resume import outputs

CLASSES = ["a", "b", "c", "d"]
# a:12, b:12 + one file that is no image, c:6, d:9 = 40 inputs; 10 held out: shares 3, 3.25, 1.5, 2.25, so
# floors 3, 3, 1, 2 (9) and the one left goes to the largest remainder, c
EXPECTED = {"a": 3, "b": 3, "c": 2, "d": 2}
COMMON = ["--holdout", "10", "--holdout-split", "val", "--samples-per-shard", "3", "--workers", "1",
          "--no-progress"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    write_imagefolder(root, CLASSES, per_class=12)
    for cls, keep in (("c", 6), ("d", 9)):
        for i in range(keep, 12):
            (root / cls / f"{cls}_{i}.jpg").unlink()
    (root / "b" / "b_broken.jpg").write_bytes(b"this is not an image at all")  # rejected when its shard is built
    (root / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # a scan reject: never a candidate
    return root


def inputs_of(root: Path) -> set[str]:
    """Every file under the tree (what the run must account for: a sample, or a reject)."""
    return {str(p) for p in root.rglob("*") if p.is_file()}


def sources(out: Path, split: str) -> dict[str, str]:
    """key -> source path of every written sample of `split` (from the shards' done-records)."""
    m = load_manifest(out)
    found = {}
    for shard in m["splits"][split]["shards"]:
        rec = json.loads((out / ".work" / split / f"{shard['name']}.json").read_text())
        found.update(dict(rec["sources"]))
    return found


def rejects(out: Path, split: str) -> set[str]:
    lines = (out / "rejects.jsonl").read_text().splitlines()
    return {r["path"] for r in map(json.loads, lines) if r["split"] == split}


def labels(out: Path, split: str) -> dict[str, int]:
    """key -> label as stored in the shards (``KEY.cls``)."""
    m = load_manifest(out)
    got = {}
    for shard in m["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            for member in tf:
                if member.name.endswith(".cls"):
                    got[member.name[:-4]] = int(tf.extractfile(member).read())
    return got


def held_paths(out: Path) -> set[str]:
    """The inputs of the held-out split: written, or rejected while building its shards."""
    return set(sources(out, "val").values()) | rejects(out, "val")


def run(src: Path, out: Path, *args: str) -> int:
    return main(["imagefolder", str(src), str(out), "--split", "train", *args])


def test_holdout_is_disjoint_complete_and_stratified(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tree, out, *COMMON) == 0
    assert "train: holding out 10 of its 40 images (stratified per class, --seed 0) as split 'val'" in \
        capsys.readouterr().err
    train, val = sources(out, "train"), sources(out, "val")
    assert not set(train) & set(val) and not set(train.values()) & set(val.values())
    numbers = sorted(int(k.split("_")[1]) for k in [*train, *val])  # key numbers: positions among all 40 inputs
    assert len(numbers) == len(set(numbers)) and set(numbers) <= set(range(40))
    every = set(train.values()) | set(val.values()) | rejects(out, "train") | rejects(out, "val")
    assert every == inputs_of(tree)
    assert len(train) + len(val) == 39 and len(rejects(out, "train") | rejects(out, "val")) == 2
    assert str(tree / "a" / ".DS_Store") in rejects(out, "train")  # scan rejects stay with the split
    per_class = {c: sum(Path(p).parent.name == c for p in held_paths(out)) for c in CLASSES}
    assert per_class == EXPECTED
    for split, found in (("train", train), ("val", val)):
        assert labels(out, split) == {k: CLASSES.index(Path(p).parent.name) for k, p in found.items()}
    m = load_manifest(out)
    record = {"size": 10, "count": 10, "of": 40, "seed": 0, "split": "train", "holdout_split": "val"}
    for split in ("train", "val"):
        entry = m["splits"][split]
        assert entry["options"]["holdout"] == record
        assert entry["source"] == str(tree.resolve())
        assert entry["samples"] + entry["rejected"] == (31 if split == "train" else 10)
    assert main(["verify", str(out)]) == 0


def test_quotas_add_up_exactly_and_round_each_share():
    rng = random.Random(5)
    for _ in range(300):
        counts = [rng.randint(1, 60) for _ in range(rng.randint(1, 12))]
        n = rng.randint(1, sum(counts) - 1) if sum(counts) > 1 else 1
        got = quotas(counts, n)
        assert sum(got) == n
        for q, c in zip(got, counts):
            assert n * c // sum(counts) <= q <= -(-n * c // sum(counts))  # floor or ceil of the exact share
    assert quotas([5000] * 10, 5000) == [500] * 10  # CIFAR-10: 45k/5k, 500 per class
    assert quotas([12, 13, 6, 9], 10) == [3, 3, 2, 2]


def test_same_seed_same_holdout_other_seed_another(tree, tmp_path):
    assert run(tree, tmp_path / "one", *COMMON) == 0
    # the shard plan does not enter the choice: another shard size holds out the same images
    assert run(tree, tmp_path / "two", *COMMON, "--samples-per-shard", "5") == 0
    assert run(tree, tmp_path / "seeded", *COMMON, "--seed", "1") == 0
    first = held_paths(tmp_path / "one")
    assert held_paths(tmp_path / "two") == first
    other = held_paths(tmp_path / "seeded")
    assert other != first
    assert {c: sum(Path(p).parent.name == c for p in other) for c in CLASSES} == EXPECTED
    # a file keeps its key number whichever side it lands on
    keys = {**sources(tmp_path / "one", "train"), **sources(tmp_path / "one", "val")}
    keys_seeded = {**sources(tmp_path / "seeded", "train"), **sources(tmp_path / "seeded", "val")}
    assert {k.split("_")[1]: p for k, p in keys.items()} == {k.split("_")[1]: p for k, p in keys_seeded.items()}


def test_a_fraction_holds_out_that_share(tree, tmp_path):
    out = tmp_path / "out"
    assert run(tree, out, *COMMON, "--holdout", "0.25") == 0
    assert load_manifest(out)["splits"]["val"]["options"]["holdout"]["size"] == 0.25
    assert load_manifest(out)["splits"]["val"]["options"]["holdout"]["count"] == 10
    assert {c: sum(Path(p).parent.name == c for p in held_paths(out)) for c in CLASSES} == EXPECTED


@pytest.mark.parametrize("held", ["val", "minival"])  # after train and before it: rejects.jsonl is in split order
def test_array_tasks_then_finalize_equal_a_single_run(tree, tmp_path, capsys, held):
    common = [*COMMON[:2], "--holdout-split", held, *COMMON[4:]]
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    for i in range(4):  # so that the held-out split has a reject too (the seed puts some of these there)
        (src / "a" / f"a_broken{i}.jpg").write_bytes(b"not an image either")
    single = tmp_path / "single"
    assert run(src, single, *common) == 0
    arr = tmp_path / "array"
    for i in (2, 0, 1):
        assert run(src, arr, *common, "--task-index", str(i), "--num-tasks", "3") == 0
        err = capsys.readouterr().err
        listed = ",".join(sorted(["train", held], key=lambda s: s != "train"))
        assert f"after all tasks finish, run `python -m data_prep finalize {arr} --splits {listed}`" in err, err
        assert f"{held} task {i}/3: this task's" in err
    assert not (arr / "manifest.json").exists()
    # launch submit prep's finalize job names only --split: the hold-out comes along
    assert main(["finalize", str(arr), "--splits", "train"]) == 0
    said = capsys.readouterr().out
    assert f"\n{held}: " in said or said.startswith(f"{held}: "), said
    rejected = {r["split"] for r in map(json.loads, (single / "rejects.jsonl").read_text().splitlines())}
    assert rejected == {"train", held}, rejected  # both splits have rejects: their order shows
    assert outputs(arr) == outputs(single)
    assert sorted(load_manifest(arr)["splits"]) == sorted(["train", held])
    # a third split added by another command, then a plain finalize of the whole OUT: the same bytes
    assert main(["imagefolder", str(src), str(single), "--split", "test", *COMMON[4:]]) == 0
    again = tmp_path / "again"
    shutil.copytree(single, again)
    assert main(["finalize", str(again)]) == 0
    assert outputs(again) == outputs(single)


def test_a_rerun_with_the_same_options_keeps_its_shards(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tree, out, *COMMON) == 0
    before = outputs(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    capsys.readouterr()
    assert run(tree, out, *COMMON) == 0
    err = capsys.readouterr().err
    assert "train: 10 of 10 shards were complete from an earlier run and kept, 0 built" in err, err
    assert "val: 4 of 4 shards were complete from an earlier run and kept, 0 built" in err, err
    assert outputs(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps


@pytest.mark.parametrize("change, named", [
    (["--holdout", "11"], "--holdout 10, this run has --holdout 11"),
    (["--holdout", "0.25"], "--holdout 10, this run has --holdout 0.25"),
    (["--seed", "1"], "--seed 0, this run has --seed 1"),
    (["--holdout-split", "minival"], "--holdout-split val, this run has --holdout-split minival"),
])
def test_a_rerun_with_another_holdout_is_refused_by_name(tree, tmp_path, capsys, change, named):
    out = tmp_path / "out"
    assert run(tree, out, *COMMON) == 0
    before = outputs(out)
    capsys.readouterr()
    assert run(tree, out, *COMMON, *change) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m data_prep: error: ") and named in err, err
    assert outputs(out) == before


def test_a_holdout_into_splits_prepared_otherwise_is_refused(tree, tmp_path, capsys):
    plain = tmp_path / "plain"
    assert run(tree, plain, "--samples-per-shard", "5", "--no-progress") == 0
    capsys.readouterr()
    assert run(tree, plain, *COMMON) == 2  # the whole of train was prepared: val would overlap it
    assert "split 'train' was prepared without --holdout" in capsys.readouterr().err
    carved = tmp_path / "carved"
    assert run(tree, carved, *COMMON) == 0
    capsys.readouterr()
    assert run(tree, carved, "--samples-per-shard", "3", "--no-progress") == 2  # train again, all of it
    err = capsys.readouterr().err
    assert "split 'train' was prepared as part of a hold-out (--holdout 10 --holdout-split val --split train " \
           "--seed 0)" in err and "overlap split 'val'" in err, err
    assert main(["imagefolder", str(tree), str(carved), "--split", "val", "--no-progress"]) == 2  # val from elsewhere
    assert "split 'val' was prepared as part of a hold-out" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--holdout", "0", "--holdout-split", "val"], "--holdout 0: must be a positive count"),
    (["--holdout", "-3", "--holdout-split", "val"], "--holdout -3: must be a positive count"),
    (["--holdout", "1.5", "--holdout-split", "val"], "--holdout 1.5: a fraction of the images must lie strictly"),
    (["--holdout", "0.0", "--holdout-split", "val"], "--holdout 0.0: a fraction"),
    (["--holdout", "lots", "--holdout-split", "val"], "--holdout 'lots': expected a count of images"),
    (["--holdout", "1e3", "--holdout-split", "val"], "--holdout '1e3': expected a count of images"),
    (["--holdout", "10"], "--holdout needs --holdout-split NAME"),
    (["--holdout-split", "val"], "--holdout-split val: needs --holdout N"),
    (["--holdout", "10", "--holdout-split", "train"], "--holdout-split 'train' is the split it is carved out of"),
    (["--holdout", "10", "--holdout-split", "Train"], "--holdout-split 'Train' is the split it is carved out of"),
    (["--holdout", "10", "--holdout-split", "va/l"], "--holdout-split 'va/l': use letters, digits"),
])
def test_bad_values_are_refused_before_anything_is_read(tree, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert run(tree, out, *args, "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()
    with pytest.raises(PrepError, match=message.replace("(", r"\(").replace("+", r"\+")):
        check_arguments(["imagefolder", str(tree), str(out), "--split", "train", *args])  # launch submit prep's check


@pytest.mark.parametrize("size, message", [
    ("40", "--holdout 40: split 'train' has 40 images, so holding out 40 would leave none for it"),
    ("41", "--holdout 41: split 'train' has 40 images"),
    ("0.001", "--holdout 0.001: that fraction of the 40 images of split 'train' is no image"),
])
def test_a_holdout_of_all_or_no_images_is_refused(tree, tmp_path, capsys, size, message):
    out = tmp_path / "out"
    assert run(tree, out, "--holdout", size, "--holdout-split", "val", "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_class_too_small_for_its_share_is_refused(tmp_path, capsys):
    root = tmp_path / "src"
    write_imagefolder(root, ["many", "one"], per_class=10)
    for i in range(1, 10):
        (root / "one" / f"one_{i}.jpg").unlink()
    out = tmp_path / "out"
    # 6 of 11: shares 5.45 and 0.55; the larger remainder gives 'one' its only image
    assert run(root, out, "--holdout", "6", "--holdout-split", "val", "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--holdout 6: class 'one' has 1 image and its share of the hold-out is 1, " \
                                      "which would leave none of it in split 'train'" in err, err
    assert not out.exists()
    assert run(root, out, "--holdout", "5", "--holdout-split", "val", "--no-progress") == 0
    assert load_manifest(out)["splits"]["val"]["samples"] == 5  # all from 'many': 'one' keeps its image


def test_imagenet_minival_out_of_train(tmp_path, capsys):
    root = tmp_path / "ilsvrc"
    exp = build_imagenet(root)  # 4 classes x 6 train images, 12 val
    out = tmp_path / "out"
    assert main(["imagenet", str(root), str(out), "--holdout", "8", "--holdout-split", "minival",
                 "--samples-per-shard", "5", "--no-progress"]) == 0
    m = load_manifest(out)
    assert sorted(m["splits"]) == ["minival", "train", "val"]
    assert (m["splits"]["train"]["samples"], m["splits"]["minival"]["samples"], m["splits"]["val"]["samples"]) == \
        (16, 8, 12)
    train, minival = sources(out, "train"), sources(out, "minival")
    assert not set(train.values()) & set(minival.values())
    assert sorted(labels(out, "minival").values()) == [0, 0, 1, 1, 2, 2, 3, 3]  # 2 of every class's 6
    held = labels(out, "minival")
    assert all(exp["wnids"][held[k]] in Path(path).name for k, path in minival.items())  # n01440764_3.JPEG
    assert m["splits"]["minival"]["source"] == m["splits"]["train"]["source"]
    assert m["splits"]["minival"]["source"].endswith("ILSVRC2012_img_train.tar")
    assert "holdout" not in m["splits"]["val"]["options"]
    # the official val is untouched by the hold-out: the same shards as a run without one
    plain = tmp_path / "plain"
    assert main(["imagenet", str(root), str(plain), "--splits", "val", "--samples-per-shard", "5",
                 "--no-progress"]) == 0
    assert {n: b for n, b in outputs(plain).items() if n.startswith("val-")} == \
        {n: b for n, b in outputs(out).items() if n.startswith("val-")}
    capsys.readouterr()
    assert main(["imagenet", str(root), str(tmp_path / "o2"), "--holdout", "8", "--holdout-split", "val"]) == 2
    assert "--holdout-split 'val': is ImageNet's own val split" in capsys.readouterr().err
    assert main(["imagenet", str(root), str(tmp_path / "o3"), "--splits", "val", "--holdout", "8",
                 "--holdout-split", "minival"]) == 2
    assert "carved out of train, which --splits val does not prepare" in capsys.readouterr().err


def test_the_name_a_refusal_suggests_is_one_it_would_take():
    """It suggested val for a hold-out carved out of val, and for ImageNet, whose val is its own split."""
    from data_prep.holdout import check_names

    imagenet = {"val": "is ImageNet's own val split"}
    for split, given, reserved, suggested in (("train", "Train", None, "val"), ("val", "VAL", None, "minival"),
                                              ("train", None, imagenet, "minival"), ("train", None, None, "val")):
        with pytest.raises(PrepError, match=rf"\(?e\.g\. {suggested}\)?$"):
            check_names(split, given, reserved)
        check_names(split, suggested, reserved)  # taken

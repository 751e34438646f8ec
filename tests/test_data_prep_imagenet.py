"""python -m data_prep imagenet: original archives (nested tars, devkit meta.mat, Kaggle CSV) and folders."""
import io
import shutil
import struct
import tarfile
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.format import load_manifest
from tests.fixtures_images import WORDS, build_imagenet
from tests.test_data_prep_imagefolder import samples_of


def check_labels(out: Path, split: str, expected: dict, wnids: list[str]) -> None:
    """Every written sample carries the sorted-wnid index of its source file's class."""
    by_bytes = {data: w for data, w in expected.values()}
    got = samples_of(out, split)
    assert len(got) == len(expected)
    for s in got:
        label = wnids.index(by_bytes[s["jpg"]])
        assert s["cls"] == str(label).encode() and struct.unpack("<i", s["lbl"])[0] == label


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilsvrc")
    return root, build_imagenet(root)


def test_archives_with_devkit(archives, tmp_path):
    root, exp = archives
    out = tmp_path / "out"
    assert main(["imagenet", str(root), str(out), "--samples-per-shard", "7", "--no-progress"]) == 0
    m = load_manifest(out)
    assert m["classes"] == exp["wnids"] == sorted(WORDS)
    assert m["class_names"] == [WORDS[w] for w in exp["wnids"]]
    assert m["splits"]["train"]["samples"] == 24 and m["splits"]["val"]["samples"] == 12
    assert m["splits"]["train"]["source"].endswith("ILSVRC2012_img_train.tar")
    assert m["source"] == str(root.resolve())  # the root the command was given, where both archives are
    check_labels(out, "train", exp["train"], exp["wnids"])
    check_labels(out, "val", exp["val"], exp["wnids"])
    # the devkit's IDs are in reverse-wnid order: labels must still follow sorted wnids
    assert main(["verify", str(out)]) == 0


def test_archives_with_kaggle_csv_only(archives, tmp_path):
    root, exp = archives
    src = tmp_path / "src"
    src.mkdir()
    for name in ("ILSVRC2012_img_val.tar", "LOC_val_solution.csv"):
        shutil.copy(root / name, src / name)
    out = tmp_path / "out"
    assert main(["imagenet", str(src), str(out), "--splits", "val", "--no-progress"]) == 0
    m = load_manifest(out)
    assert m["classes"] == exp["wnids"] and m["class_names"] == exp["wnids"]
    check_labels(out, "val", exp["val"], exp["wnids"])


def test_a_val_csv_given_labels_val_over_the_devkit_in_src(archives, tmp_path, capsys):
    """``--val-csv`` with the devkit in SRC: the devkit's labels were used and the CSV ignored, without a word
    (a user's own corrected label file had no effect)."""
    root, exp = archives
    src = tmp_path / "src"
    src.mkdir()
    for name in ("ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        shutil.copy(root / name, src / name)
    wnids = exp["wnids"]
    moved = {name: (data, wnids[(wnids.index(w) + 1) % len(wnids)]) for name, (data, w) in exp["val"].items()}
    csv = tmp_path / "labels" / "my_val.csv"
    csv.parent.mkdir()
    csv.write_text("ImageId,PredictionString\n" + "".join(f"{Path(k).stem},{w} 1 2 3 4\n"
                                                           for k, (_, w) in sorted(moved.items())))
    out = tmp_path / "out"
    assert main(["imagenet", str(src), str(out), "--splits", "val", "--val-csv", str(csv), "--no-progress"]) == 0
    assert f"data_prep: val: labels from --val-csv {csv}; the devkit {src / 'ILSVRC2012_devkit_t12.tar.gz'} " \
           "names the classes" in capsys.readouterr().err
    m = load_manifest(out)
    assert m["classes"] == wnids and m["class_names"] == [WORDS[w] for w in wnids]
    check_labels(out, "val", moved, wnids)
    # both in SRC: the devkit labels val, and the line says how the CSV would
    shutil.copy(csv, src / "LOC_val_solution.csv")
    assert main(["imagenet", str(src), str(tmp_path / "out2"), "--splits", "val", "--no-progress"]) == 0
    assert f"labels from the devkit {src / 'ILSVRC2012_devkit_t12.tar.gz'}, not {src / 'LOC_val_solution.csv'} " \
           f"(--val-csv {src / 'LOC_val_solution.csv'} would label val from it)" in capsys.readouterr().err
    check_labels(tmp_path / "out2", "val", exp["val"], wnids)


def test_extracted_layout_flat_and_class_folder_val(tmp_path):
    root = tmp_path / "extracted"
    exp = build_imagenet(root, extracted=True)
    out = tmp_path / "out"
    assert main(["imagenet", str(root), str(out), "--samples-per-shard", "10", "--no-progress"]) == 0
    check_labels(out, "train", exp["train"], exp["wnids"])
    check_labels(out, "val", exp["val"], exp["wnids"])
    # val already sorted into class folders (the common torchvision preparation), no label files
    src2 = tmp_path / "foldered"
    for name, (data, w) in exp["val"].items():
        (src2 / "val" / w).mkdir(parents=True, exist_ok=True)
        (src2 / "val" / w / name).write_bytes(data)
    shutil.copytree(root / "train", src2 / "train")
    out2 = tmp_path / "out2"
    assert main(["imagenet", str(src2), str(out2), "--no-progress"]) == 0
    check_labels(out2, "val", exp["val"], exp["wnids"])
    # val merged into an OUT that already has train: classes agree
    assert main(["imagenet", str(src2), str(out), "--splits", "val", "--devkit",
                 str(root / "ILSVRC2012_devkit_t12.tar.gz"), "--no-progress"]) == 0


def test_flat_val_without_labels_is_a_clear_error(archives, tmp_path, capsys):
    root, exp = archives
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(root / "ILSVRC2012_img_val.tar", src)
    assert main(["imagenet", str(src), str(tmp_path / "o"), "--splits", "val", "--no-progress"]) == 2
    assert "LOC_val_solution.csv" in capsys.readouterr().err
    assert main(["imagenet", str(src), str(tmp_path / "o"), "--splits", "train", "--no-progress"]) == 2
    assert "ILSVRC2012_img_train.tar" in capsys.readouterr().err
    # said before the train archive is listed (minutes on the real one): here one that cannot be read at all
    (src / "ILSVRC2012_img_train.tar").write_bytes(b"not a tar" * 200)
    assert main(["imagenet", str(src), str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "val images are not in class folders and no labels were found" in err, err
    bad = tmp_path / "devkit.tar.gz"
    bad.write_bytes(b"not a devkit")
    assert main(["imagenet", str(src), str(tmp_path / "o"), "--devkit", str(bad), "--no-progress"]) == 2
    assert f"{bad}: cannot read devkit archive" in capsys.readouterr().err
    # a val archive of <wnid>/ folders needs no label file (that check must not refuse it before its listing)
    sorted_val = tmp_path / "sorted"
    sorted_val.mkdir()
    with tarfile.open(sorted_val / "ILSVRC2012_img_val.tar", "w") as tf, \
            tarfile.open(root / "ILSVRC2012_img_val.tar") as flat:
        for m in flat.getmembers():
            data = flat.extractfile(m).read()
            info = tarfile.TarInfo(f"{exp['val'][m.name][1]}/{m.name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert main(["imagenet", str(sorted_val), str(tmp_path / "o2"), "--splits", "val", "--no-progress"]) == 0
    check_labels(tmp_path / "o2", "val", exp["val"], sorted({w for _, w in exp["val"].values()}))


def test_kaggle_layout_with_synset_mapping(tmp_path):
    src = tmp_path / "kaggle"
    data = src / "ILSVRC" / "Data" / "CLS-LOC"
    exp = build_imagenet(data, extracted=True)
    (data / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    (data / "LOC_val_solution.csv").rename(src / "LOC_val_solution.csv")
    (src / "LOC_synset_mapping.txt").write_text("".join(f"{w} {WORDS[w]}\n" for w in sorted(WORDS)))
    out = tmp_path / "out"
    assert main(["imagenet", str(src), str(out), "--no-progress"]) == 0
    m = load_manifest(out)
    assert m["class_names"] == [WORDS[w] for w in exp["wnids"]]
    check_labels(out, "train", exp["train"], exp["wnids"])
    check_labels(out, "val", exp["val"], exp["wnids"])


def test_a_val_image_appended_again_to_the_archive_replaces_the_earlier_one(tmp_path):
    """Like ``tar -rf`` onto ILSVRC2012_img_val.tar: the later member is the image, the earlier a reject."""
    import json
    import tarfile

    from tests.fixtures_images import add_tar_member, jpeg_bytes, photos

    root = tmp_path / "ilsvrc"
    exp = build_imagenet(root)
    name = "ILSVRC2012_val_00000003.JPEG"
    newer = jpeg_bytes(photos(1, (72, 54), seed=11)[0], quality=88)
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "a") as tf:
        add_tar_member(tf, name, newer)
    out = tmp_path / "out"
    assert main(["imagenet", str(root), str(out), "--splits", "val", "--no-progress"]) == 0
    sp = load_manifest(out)["splits"]["val"]
    assert sp["samples"] == 12 and sp["rejected"] == 1
    check_labels(out, "val", {**exp["val"], name: (newer, exp["val"][name][1])}, exp["wnids"])
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["path"].endswith(f"ILSVRC2012_img_val.tar:{name}")
    assert reject["reason"].startswith("replaced by a later member of the same name at byte ")


def test_an_output_folder_inside_a_split_folder_is_refused(tmp_path, capsys):
    """OUT inside SRC/train/: the first run went through, a rerun listed the shards folder as a class of its
    own (a 1001st class, exit 0)."""
    root = tmp_path / "extracted"
    build_imagenet(root, extracted=True)
    out = root / "train" / "shards"
    assert main(["imagenet", str(root), str(out), "--splits", "train", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: output folder is inside {root / 'train'}, which is read as the train split" in err, err
    assert not out.exists()


def test_a_compressed_image_archive_is_named_with_what_to_do(archives, tmp_path, capsys):
    """ILSVRC2012_img_val.tar.gz (a mirror's copy) was not looked at: "no val data (expected
    ILSVRC2012_img_val.tar ...)" said nothing of the file that is there."""
    import gzip

    root, _ = archives
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(root / "ILSVRC2012_devkit_t12.tar.gz", src)
    with open(root / "ILSVRC2012_img_val.tar", "rb") as f, gzip.open(src / "ILSVRC2012_img_val.tar.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    assert main(["imagenet", str(src), str(tmp_path / "o"), "--splits", "val", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (f"{src / 'ILSVRC2012_img_val.tar.gz'}: a compressed ILSVRC2012_img_val.tar; the images are read from the "
            "uncompressed archive by byte offset: decompress it first") in err, err
    assert not (tmp_path / "o").exists()


def test_an_empty_or_partial_split_folder_beside_the_archive_is_said(archives, tmp_path, capsys):
    """An empty val/ beside ILSVRC2012_img_val.tar was 0 samples, exit 0; a train/ extracted in part was read
    in place of the archive with no word, the devkit classes it lacks with no sample."""
    root, exp = archives
    src = tmp_path / "src"
    src.mkdir()
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        (src / name).symlink_to(root / name)
    (src / "val").mkdir()
    (src / "val" / ".DS_Store").write_bytes(b"\0")
    out = tmp_path / "out"
    assert main(["imagenet", str(src), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (f"error: {src / 'val'}: no val image in it; {src / 'ILSVRC2012_img_val.tar'} beside it is read only when "
            "there is no val/ folder: remove the folder (or finish extracting into it)") in err, err
    assert not out.exists()  # refused before any work
    (src / "val" / ".DS_Store").unlink()
    (src / "val").rmdir()
    one = exp["wnids"][0]
    for name, (data, w) in exp["train"].items():
        if w == one:
            (src / "train" / name).parent.mkdir(parents=True, exist_ok=True)
            (src / "train" / name).write_bytes(data)
    assert main(["imagenet", str(src), str(out), "--splits", "train", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (f"data_prep: train: reading the folder {src / 'train'}; {src / 'ILSVRC2012_img_train.tar'} beside it "
            "is read only when there is no train/ folder") in err, err
    rest = exp["wnids"][1:]
    assert (f"data_prep: warning: split 'train' has no input of {len(rest)} of the {len(exp['wnids'])} classes "
            f"(devkit): {rest[:5]}") in err, err
    m = load_manifest(out)
    assert m["splits"]["train"]["class_counts"] == [6] + [0] * len(rest)


def test_a_devkit_that_is_not_an_archive_is_said_in_one_line(archives, tmp_path, capsys):
    root, _ = archives
    bad = tmp_path / "devkit.tar.gz"
    bad.write_text("ImageId,PredictionString\n")
    assert main(["imagenet", str(root), str(tmp_path / "o"), "--splits", "val", "--devkit", str(bad),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert (f"error: {bad}: cannot read devkit archive (not a tar or .tar.gz archive; --devkit takes "
            "ILSVRC2012_devkit_t12.tar.gz or the folder it was extracted to)") in err, err


def test_without_the_devkit_an_empty_or_missing_class_folder_keeps_its_class_and_the_labels(tmp_path, capsys):
    """Kaggle's layout has no devkit: the class list came from the train class folders alone, so an empty one (a
    part-finished extraction) dropped its class, moved the label of every class after it, rejected its val
    images as "not one of the ILSVRC2012 classes", exit 0, and verify said OK. The list is Kaggle's
    LOC_synset_mapping.txt where SRC has it, else every class the splits name (folders, empty ones too, and
    the val labels); a class without input is warned of."""
    src = tmp_path / "kaggle"
    data = src / "ILSVRC" / "Data" / "CLS-LOC"
    exp = build_imagenet(data, extracted=True)
    (data / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    (data / "LOC_val_solution.csv").rename(src / "LOC_val_solution.csv")
    gone = exp["wnids"][0]  # the first: every other class's label would move
    for f in (data / "train" / gone).iterdir():
        f.unlink()
    train = {k: v for k, v in exp["train"].items() if v[1] != gone}
    for with_mapping in (True, False):
        mapping = src / "LOC_synset_mapping.txt"
        if with_mapping:
            mapping.write_text("".join(f"{w} {WORDS[w]}\n" for w in sorted(WORDS)))
        else:
            mapping.unlink()
        out = tmp_path / f"out-{with_mapping}"
        assert main(["imagenet", str(src), str(out), "--no-progress"]) == 0
        m = load_manifest(out)
        assert m["classes"] == exp["wnids"], m["classes"]
        check_labels(out, "train", train, exp["wnids"])
        check_labels(out, "val", exp["val"], exp["wnids"])
        listed_by = "LOC_synset_mapping.txt" if with_mapping else "class folders and val labels"
        err = capsys.readouterr().err
        assert (f"data_prep: warning: split 'train' has no input of 1 of the {len(exp['wnids'])} classes "
                f"({listed_by}): ['{gone}']") in err, err
    # the folder itself gone too: the val labels still name the class
    (data / "train" / gone).rmdir()
    assert any(w == gone for _, w in exp["val"].values())
    assert main(["imagenet", str(src), str(tmp_path / "out-gone"), "--no-progress"]) == 0
    assert load_manifest(tmp_path / "out-gone")["classes"] == exp["wnids"]


def test_a_hidden_member_of_the_train_archive_is_a_reject_not_an_error(tmp_path):
    """macOS's AppleDouble ``._<wnid>.tar`` beside each class archive (a tar made on a Mac): the first was opened
    as a class archive and stopped the run ("inner archive unreadable (bad checksum); its class would be lost")."""
    import json

    from tests.fixtures_images import _tar_bytes

    root = tmp_path / "src"
    exp = build_imagenet(root)
    train_tar = root / "ILSVRC2012_img_train.tar"
    with tarfile.open(train_tar) as tf:
        inner = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    junk = [(f"._{name}", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)) for name, _ in inner]
    train_tar.write_bytes(_tar_bytes([m for pair in zip(junk, inner) for m in pair]))
    out = tmp_path / "out"
    assert main(["imagenet", str(root), str(out), "--splits", "train", "--no-progress"]) == 0
    check_labels(out, "train", exp["train"], exp["wnids"])
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in rejects) == sorted(f"{train_tar}:{name}" for name, _ in junk), rejects
    assert {r["reason"] for r in rejects} == {"hidden file or folder"}


def _with_ground_truth(root: Path, src: Path, lines: list[str], drop_val: str | None = None) -> None:
    """``src``: ``root``'s archives, with the devkit's ground truth replaced by ``lines`` (and a val image left
    out of the val archive)."""
    src.mkdir()
    shutil.copy(root / "ILSVRC2012_img_train.tar", src)
    with tarfile.open(root / "ILSVRC2012_img_val.tar") as tin, \
            tarfile.open(src / "ILSVRC2012_img_val.tar", "w") as tout:
        for m in tin.getmembers():
            if m.name != drop_val:
                tout.addfile(m, tin.extractfile(m))
    buf = io.BytesIO()
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz") as tin, tarfile.open(fileobj=buf, mode="w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith("ILSVRC2012_validation_ground_truth.txt"):
                data = "".join(f"{line}\n" for line in lines).encode()
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    (src / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(buf.getvalue())


def test_a_ground_truth_with_a_line_too_many_or_too_few_is_refused(archives, tmp_path, capsys):
    """The devkit labels val by line: a line added at the top (or lost in the middle) shifted every label after
    it, exit 0, `verify` OK (7 of 8 val labels wrong in a trial). Its line count must be the official 50,000 or
    the images' highest number; an image missing from val is a note, its neighbours' labels unchanged."""
    root, exp = archives
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz") as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("validation_ground_truth.txt"))
        lines = tf.extractfile(member).read().decode().split()
    assert len(lines) == 12
    for name, edited in (("top", [lines[3], *lines]), ("middle", lines[:5] + lines[6:])):
        src = tmp_path / name
        _with_ground_truth(root, src, edited)
        assert main(["imagenet", str(src), str(tmp_path / f"out-{name}"), "--splits", "val", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"ILSVRC2012_validation_ground_truth.txt has {len(edited)} lines, but the val images here are " \
               "numbered up to 12: it labels by line" in err, err
    src = tmp_path / "missing"
    _with_ground_truth(root, src, lines, drop_val="ILSVRC2012_val_00000003.JPEG")
    out = tmp_path / "out-missing"
    assert main(["imagenet", str(src), str(out), "--splits", "val", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "data_prep: note: val: 1 image of the devkit's ground truth is not in SRC (ILSVRC2012_val_00000003)" in err
    check_labels(out, "val", {k: v for k, v in exp["val"].items() if "00000003" not in k}, exp["wnids"])
    src = tmp_path / "last-left-out"  # the highest image left out: the count cannot tell it from a line added
    _with_ground_truth(root, src, lines, drop_val="ILSVRC2012_val_00000012.JPEG")
    assert main(["imagenet", str(src), str(tmp_path / "out-last"), "--splits", "val", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "(if the images after ILSVRC2012_val_00000011 were left out on purpose, cut the file to its first 11 " \
           "lines: the labels by line stay)" in err, err
    shutil.rmtree(src)
    _with_ground_truth(root, src, lines[:11], drop_val="ILSVRC2012_val_00000012.JPEG")  # as the error says
    assert main(["imagenet", str(src), str(tmp_path / "out-last"), "--splits", "val", "--no-progress"]) == 0
    check_labels(tmp_path / "out-last", "val", {k: v for k, v in exp["val"].items() if "00000012" not in k},
                 exp["wnids"])

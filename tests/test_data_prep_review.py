"""data_prep on awkward real-world trees and failing outputs: layout detection, symlinks, disk full, resume."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.format import load_manifest
from data_prep.output_status import describe
from pipeline.data.shards import ShardSet
from pipeline.errors import ConfigError
from tests.conftest import REPO, arguments_without_help, unavailable_here
from tests.fixtures_images import write_imagefolder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=REPO, capture_output=True, text=True)


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_file_at_the_top_does_not_hide_split_or_top_folders(tmp_path):
    """A README next to train/ and val/ used to turn the split folders into the classes."""
    src = tmp_path / "src"
    write_imagefolder(src / "train", ["a", "b"], per_class=3)
    write_imagefolder(src / "val", ["a", "b"], per_class=2, seed=5)
    (src / "README.txt").write_text("my dataset")
    assert main(["imagefolder", str(src), str(tmp_path / "o"), "--split", "val", "--no-progress"]) == 0
    m = load_manifest(tmp_path / "o")
    assert m["classes"] == ["a", "b"]
    assert m["splits"]["val"]["samples"] == 4 and m["splits"]["val"]["rejected"] == 1
    one = tmp_path / "one"  # one top folder plus a LICENSE: the top folder is still skipped
    write_imagefolder(one / "train", ["a", "b"], per_class=3)
    (one / "LICENSE").write_text("CC-BY")
    assert main(["imagefolder", str(one), str(tmp_path / "o1"), "--split", "train", "--no-progress"]) == 0
    assert load_manifest(tmp_path / "o1")["classes"] == ["a", "b"]


def test_split_not_among_the_split_folders_is_an_error(tmp_path):
    src = tmp_path / "src"
    write_imagefolder(src / "train", ["a", "b"], per_class=2)
    write_imagefolder(src / "val", ["a", "b"], per_class=2, seed=5)
    r = run_cli("imagefolder", str(src), str(tmp_path / "o"), "--split", "valid", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "'valid'" in r.stderr and "['train', 'val']" in r.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_split_named_unlike_the_sources_split_folder_is_noted(tmp_path):
    """`--split tset` for a tree of test/<class>/...: written (a user may name splits freely), with a note."""
    src = tmp_path / "src"
    write_imagefolder(src / "test", ["a", "b"], per_class=2)
    r = run_cli("imagefolder", str(src), str(tmp_path / "o"), "--split", "tset", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "holds the split folder 'test'; writing it as split 'tset'" in r.stderr
    assert list(load_manifest(tmp_path / "o")["splits"]) == ["tset"]
    r = run_cli("imagefolder", str(src), str(tmp_path / "o2"), "--split", "val", "--no-progress")
    assert r.returncode == 0 and "note" not in r.stderr, r.stderr  # CIFAR's test/ as val: no note


def test_symlinked_class_folder_is_read_and_a_link_loop_is_rejected(tmp_path):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    write_imagefolder(src, ["a", "b"], per_class=2)
    write_imagefolder(elsewhere, ["c"], per_class=3, seed=3)
    (src / "c").symlink_to(elsewhere / "c", target_is_directory=True)
    (src / "a" / "loop").symlink_to(src, target_is_directory=True)
    (src / "empty").mkdir()
    r = run_cli("imagefolder", str(src), str(tmp_path / "o"), "--split", "train", "--no-progress")
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "o")
    assert m["classes"] == ["a", "b", "c"] and m["splits"]["train"]["samples"] == 7
    rejects = [json.loads(line) for line in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["path"], "symlink loop" in r["reason"]) for r in rejects] == [(str(src / "a" / "loop"), True)]
    assert "empty" in r.stderr  # an empty folder is no class, and the run says so


def test_disk_full_is_one_line_naming_the_shard(tmp_path, monkeypatch, capsys):
    """Writing a shard into /dev/full fails with ENOSPC, like a full disk."""
    import data_prep.shardwriter as shardwriter

    src, out = tmp_path / "src", tmp_path / "o"
    write_imagefolder(src, ["a", "b"], per_class=3)
    out.mkdir()
    (out / "train-000000.tar.full.tmp").symlink_to("/dev/full")
    real = shardwriter.partial_path
    monkeypatch.setattr(shardwriter, "partial_path",
                        lambda p: p.with_name(p.name + ".full.tmp") if p.name.endswith(".tar") else real(p))
    assert main(["imagefolder", str(src), str(out), "--split", "train", "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{out / 'train-000000.tar'}: cannot write shard: No space left on device" in err
    assert not (out / "train-000000.tar").exists() and not (out / "manifest.json").exists()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    r = run_cli("imagefolder", str(src), str(blocked / "o"), "--split", "train", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(blocked) in r.stderr


@pytest.mark.parametrize("failing, final", [("train-000000.idx.", "train-000000.idx"),
                                             (".train-000000.tar.json.", ".work/train/train-000000.tar.json"),
                                             (".manifest.json.", "manifest.json")])
def test_a_write_error_reported_only_at_fsync_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, capsys,
                                                                                 failing, final):
    """NFS and Lustre may take every write() and report the failure (the quota, an I/O error on the server)
    only at fsync. The index and the JSON records were never fsynced: the index was renamed into place and the
    shard recorded as done, its bytes lost."""
    src, out = tmp_path / "src", tmp_path / "o"
    write_imagefolder(src, ["a", "b"], per_class=3)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if failing in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    args = ["imagefolder", str(src), str(out), "--split", "train", "--workers", "1", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    named = out / (final if not final.endswith(".idx") else "train-000000.tar")
    assert f"{named}: cannot write" in err and "Disk quota exceeded" in err, err
    assert not (out / final).exists() and not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "no temporary file left behind"
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(args) == 0 and run_cli("verify", str(out)).returncode == 0


def test_two_writers_of_one_shard_at_once_leave_it_whole(tmp_path):
    """Two commands building the same shard at once (an array task run again while the first still runs): the
    second writer's start used to truncate the one temporary file the first then renamed into place, and a
    second writer killed before it had rewritten those bytes left zeros where the first samples were, under a
    done-record whose sha256 was the first writer's. Each writes its own file now; the last rename wins."""
    from data_prep.shardwriter import ShardWriter, file_sha256
    from tests.fixtures_images import jpeg_bytes, photos

    jpegs = [jpeg_bytes(im) for im in photos(6)]
    tar, idx = tmp_path / "train-000000.tar", tmp_path / "train-000000.idx"
    first = ShardWriter(tar, idx)
    for i in range(3):
        first.add(f"{i:06d}", jpegs[i], i % 2)
    second = ShardWriter(tar, idx)  # the same shard, from the same plan: the same samples in the same order
    for i in range(3, 6):
        first.add(f"{i:06d}", jpegs[i], i % 2)
    nbytes, sha = first.commit()
    second.add("000000", jpegs[0], 0)  # ... and is killed here: no commit, no abort
    assert tar.stat().st_size == nbytes and file_sha256(tar) == sha
    import webdataset as wds

    assert [s["__key__"] for s in wds.WebDataset(str(tar), shardshuffle=False)] == [f"{i:06d}" for i in range(6)]


def test_resume_never_trusts_an_old_tar_next_to_a_new_index(tmp_path):
    """State left by a kill between the tar and index renames of a rerun with other settings."""
    src, out, clean = tmp_path / "src", tmp_path / "o", tmp_path / "clean"
    write_imagefolder(src, ["a", "b", "c"], per_class=4)
    first = ["imagefolder", str(src), str(out), "--split", "train", "--samples-per-shard", "5", "--no-progress"]
    assert main(first) == 0
    rec = out / ".work" / "train" / "train-000000.tar.json"
    saved_tar, saved_rec = (out / "train-000000.tar").read_bytes(), rec.read_bytes()
    assert main([*first, "--seed", "1"]) == 0  # new index (and tar) for shard 0
    (out / "train-000000.tar").write_bytes(saved_tar)
    rec.write_bytes(saved_rec)
    assert main(first) == 0
    assert main([a if a != str(out) else str(clean) for a in first]) == 0
    assert outputs(out) == outputs(clean)
    assert run_cli("verify", str(out)).returncode == 0


def test_finalize_removes_leftover_tmp_shards(tmp_path):
    """A writer killed under an older plan leaves NAME.tar.tmp that no later shard overwrites."""
    src, out = tmp_path / "src", tmp_path / "o"
    write_imagefolder(src, ["a", "b"], per_class=3)
    out.mkdir()
    for name in ("train-000007.tar.tmp", "train-000007.idx.tmp", "train-000007.tar.0123456789ab.tmp",
                 "train-000000.idx.ba9876543210.tmp"):
        (out / name).write_bytes(b"\0" * 4096)
    (out / "val-000007.tar.tmp").write_bytes(b"other split")
    (out / "val-000007.tar.0123456789ab.tmp").write_bytes(b"other split")
    assert main(["imagefolder", str(src), str(out), "--split", "train", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.tmp")) == ["val-000007.tar.0123456789ab.tmp", "val-000007.tar.tmp"]
    shutil.rmtree(out)


def test_stepped_slurm_array_covers_every_shard_once(tmp_path, monkeypatch):
    """`sbatch --array=1-5:2` runs IDs 1, 3, 5 with COUNT 3: they must be tasks 0, 1, 2."""
    src, arr, single = tmp_path / "src", tmp_path / "arr", tmp_path / "single"
    write_imagefolder(src, ["a", "b"], per_class=5)
    common = ["--split", "train", "--samples-per-shard", "2", "--workers", "1", "--no-progress"]
    assert main(["imagefolder", str(src), str(single), *common]) == 0
    for name, value in (("SLURM_ARRAY_TASK_COUNT", "3"), ("SLURM_ARRAY_TASK_MIN", "1"), ("SLURM_ARRAY_TASK_STEP", "2")):
        monkeypatch.setenv(name, value)
    for task_id in ("1", "3", "5"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task_id)
        assert main(["imagefolder", str(src), str(arr), *common]) == 0
    assert main(["finalize", str(arr)]) == 0
    assert outputs(arr) == outputs(single)


def test_an_array_of_ids_that_are_no_range_is_said_in_slurms_variables(tmp_path, monkeypatch, capsys):
    """`sbatch --array=2,5` (no step: Slurm sets none) made task 5 "--task-index 3 is outside 0..1", a flag the
    user never gave; the error now names the variables it was read from and the ways out."""
    src = tmp_path / "src"
    write_imagefolder(src, ["a", "b"], per_class=2)
    for name, value in (("SLURM_ARRAY_TASK_COUNT", "2"), ("SLURM_ARRAY_TASK_MIN", "2"), ("SLURM_ARRAY_TASK_ID", "5")):
        monkeypatch.setenv(name, value)
    assert main(["imagefolder", str(src), str(tmp_path / "o"), "--split", "train", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert ("SLURM_ARRAY_TASK_ID 5 (SLURM_ARRAY_TASK_MIN 2, SLURM_ARRAY_TASK_STEP 1) is task 3 of the 2 of "
            "SLURM_ARRAY_TASK_COUNT, outside 0..1: an array of ids that are no range (--array=2,5)? Submit a range "
            "(--array=0-1, or with a step), or pass --task-index and --num-tasks explicitly") in err, err
    assert not (tmp_path / "o").exists()


def test_class_names_in_two_unicode_forms_are_said_as_such(tmp_path, capsys):
    """train/café written composed (NFC) and val/café decomposed (NFD, as a macOS copy gives it): the refusal
    printed "only in this split: ['café'], only in the existing: ['café']", two names that look alike."""
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    train, val, out = tmp_path / "train", tmp_path / "val", tmp_path / "o"
    write_imagefolder(train, ["ant", composed], per_class=2)
    write_imagefolder(val, ["ant", decomposed], per_class=1)
    assert main(["imagefolder", str(train), str(out), "--split", "train", "--no-progress"]) == 0
    assert main(["imagefolder", str(val), str(out), "--split", "val", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"['{composed}'] written in two Unicode forms ({ascii(decomposed)}, {ascii(composed)}): rename the " \
           "folders to one form" in err, err


def test_class_mismatch_names_the_classes(tmp_path, capsys):
    src, other, out = tmp_path / "src", tmp_path / "other", tmp_path / "o"
    write_imagefolder(src, ["ant", "bee", "cat"], per_class=2)
    write_imagefolder(other, ["ant", "cow"], per_class=1)
    assert main(["imagefolder", str(src), str(out), "--split", "train", "--no-progress"]) == 0
    assert main(["imagefolder", str(other), str(out), "--split", "val", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "only in this split: ['cow'], only in the existing: ['bee', 'cat']" in err and "Traceback" not in err
    many = tmp_path / "many"  # more than five differ: the count of the rest is said, not dropped silently
    write_imagefolder(many, ["ant", "bee", "cat", *[f"new{i}" for i in range(7)]], per_class=1)
    assert main(["imagefolder", str(many), str(out), "--split", "val", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "only in this split: ['new0', 'new1', 'new2', 'new3', 'new4'] (+2 more)" in err
    assert "the split with every class goes first" in err
    assert sorted(load_manifest(out)["splits"]) == ["train"]


def folder_of_each_sample(out: Path, split: str, files: dict[str, bytes]) -> list[tuple[str, str]]:
    """(class of the sample's label, class folder of the file it holds) for every sample of the split; the
    file found by its bytes (`files`: write_imagefolder's, kept as they are: no --max-side)."""
    folder_of = {data: rel.split("/")[0] for rel, data in files.items()}
    shards = ShardSet(out, split)
    return [(shards.classes[shards.read_label(i)], folder_of[shards.read_jpeg(i)]) for i in range(len(shards))]


def test_a_split_with_some_of_the_classes_takes_the_list_already_in_out(tmp_path, capsys):
    """A val folder without a rare class: its own sorted folder names would give cat the label 1, which is
    bee's in train. It is labelled by train's list (cat stays 2), said in a note; and each sample's label is its
    folder's class. Prepared the other way round (val first), train is refused with the order that works."""
    src, val, out = tmp_path / "src", tmp_path / "val", tmp_path / "o"
    write_imagefolder(src, ["ant", "bee", "cat"], per_class=2)
    files = write_imagefolder(val, ["ant", "cat"], per_class=2, seed=1)
    assert main(["imagefolder", str(src), str(out), "--split", "train", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["imagefolder", str(val), str(out), "--split", "val", "--no-progress"]) == 0
    assert "split 'val' has 2 of the 3 classes of split 'train' (none of ['bee']); its labels follow their list" \
        in capsys.readouterr().err
    manifest = load_manifest(out)
    assert manifest["classes"] == ["ant", "bee", "cat"] and sorted(manifest["splits"]) == ["train", "val"]
    pairs = folder_of_each_sample(out, "val", files)
    assert sorted(pairs) == [("ant", "ant")] * 2 + [("cat", "cat")] * 2
    assert sorted(ShardSet(out, "val").labels().tolist()) == [0, 0, 2, 2]
    assert main(["imagefolder", str(val), str(out), "--split", "val", "--no-progress"]) == 0  # a rerun: same
    assert sorted(ShardSet(out, "val").labels().tolist()) == [0, 0, 2, 2]

    reverse = tmp_path / "reverse"
    assert main(["imagefolder", str(val), str(reverse), "--split", "val", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["imagefolder", str(src), str(reverse), "--split", "train", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "split 'train' has 3 classes, split 'val' 2 (only in this split: ['bee'])" in err
    assert f"the split with every class goes first, then the others, whose labels then follow its classes: remove " \
           f"{reverse / 'manifest.json'} (data_prep writes it again from what {reverse / '.work'} records), run this " \
           f"command again, then run the data_prep command of split 'val' again" in err
    assert sorted(load_manifest(reverse)["splits"]) == ["val"]
    (reverse / "manifest.json").unlink()  # the way out it gives
    assert main(["imagefolder", str(src), str(reverse), "--split", "train", "--no-progress"]) == 0
    assert main(["imagefolder", str(val), str(reverse), "--split", "val", "--no-progress"]) == 0
    assert sorted(folder_of_each_sample(reverse, "val", files)) == [("ant", "ant")] * 2 + [("cat", "cat")] * 2
    assert sorted(ShardSet(reverse, "val").labels().tolist()) == [0, 0, 2, 2]


def test_array_tasks_of_a_split_with_some_of_the_classes_are_left_out_at_finalize_with_the_way_out(tmp_path, capsys):
    """Array tasks of train and test at once plan test before train is in the manifest: test's labels count its
    own 2 classes. One finalize of both refused both (writing nothing) and asked for train alone first; now it
    lists train, leaves test out, says so and exits 1. Finalized alone, test is refused; `launch status` names
    it, and test's command run again relabels it by train's list."""
    src, val, out = tmp_path / "src", tmp_path / "val", tmp_path / "o"
    write_imagefolder(src, ["ant", "bee", "cat"], per_class=2)
    files = write_imagefolder(val, ["ant", "cat"], per_class=2, seed=1)
    for folder, split in ((val, "test"), (src, "train")):  # "test" sorts before "train"
        for task in ("0", "1"):
            assert main(["imagefolder", str(folder), str(out), "--split", split, "--samples-per-shard", "1",
                         "--task-index", task, "--num-tasks", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["finalize", str(out)]) == 1
    err = capsys.readouterr().err
    assert (f"data_prep: warning: {out / 'manifest.json'} does not list split 'test': its labels count its own 2 "
            f"classes (planned before split 'train', with ['bee'] besides, was in the manifest: array tasks of both "
            f"at once?); run the data_prep command of split 'test' again: its labels then follow the manifest's "
            f"classes (shards are rebuilt where a label changes)") in err, err
    assert sorted(load_manifest(out)["splits"]) == ["train"]
    assert describe(out)[1].endswith("train 6 samples (0 rejected); not listed: test, whose labels count another "
                                     "class list than the manifest's (run the data_prep command of split 'test' "
                                     "again to relabel it)")
    assert main(["finalize", str(out), "--splits", "test"]) == 2
    assert ("split 'test' has 2 classes, split 'train' 3 (only in the existing: ['bee']): it was planned before "
            "that split was in the manifest") in capsys.readouterr().err
    assert main(["imagefolder", str(val), str(out), "--split", "test", "--samples-per-shard", "1",
                 "--no-progress"]) == 0
    assert sorted(ShardSet(out, "test").labels().tolist()) == [0, 0, 2, 2]
    assert sorted(folder_of_each_sample(out, "test", files)) == [("ant", "ant")] * 2 + [("cat", "cat")] * 2
    assert main(["finalize", str(out)]) == 0

    # the smaller split's finalize job ran first (its own list is in the manifest), as it does when both arrays run
    # at once: train's finalize (its work done) was refused, with a three-step way out. Now it lists train and
    # unlists test, saying so; test's command run again relabels it
    other = tmp_path / "other"
    for folder, split in ((val, "test"), (src, "train")):
        for task in ("0", "1"):
            assert main(["imagefolder", str(folder), str(other), "--split", split, "--samples-per-shard", "1",
                         "--task-index", task, "--num-tasks", "2", "--no-progress"]) == 0
    assert main(["finalize", str(other), "--splits", "test"]) == 0
    capsys.readouterr()
    assert main(["finalize", str(other), "--splits", "train"]) == 0
    err = capsys.readouterr().err
    assert (f"data_prep: warning: {other / 'manifest.json'} no longer lists split 'test': its labels count the 2 "
            f"classes it listed before split 'train' (with ['bee'] besides) was finalized; run the data_prep "
            f"command of split 'test' again: its labels then follow the manifest's classes (shards are rebuilt where "
            f"a label changes)") in err, err
    assert sorted(load_manifest(other)["splits"]) == ["train"]
    assert main(["imagefolder", str(val), str(other), "--split", "test", "--samples-per-shard", "1",
                 "--no-progress"]) == 0
    assert sorted(folder_of_each_sample(other, "test", files)) == [("ant", "ant")] * 2 + [("cat", "cat")] * 2
    assert load_manifest(other)["classes"] == ["ant", "bee", "cat"]


def _train_and_smaller_val(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, bytes]]:
    """(train folder of ant, bee, cat; val folder without bee; OUT; val's files by path)."""
    src, val, out = tmp_path / "src", tmp_path / "val", tmp_path / "o"
    write_imagefolder(src, ["ant", "bee", "cat"], per_class=2)
    return src, val, out, write_imagefolder(val, ["ant", "cat"], per_class=2, seed=1)


def _array_task(out: Path, folder: Path, split: str, index: int) -> int:
    """Task `index` of a 2-task array preparing `folder` as `split` into `out`, one sample a shard."""
    return main(["imagefolder", str(folder), str(out), "--split", split, "--samples-per-shard", "1",
                 "--task-index", str(index), "--num-tasks", "2", "--no-progress"])


def test_a_bigger_split_whose_array_began_before_a_smaller_one_was_listed_goes_on(tmp_path, capsys):
    """Two arrays at once, train's throttled (`--array=0-1%1`): its task 0 planned train with its 3 classes,
    then val's array and finalize listed val with its 2, then train's task 1 started. It was refused (train's
    finalize job never ran, its work stranded); now it goes on with train's own plan, saying what follows, and
    train's finalize unlists val. A split with more classes that no array task of it planned before is still
    refused (test_a_split_with_some_of_the_classes_takes_the_list_already_in_out)."""
    src, val, out, files = _train_and_smaller_val(tmp_path)

    def task(folder: Path, split: str, index: int) -> int:
        return _array_task(out, folder, split, index)

    assert task(src, "train", 0) == 0
    assert task(val, "val", 0) == 0 and task(val, "val", 1) == 0
    assert main(["finalize", str(out)]) == 2  # train's task 1 has not run
    assert main(["finalize", str(out), "--splits", "val"]) == 0
    capsys.readouterr()
    grown = tmp_path / "grown"  # a class list other than the one train's plan record holds: refused as before
    shutil.copytree(src, grown)
    write_imagefolder(grown, ["dog"], per_class=1, seed=7)
    assert task(grown, "train", 1) == 2 and "the split with every class goes first" in capsys.readouterr().err
    assert task(src, "train", 1) == 0
    assert (f"data_prep: warning: split 'train' has 3 classes, split 'val' 2 (only in this split: ['bee']), labelled "
            f"by its shorter list: once this split is finalized, {out / 'manifest.json'} no longer lists it; then run "
            f"the data_prep command of split 'val' again: its labels then follow this split's classes (shards are "
            f"rebuilt where a label changes)") in capsys.readouterr().err
    assert main(["finalize", str(out), "--splits", "train"]) == 0
    assert sorted(load_manifest(out)["splits"]) == ["train"]
    assert describe(out)[1].endswith("train 6 samples (0 rejected); not listed: val, whose labels count another "
                                     "class list than the manifest's (run the data_prep command of split 'val' "
                                     "again to relabel it)")
    with pytest.raises(ConfigError, match="split 'val' is not in .*data_prep has not finished it"):
        ShardSet(out, "val")
    assert main(["imagefolder", str(val), str(out), "--split", "val", "--samples-per-shard", "1",
                 "--no-progress"]) == 0
    assert sorted(folder_of_each_sample(out, "val", files)) == [("ant", "ant")] * 2 + [("cat", "cat")] * 2
    assert main(["verify", str(out)]) == 0


def test_a_bigger_split_whose_first_task_had_not_planned_when_a_smaller_one_was_listed_goes_on(tmp_path, capsys,
                                                                                                monkeypatch):
    """The window the plan record left: train's first task had looked at the manifest (no val yet) but not yet
    written its plan when val's finalize listed val; train's later tasks found no plan record and were refused.
    The look and a claim of the class list (OUT/.work/train/classes.json) are one step under the manifest lock
    now: here the first task stops right after them (killed before its plan), and the later tasks go on."""
    from data_prep import prepare

    src, val, out, files = _train_and_smaller_val(tmp_path)

    def task(folder: Path, split: str, index: int) -> int:
        return _array_task(out, folder, split, index)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(prepare, "plan_split", killed)
        assert task(src, "train", 0) == 130
    assert not (out / ".work" / "train" / "plan.json").exists()
    assert task(val, "val", 0) == 0 and task(val, "val", 1) == 0
    assert main(["finalize", str(out), "--splits", "val"]) == 0
    capsys.readouterr()
    assert task(src, "train", 1) == 0 and task(src, "train", 0) == 0
    assert "data_prep: warning: split 'train' has 3 classes, split 'val' 2" in capsys.readouterr().err
    assert main(["finalize", str(out), "--splits", "train"]) == 0
    assert main(["imagefolder", str(val), str(out), "--split", "val", "--samples-per-shard", "1",
                 "--no-progress"]) == 0
    assert sorted(folder_of_each_sample(out, "val", files)) == [("ant", "ant")] * 2 + [("cat", "cat")] * 2
    assert sorted(load_manifest(out)["splits"]) == ["train", "val"]


def test_a_hold_out_from_a_split_with_some_of_the_classes_follows_the_list_too(tmp_path, capsys):
    """Both sides of a hold-out (the hold-out's own lists of positions) are relabelled."""
    full, part, out = tmp_path / "full", tmp_path / "part", tmp_path / "o"
    write_imagefolder(full, ["ant", "bee", "cat"], per_class=1)
    files = write_imagefolder(part, ["bee", "cat"], per_class=3, seed=2)
    assert main(["imagefolder", str(full), str(out), "--split", "test", "--no-progress"]) == 0
    assert main(["imagefolder", str(part), str(out), "--split", "train", "--holdout", "2", "--holdout-split", "val",
                 "--no-progress"]) == 0
    for split, n in (("train", 4), ("val", 2)):
        pairs = folder_of_each_sample(out, split, files)
        assert len(pairs) == n and all(label == folder for label, folder in pairs), (split, pairs)
        assert set(ShardSet(out, split).labels().tolist()) == {1, 2}


def test_output_inside_the_source_folder_is_refused(tmp_path):
    """Else a rerun (a resume) reads OUT's shards as a class folder 'wds' and shifts every label."""
    src = tmp_path / "src"
    write_imagefolder(src, ["a", "b"], per_class=2)
    r = run_cli("imagefolder", str(src), str(src / "wds"), "--split", "train", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "inside SRC" in r.stderr
    assert not (src / "wds").exists()


def test_folder_that_cannot_be_listed_is_a_reject_not_silently_skipped(tmp_path):
    """A folder deeper than PATH_MAX cannot be listed (even by root): it used to vanish without a trace."""
    src = tmp_path / "src"
    write_imagefolder(src, ["a", "b"], per_class=2)
    fd = os.open(src / "b", os.O_RDONLY)
    for _ in range(20):  # 20 * 250 characters > PATH_MAX (4096); created relative to an fd
        os.mkdir("d" * 250, dir_fd=fd)
        fd, old = os.open("d" * 250, os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    os.close(fd)
    assert main(["imagefolder", str(src), str(tmp_path / "o"), "--split", "train", "--no-progress"]) == 0
    rejects = [json.loads(line) for line in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["reason"].startswith("cannot list folder")
    assert rejects[0]["path"].startswith(str(src / "b" / ("d" * 250)))
    shutil.rmtree(src)


_WRITER = """
import sys
from pathlib import Path
from data_prep.runner import write_json_atomic
obj = {"tag": sys.argv[2], "rows": list(range(20000))}
for _ in range(200):
    write_json_atomic(Path(sys.argv[1]), obj)
"""


def test_json_writers_in_two_pid_namespaces_do_not_collide(tmp_path):
    """Array tasks in containers (their own pid namespaces) may all be pid 1 and write plan.json at once;
    a temp name made from the pid let one task rename the other's half-written file away."""
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode != 0:
        unavailable_here("unshare --pid is not permitted here (needs root)")
    target = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-c", _WRITER, str(target), tag],
                              env=env, stderr=subprocess.PIPE, text=True) for tag in "ab"]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert json.loads(target.read_text())["tag"] in ("a", "b")
    assert not list(tmp_path.glob("*.tmp")), "no temporary file left behind"


def _cut_cases(tar: Path, tmp: Path) -> dict[str, Path]:
    """The tar cut short at a member's header, inside its data or its header, and with one header damaged."""
    import tarfile

    with tarfile.open(tar) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
    mid = members[len(members) // 2]
    data = tar.read_bytes()
    cases = {"cut at a header": data[:mid.offset], "cut in the data": data[:mid.offset_data + mid.size // 2],
             "cut in a header": data[:mid.offset + 300]}
    damaged = bytearray(data)
    damaged[mid.offset + 148:mid.offset + 156] = b"0000000\0"  # a wrong header checksum
    cases["damaged header"] = bytes(damaged)
    out = {}
    for i, (name, blob) in enumerate(cases.items()):
        out[name] = tmp / f"case{i}.tar"
        out[name].write_bytes(blob)
    return out


def test_a_cut_or_damaged_tar_is_an_error_not_fewer_classes(tmp_path):
    """Python's tarfile takes a cut-short archive, or a bad header after the first member, for the end of
    the archive: half the files and whole classes vanished, exit 0, and every label after them moved. Also
    the outer ILSVRC2012 train archive, cut between two class archives."""
    from tests.fixtures_images import build_imagenet, tar_tree

    src = tmp_path / "src"
    write_imagefolder(src, ["a", "b", "c", "d"], per_class=4)
    tar = tar_tree(src, tmp_path / "full.tar")
    assert main(["imagefolder", str(tar), str(tmp_path / "ok"), "--split", "train", "--no-progress"]) == 0
    for name, cut in _cut_cases(tar, tmp_path).items():
        r = run_cli("imagefolder", str(cut), str(tmp_path / name.replace(" ", "_")), "--split", "train",
                    "--no-progress")
        assert r.returncode == 2 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert f"error: {cut}" in r.stderr and "would be lost" in r.stderr, (name, r.stderr)
        said = {"damaged header": "a damaged header is there", "cut in the data": "unexpected end of data"}.get(
            name, "end-of-archive marker (cut short?)")  # a cut inside a header was called a damaged header
        assert said in r.stderr, (name, r.stderr)
        assert not (tmp_path / name.replace(" ", "_") / "manifest.json").exists(), name

    inet = tmp_path / "ilsvrc"
    build_imagenet(inet)
    train = inet / "ILSVRC2012_img_train.tar"
    import tarfile

    with tarfile.open(train) as tf:
        inner = [m for m in tf.getmembers() if m.isfile()]
    train.write_bytes(train.read_bytes()[:inner[len(inner) // 2].offset])
    r = run_cli("imagenet", str(inet), str(tmp_path / "inet_out"), "--no-progress")
    assert r.returncode == 2 and f"error: {train}: listing stopped at byte" in r.stderr, r.stderr[-2000:]


def _train_beside_a_flat_val(tmp_path: Path, train: str) -> Path:
    """``flat/<train>/{a,b}/*.jpg`` (3 each) and ``flat/val/*.jpg`` (4 images, no class folders), as ImageNet's
    extracted val ships."""
    flat = tmp_path / "flat"
    write_imagefolder(flat / train, ["a", "b"], per_class=3)
    write_imagefolder(tmp_path / "v", ["x"], per_class=4, seed=5)
    (flat / "val").mkdir()
    for p in (tmp_path / "v" / "x").iterdir():
        p.rename(flat / "val" / p.name)
    return flat


def test_split_folders_are_never_taken_for_classes(tmp_path):
    """SRC holding split folders that the layout detection missed (a flat ``val/*.jpg`` as ImageNet ships
    it, a README inside ``train/``, capitalised ``Train/``, one wrapper folder around them) made the
    classes ``train`` and ``val``: both splits mixed under two labels, exit 0."""
    flat = _train_beside_a_flat_val(tmp_path, "train")
    assert main(["imagefolder", str(flat), str(tmp_path / "o1"), "--split", "train", "--no-progress"]) == 0
    m = load_manifest(tmp_path / "o1")
    assert m["classes"] == ["a", "b"] and m["splits"]["train"]["samples"] == 6

    caps = tmp_path / "caps"
    write_imagefolder(caps / "Train", ["a", "b"], per_class=3)
    write_imagefolder(caps / "Test", ["a", "b"], per_class=2, seed=5)
    (caps / "Train" / "README.txt").write_text("notes")
    assert main(["imagefolder", str(caps), str(tmp_path / "o2"), "--split", "test", "--no-progress"]) == 0
    m = load_manifest(tmp_path / "o2")
    assert m["classes"] == ["a", "b"] and m["splits"]["test"]["samples"] == 4

    wrapped = tmp_path / "wrapped"
    write_imagefolder(wrapped / "sp" / "train", ["a", "b"], per_class=2)
    write_imagefolder(wrapped / "sp" / "val", ["a", "b"], per_class=2, seed=5)
    r = run_cli("imagefolder", str(wrapped), str(tmp_path / "o3"), "--split", "train", "--no-progress")
    assert r.returncode == 2 and "are split names" in r.stderr and "Traceback" not in r.stderr, r.stderr

    only_train = tmp_path / "only_train"
    write_imagefolder(only_train / "train", ["a", "b"], per_class=2)
    r = run_cli("imagefolder", str(only_train), str(tmp_path / "o4"), "--split", "val", "--no-progress")
    assert r.returncode == 2 and "holds only the split folder 'train', but --split is 'val'" in r.stderr, r.stderr


def test_split_folders_beside_other_folders(tmp_path, capsys):
    """``train/`` and ``val/`` beside a ``meta/`` folder (or ``out/``): the layout detection needed every top
    folder to be a split name, so the classes became ``meta``, ``train`` and ``val`` (both splits mixed, exit
    0). A flat ``val/*.jpg`` asked for as ``--split val`` became one class ``val`` (every label 0)."""
    src = tmp_path / "src"
    write_imagefolder(src / "train", ["a", "b"], per_class=3)
    write_imagefolder(src / "val", ["a", "b"], per_class=2, seed=5)
    (src / "meta").mkdir()
    (src / "meta" / "classes.txt").write_text("a\nb\n")
    for split, n in (("train", 6), ("val", 4)):
        capsys.readouterr()
        assert main(["imagefolder", str(src), str(tmp_path / "o"), "--split", split, "--no-progress"]) == 0
        m = load_manifest(tmp_path / "o")
        assert m["classes"] == ["a", "b"] and m["splits"][split]["samples"] == n, m["splits"][split]
        assert m["splits"][split]["rejected"] == 0
        assert f"using the split folder {split!r}; not reading the folder beside the split folders: meta" in \
            capsys.readouterr().err

    # beside meta/, a --split that names none of the split folders: an error (meta/ and train/ became classes)
    r = run_cli("imagefolder", str(src), str(tmp_path / "o3"), "--split", "test", "--no-progress")
    assert r.returncode == 2 and "holds split folders ['meta', 'train', 'val'] but none named 'test'" in r.stderr, \
        r.stderr

    flat = _train_beside_a_flat_val(tmp_path, "Train")
    r = run_cli("imagefolder", str(flat), str(tmp_path / "o2"), "--split", "val", "--no-progress")
    assert r.returncode == 2 and "the split folder 'val' holds its images directly, not in class folders" in \
        r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_a_class_folder_that_cannot_be_read_is_an_error(tmp_path):
    """A second link to a class folder (or an unreadable class folder) dropped that class (only a line in
    rejects.jsonl, exit 0): the labels of the classes after it moved."""
    src = tmp_path / "src"
    write_imagefolder(src, ["a", "b", "c"], per_class=2)
    (src / "d").symlink_to(src / "b", target_is_directory=True)
    r = run_cli("imagefolder", str(src), str(tmp_path / "o"), "--split", "train", "--no-progress")
    assert r.returncode == 2 and f"error: {src / 'd'}: class folder 'd': folder already listed" in r.stderr, \
        r.stderr
    (src / "d").unlink()  # (an unreadable class folder takes the same path: "cannot list folder")
    assert main(["imagefolder", str(src), str(tmp_path / "o"), "--split", "train", "--no-progress"]) == 0


def test_hand_edited_outputs_and_inputs_give_one_line_errors(tmp_path):
    """A manifest or rejects.jsonl edited by hand, a split name too long for a tar member, a CSV saved by
    Excel (UTF-8 with a BOM) or as UTF-16: each was a traceback or a refusal of a good file."""
    from tests.fixtures_images import build_imagenet

    src = tmp_path / "src"
    write_imagefolder(src, ["a", "b"], per_class=2)
    out = tmp_path / "o"
    assert main(["imagefolder", str(src), str(out), "--split", "train", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["splits"]["train"]["shards"][0]["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli("verify", str(out))
    assert r.returncode == 2 and "manifest has no field 'splits.train.shards[0].sha256'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert main(["finalize", str(out)]) == 0  # what the line says to do: the entry is written again
    assert main(["verify", str(out)]) == 0

    with open(out / "rejects.jsonl", "a") as f:
        f.write("not json\n")
    r = run_cli("imagefolder", str(src), str(out), "--split", "val", "--no-progress")
    assert r.returncode == 2 and f"{out / 'rejects.jsonl'}:1: not a JSON line" in r.stderr, r.stderr

    r = run_cli("imagefolder", str(src), str(tmp_path / "o2"), "--split", "s" * 95, "--no-progress")
    assert r.returncode == 2 and "at most 64 characters" in r.stderr and "Traceback" not in r.stderr, r.stderr

    inet = tmp_path / "ilsvrc"
    exp = build_imagenet(inet)
    (inet / "ILSVRC2012_devkit_t12.tar.gz").unlink()  # labels from the Kaggle CSV only
    csv_path = next(inet.glob("LOC_val_solution.csv"))
    text = csv_path.read_text()
    csv_path.write_text("\ufeff" + text, encoding="utf-8")
    assert main(["imagenet", str(inet), str(tmp_path / "o3"), "--splits", "val", "--no-progress"]) == 0
    assert load_manifest(tmp_path / "o3")["splits"]["val"]["samples"] == len(exp["val"])
    csv_path.write_text(text, encoding="utf-16")
    r = run_cli("imagenet", str(inet), str(tmp_path / "o4"), "--splits", "val", "--no-progress")
    assert r.returncode == 2 and "not UTF-8 text" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_every_argument_has_a_help_line():
    """``python -m data_prep imagefolder --help`` listed ``src`` and ``out`` with nothing beside them (what
    SRC may be, what goes into OUT)."""
    from data_prep.cli import build_parser

    assert arguments_without_help(build_parser()) == []


def test_finalize_jobs_of_two_splits_at_once_keep_both_in_the_manifest(tmp_path, monkeypatch):
    """The finalize jobs of a train and a val split prepared into one OUT by separate jobs, at the same time:
    each read the manifest, added its split and wrote it back, so the first one's split vanished. Here the val
    finalize finds no manifest yet and waits (up to 3 s) until train's has finished: with the lock, train's
    waits for it instead, and both splits are listed."""
    import threading

    import data_prep.manifest as manifest_module

    src, out = tmp_path / "src", tmp_path / "o"
    write_imagefolder(src, ["ant", "bee"], per_class=2)
    for split in ("train", "val"):
        for task in ("0", "1"):
            assert main(["imagefolder", str(src), str(out), "--split", split, "--samples-per-shard", "1",
                         "--task-index", task, "--num-tasks", "2", "--no-progress"]) == 0
    train_done, val_read = threading.Event(), threading.Event()
    real_entry = manifest_module.split_entry

    def read_then_wait(*args, **kwargs):  # after finalize has read the manifest (here: found none)
        if threading.current_thread().name == "finalize-val":
            val_read.set()
            train_done.wait(3)
        return real_entry(*args, **kwargs)

    monkeypatch.setattr(manifest_module, "split_entry", read_then_wait)
    failures = []

    def finalize(split: str) -> None:
        try:
            manifest_module.finalize(out, [split])
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)
        if split == "train":
            train_done.set()

    val = threading.Thread(target=finalize, args=("val",), name="finalize-val")
    val.start()
    assert val_read.wait(30)
    train = threading.Thread(target=finalize, args=("train",), name="finalize-train")
    train.start()
    val.join(60)
    train.join(60)
    assert not failures
    assert sorted(load_manifest(out)["splits"]) == ["train", "val"]


def test_finalize_on_a_read_only_out_is_one_line_naming_the_file(tmp_path):
    """A read-only mount of OUT (shards copied to a read-only share before finalize): one `cannot write` line
    naming the first file finalize writes (its lock), as for data_prep's other writes; it was the OSError's
    own `[Errno 30] Read-only file system: '...'`."""
    src, out, ro = tmp_path / "src", tmp_path / "o", tmp_path / "ro"
    write_imagefolder(src, ["ant", "bee"], per_class=2)
    for task in ("0", "1"):
        assert main(["imagefolder", str(src), str(out), "--split", "train", "--samples-per-shard", "1",
                     "--task-index", task, "--num-tasks", "2", "--no-progress"]) == 0
    ro.mkdir()
    script = (f'mount --bind {out} {ro} && mount -o remount,ro,bind {ro} && '
              f'exec {sys.executable} -m data_prep finalize {ro}')
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {out} {ro}"], capture_output=True)
    if probe.returncode != 0:
        unavailable_here("unshare -m and mount are not permitted here (need root)")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and r.stderr == (f"python -m data_prep: error: {ro / '.work' / 'manifest.lock'}: cannot "
                                              f"write: Read-only file system\n"), r.stderr
    assert not (out / "manifest.json").exists()


def test_a_class_whose_every_input_is_rejected_is_said_and_counted(tmp_path, capsys):
    """A class folder of files PIL cannot read (phone photos in HEIC): every one went to rejects.jsonl and the
    class was left with no sample, said by nothing but the reject count. finalize now warns, naming it, and the
    manifest counts each split's samples per class (`class_counts`); a val split with some of the classes
    (none of the others' inputs) is no such warning."""
    src, val, out = tmp_path / "src", tmp_path / "val", tmp_path / "o"
    write_imagefolder(src, ["ant", "bee"], per_class=3)
    (src / "cow").mkdir()
    for i in range(2):
        (src / "cow" / f"IMG_{i}.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))
    assert main(["imagefolder", str(src), str(out), "--split", "train", "--samples-per-shard", "2",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (f"data_prep: warning: split 'train': every input of class 'cow' was rejected (2 files; "
            f"{out / 'rejects.jsonl'} says why), so the split has no sample of it") in err, err
    manifest = load_manifest(out)
    assert manifest["classes"] == ["ant", "bee", "cow"] and manifest["splits"]["train"]["class_counts"] == [3, 3, 0]
    # the shard of the two HEIC files has no sample, and finalize removed its empty tar: a second finalize (or a
    # rerun's) said it was "not done" and stopped
    assert main(["finalize", str(out), "--splits", "train"]) == 0 and load_manifest(out) == manifest
    assert main(["imagefolder", str(src), str(out), "--split", "train", "--samples-per-shard", "2",
                 "--no-progress"]) == 0
    assert "train: 4 of 4 shards were complete from an earlier run and kept, 0 built" in capsys.readouterr().err
    # verify counts the shards' labels against them
    assert main(["verify", str(out)]) == 0
    edited = {**manifest, "splits": {"train": {**manifest["splits"]["train"], "class_counts": [4, 2, 0]}}}
    (out / "manifest.json").write_text(json.dumps(edited))
    assert main(["verify", str(out)]) == 1
    assert (f"{out / 'manifest.json'}: splits.train.class_counts says 4 for class 'ant', the shards' labels 3 "
            f"(edited by hand?); `python -m data_prep finalize {out}` writes it again") in capsys.readouterr().err
    assert main(["finalize", str(out)]) == 0 and main(["verify", str(out)]) == 0
    capsys.readouterr()
    write_imagefolder(val, ["bee"], per_class=2, seed=1)
    assert main(["imagefolder", str(val), str(out), "--split", "val", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert load_manifest(out)["splits"]["val"]["class_counts"] == [0, 2, 0]

    # done-records of before the counts: no class_counts, no warning; a count that does not add up is a broken
    # record, named
    for rec_path in (out / ".work" / "train").glob("*.tar.json"):
        rec = json.loads(rec_path.read_text())
        del rec["labels"]
        rec_path.write_text(json.dumps(rec))
    assert main(["finalize", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "class_counts" not in load_manifest(out)["splits"]["train"]
    rec_path = out / ".work" / "val" / "val-000000.tar.json"
    rec = json.loads(rec_path.read_text())
    rec["labels"] = [[1, 2, 1]]
    rec_path.write_text(json.dumps(rec))
    assert main(["finalize", str(out)]) == 2
    assert (f"{rec_path}: done-record field 'labels' counts 1 samples written, field 'samples' 2 (edited by hand?); "
            f"rerun the prep command") in capsys.readouterr().err


def test_a_split_whose_every_input_is_rejected_ends_with_an_error(tmp_path, capsys):
    """A val folder of HEIC photos only: the split was written with 0 samples and the command (so the Slurm job
    of it) exited 0, COMPLETED with nothing to validate on. Now it names the split and exits 1; the manifest
    still lists it (and train, untouched), and a rerun once the photos are readable ends well."""
    src, out = tmp_path / "src", tmp_path / "o"
    write_imagefolder(src / "train", ["ant", "bee"], per_class=3)
    for name in ("ant", "bee"):
        (src / "val" / name).mkdir(parents=True)
        (src / "val" / name / "IMG_0.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))
    assert main(["imagefolder", str(src / "train"), str(out), "--split", "train", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["imagefolder", str(src / "val"), str(out), "--split", "val", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert (f"python -m data_prep: error: split 'val' has no sample: all 2 of its inputs were rejected "
            f"({out / 'rejects.jsonl'} says why); the manifest lists it with 0 samples, which training refuses"
            in err), err
    manifest = load_manifest(out)
    assert (manifest["splits"]["val"]["samples"], manifest["splits"]["train"]["samples"]) == (0, 6)
    assert main(["finalize", str(out)]) == 1 and "split 'val' has no sample" in capsys.readouterr().err
    assert main(["finalize", str(out), "--splits", "train"]) == 0 and "no sample" not in capsys.readouterr().err
    shutil.rmtree(src / "val")
    write_imagefolder(src / "val", ["ant", "bee"], per_class=1, seed=4)
    r = run_cli("imagefolder", str(src / "val"), str(out), "--split", "val", "--no-progress")
    assert r.returncode == 0 and "val: 2 samples in 1 shard, 0 rejected\n" in r.stdout, r.stdout + r.stderr


def test_output_folder_with_shards_this_tool_did_not_write_is_refused(tmp_path):
    """OUT holding SPLIT-NNNNNN.tar files that no data_prep wrote (no manifest.json, no .work/: a WebDataset
    ShardWriter's shards, another dataset's) was prepared into: the plan's names overwritten, the rest deleted as
    stale, exit 0, without a word. Refused now, every file as it was; with the tool's own records there the
    same folder is an OUT again."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_imagefolder(src, ["a", "b"], per_class=2)
    out.mkdir()
    for i in range(3):
        (out / f"train-{i:06d}.tar").write_bytes(b"someone else's shard %d" % i)
    (out / "README").write_text("my other dataset\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_cli("imagefolder", str(src), str(out), "--split", "train", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (f"{out}: output folder holds 3 shard-named files (train-000000.tar, ...) but no manifest.json or .work/"
            in r.stderr), r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = run_cli("imagefolder", str(src), str(out), "--split", "val", "--no-progress")  # another split: the same
    assert r.returncode == 2 and "shard-named files" in r.stderr, r.stderr
    for name in [n for n in before if n.endswith(".tar")]:
        (out / name).unlink()
    r = run_cli("imagefolder", str(src), str(out), "--split", "train", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_cli("imagefolder", str(src), str(out), "--split", "train", "--no-progress")  # its own shards: a rerun
    assert r.returncode == 0 and (out / "README").read_text() == "my other dataset\n", r.stderr
    shutil.rmtree(out / ".work")  # the advice for a broken manifest without .work/: move it aside and rerun
    (out / "manifest.json").rename(tmp_path / "manifest.json.old")
    r = run_cli("imagefolder", str(src), str(out), "--split", "train", "--no-progress")
    assert r.returncode == 0 and main(["verify", str(out)]) == 0, r.stderr


def test_a_prep_whose_plan_another_command_replaced_while_it_ran_says_so(tmp_path, monkeypatch, capsys):
    """Two prep commands of one split at once with other SRCs: the one that planned first finalized the other's
    plan, printed the other's count ("200 samples in 7 shards" of its 1,500) and exited 0, its own shards deleted
    as stale (and the other's overwritten under the same names). Now it says so, exit 2; a rerun mends the split."""
    import data_prep.prepare as prepare

    big, small, out = tmp_path / "big", tmp_path / "small", tmp_path / "out"
    write_imagefolder(big, ["a", "b"], per_class=6)
    write_imagefolder(small, ["a", "b"], per_class=2, seed=3)
    args = ["--split", "train", "--samples-per-shard", "2", "--workers", "1", "--no-progress"]
    real = prepare.run_jobs

    def run_jobs_after_the_other(*a, **kw):  # the other command plans, builds and finalizes meanwhile
        monkeypatch.setattr(prepare, "run_jobs", real)
        assert main(["imagefolder", str(small), str(out), *args]) == 0
        return real(*a, **kw)

    monkeypatch.setattr(prepare, "run_jobs", run_jobs_after_the_other)
    code = main(["imagefolder", str(big), str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and "split 'train': another prep command of this split replaced its plan while this one ran " \
        f"({out}/.work/train/plan.json now plans 2 shards from {small}, this run planned 6 shards)" in err, err
    assert main(["imagefolder", str(big), str(out), *args]) == 0  # alone: its own split, whole
    assert load_manifest(out)["splits"]["train"]["samples"] == 12 and main(["verify", str(out)]) == 0


def test_a_split_from_a_folder_named_as_another_split_is_refused(tmp_path):
    """The up-arrow mistake: `--split train` edited into `--split test`, SRC (.../train) left as it was. The test
    split held the training images, exit 0. Refused now by SRC's own name, as a wrapper folder holding only
    train/ already was; CIFAR's test/ may still become val."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_imagefolder(raw / "train", ["a", "b"], per_class=3)
    write_imagefolder(raw / "test", ["a", "b"], per_class=2, seed=5)
    args = ["--samples-per-shard", "4", "--workers", "1", "--no-progress"]
    assert run_cli("imagefolder", str(raw / "train"), str(out), "--split", "train", *args).returncode == 0
    r = run_cli("imagefolder", str(raw / "train"), str(out), "--split", "test", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{raw / 'train'}: is a split folder named 'train', but --split is 'test'; pass --split train, or the " \
        "source of the 'test' split" in r.stderr, r.stderr
    r = run_cli("imagefolder", str(raw / "test"), str(out), "--split", "train", *args)  # and the other way round
    assert r.returncode == 2 and "is a split folder named 'test', but --split is 'train'" in r.stderr, r.stderr
    from data_prep.source_hint import shard_command  # what training says of a data.root of images: a command

    hint = shard_command(raw / "test")  # that works
    assert f"`python -m data_prep imagefolder {raw / 'test'} OUT --split val`" in hint, hint
    assert "--split train`" in shard_command(raw / "train")
    assert set(load_manifest(out)["splits"]) == {"train"}
    assert run_cli("imagefolder", str(raw / "test"), str(out), "--split", "val", *args).returncode == 0


def test_output_folder_that_is_a_training_run_directory_is_refused(tmp_path):
    """A run directory (checkpoints/, wandb_run_id) given as OUT was prepared into: shards and a manifest among a
    run's checkpoints, then trained from with --data.root RUN. Refused before anything is written there; the
    same from `launch submit prep`, which runs data_prep's checks before the queue wait."""
    src, run = tmp_path / "src", tmp_path / "run"
    write_imagefolder(src, ["a", "b"], per_class=2)
    (run / "checkpoints").mkdir(parents=True)
    (run / "wandb_run_id").write_text("abc123\n")
    before = sorted(p.name for p in run.rglob("*"))
    r = run_cli("imagefolder", str(src), str(run), "--split", "train", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{run}: output folder is a training run directory (it holds checkpoints/, wandb_run_id)" in r.stderr
    assert sorted(p.name for p in run.rglob("*")) == before
    r = subprocess.run([sys.executable, "-m", "launch", "submit", "prep", "imagefolder", str(src), str(run),
                        "--tasks", "2", "--split", "train", "--dry-run"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "output folder is a training run directory" in r.stderr, r.stdout + r.stderr
    r = run_cli("imagefolder", str(src), str(run / "checkpoints"), "--split", "train", "--no-progress")
    assert r.returncode == 2 and f"{run / 'checkpoints'}: output folder is inside the training run directory {run}; " \
        in r.stderr, r.stderr
    assert sorted(p.name for p in run.rglob("*")) == before


def _sigint_blocked(_) -> bool:
    import signal

    return signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_a_ctrl_c_is_the_parents_alone_its_workers_never_see_it():
    """Ctrl-C reaches the whole process group: a worker still importing printed a KeyboardInterrupt traceback
    above the parent's one-line "interrupted" (2 runs in 6 at 0.55-0.65 s). The workers start with SIGINT
    blocked, for good; the parent, which ends them, gets it."""
    import multiprocessing
    import signal

    from data_prep.runner import map_in_processes

    got = list(map_in_processes(_sigint_blocked, range(3), 2, multiprocessing.get_context("spawn")))
    assert got == [True, True, True]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())

"""python -m data_prep imagefolder: folder and tar inputs, output contract, determinism, DALI, errors."""
import hashlib
import json
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data_prep.cli import main, parse_size
from data_prep.errors import PrepError
from data_prep.format import load_manifest, read_index, shard_paths
from tests.conftest import cifar_tar
from tests.fixtures_images import awkward_files, add_tar_member, tar_tree, write_imagefolder

CLASSES = ["cat", "dog", "zebra"]
WDS2IDX = Path(sys.executable).parent / "wds2idx"


def samples_of(out: Path, split: str) -> list[dict]:
    """Read every sample of a split back through the manifest + index (as the loaders do)."""
    m = load_manifest(out)
    res = []
    for tar in shard_paths(out, m, split):
        idx = read_index(tar.with_suffix(".idx"))
        with open(tar, "rb") as f:
            for entry in idx:
                s = {}
                for ext, (off, size) in entry.items():
                    f.seek(off)
                    s[ext] = f.read(size)
                s["shard"] = tar.name
                res.append(s)
    return res


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    files = write_imagefolder(root, CLASSES, per_class=14)
    return root, files


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    root, files = tree
    out = tmp_path_factory.mktemp("out")
    assert main(["imagefolder", str(root), str(out), "--split", "train", "--samples-per-shard", "10",
                 "--workers", "2", "--no-progress"]) == 0
    return out


def test_manifest_and_samples(tree, prepared):
    root, files = tree
    m = load_manifest(prepared)
    assert m["version"] == 1 and m["classes"] == CLASSES and m["class_names"] == CLASSES
    sp = m["splits"]["train"]
    assert sp["samples"] == 42 and sp["rejected"] == 0
    assert [s["samples"] for s in sp["shards"]] == [10, 10, 10, 10, 2]
    assert [s["name"] for s in sp["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    for s in sp["shards"]:
        data = (prepared / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    got = samples_of(prepared, "train")
    by_bytes = {v: k for k, v in files.items()}
    assert len(got) == 42
    for s in got:
        rel = by_bytes[s["jpg"]]  # passthrough: original bytes
        label = CLASSES.index(rel.split("/")[0])
        assert s["cls"] == str(label).encode() and struct.unpack("<i", s["lbl"])[0] == label
    # globally shuffled: every full shard mixes classes
    for name in {s["shard"] for s in got}:
        labels = {s["cls"] for s in got if s["shard"] == name}
        if sum(1 for s in got if s["shard"] == name) == 10:
            assert len(labels) >= 2, name


def test_tar_layout_and_keys(prepared):
    with tarfile.open(prepared / "train-000000.tar") as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    keys = [n.rsplit(".", 1)[0] for n in names[::3]]
    assert [n.rsplit(".", 1)[1] for n in names] == ["jpg", "cls", "lbl"] * 10
    assert all(n.rsplit(".", 1)[0] == keys[i // 3] for i, n in enumerate(names))
    assert all(k.startswith("train_") and len(k) == len("train_00000000") for k in keys)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.mode == 0o444 for m in members)
    every = [n.rsplit(".", 1)[0] for p in sorted(prepared.glob("train-*.tar")) for n in tarfile.open(p).getnames()[::3]]
    assert len(every) == len(set(every)) == 42


def test_index_matches_wds2idx(prepared, tmp_path):
    shard = prepared / "train-000001.tar"
    subprocess.run([str(WDS2IDX), str(shard), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert (prepared / "train-000001.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()


def test_deterministic_and_seeded(tree, prepared, tmp_path):
    root, _ = tree
    out2 = tmp_path / "again"
    assert main(["imagefolder", str(root), str(out2), "--split", "train", "--samples-per-shard", "10",
                 "--workers", "1", "--no-progress"]) == 0
    for i in range(5):
        n = f"train-{i:06d}"
        assert (out2 / f"{n}.tar").read_bytes() == (prepared / f"{n}.tar").read_bytes()
        assert (out2 / f"{n}.idx").read_bytes() == (prepared / f"{n}.idx").read_bytes()
    assert (out2 / "manifest.json").read_bytes() == (prepared / "manifest.json").read_bytes()
    out3 = tmp_path / "seed1"
    assert main(["imagefolder", str(root), str(out3), "--split", "train", "--samples-per-shard", "10",
                 "--seed", "1", "--no-progress"]) == 0
    assert (out3 / "train-000000.tar").read_bytes() != (prepared / "train-000000.tar").read_bytes()


def test_cifar_tar_with_top_dir_and_dali(tmp_path):
    out = tmp_path / "cifar"
    assert main(["imagefolder", str(cifar_tar()), str(out), "--split", "val", "--shard-size", "4MB",
                 "--no-progress"]) == 0
    m = load_manifest(out)
    assert m["classes"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    sp = m["splits"]["val"]
    assert sp["samples"] == 10000 and sp["rejected"] == 0
    assert all(3.5e6 < s["bytes"] < 5e6 for s in sp["shards"][:-1])
    for shard in sp["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
    # labels follow the sorted class names: each sample's label is its source folder's rank
    checked = 0
    for shard in sp["shards"][:2]:
        record = json.loads((out / ".work" / "val" / f"{shard['name']}.json").read_text())
        source_of = dict(record["sources"])
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    key = member.name[: -len(".cls")]
                    label = int(tar.extractfile(member).read())
                    assert m["classes"][label] == Path(source_of[key]).parent.name
                    checked += 1
    assert checked > 1000
    from nvidia.dali import fn, pipeline_def, types

    tars = [str(p) for p in shard_paths(out, m, "val")]

    @pipeline_def(batch_size=64, num_threads=2, device_id=None)
    def pipe():
        jpg, cls, lbl = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                              ext=["jpg", "cls", "lbl"], dtypes=[types.UINT8, types.UINT8, types.INT32],
                                              missing_component_behavior="error", random_shuffle=False, name="r")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, lbl

    p = pipe()
    p.build()
    seen = 0
    for _ in range(3):
        imgs, cls, lbl = p.run()
        for i in range(len(lbl)):
            label = int(lbl.at(i)[0])
            assert bytes(cls.at(i)).decode() == str(label) and 0 <= label < 10
            assert imgs.at(i).shape == (32, 32, 3)
            seen += 1
    assert seen == 192


def test_awkward_inputs_and_traversal(tmp_path):
    root = tmp_path / "odd"
    expect = {}
    for name, (data, outcome) in awkward_files().items():
        (root / "things").mkdir(parents=True, exist_ok=True)
        (root / "things" / name).write_bytes(data)
        expect[f"things/{name}"] = outcome
    write_imagefolder(root, ["plain"], per_class=3)
    (root / "README.txt").write_text("stray file at the top\n")
    (root / "plain" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    tar = tar_tree(root, tmp_path / "odd.tar", prefix="data/")
    with tarfile.open(tar, "a") as tf:
        add_tar_member(tf, "../escape.jpg", (root / "plain" / "plain_0.jpg").read_bytes())
        add_tar_member(tf, "/abs/evil.jpg", (root / "plain" / "plain_0.jpg").read_bytes())
    out = tmp_path / "out"
    assert main(["imagefolder", str(tar), str(out), "--split", "train", "--samples-per-shard", "4",
                 "--no-progress"]) == 0
    n_inputs = len(expect) + 3 + 4
    m = load_manifest(out)
    sp = m["splits"]["train"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sp["samples"] + sp["rejected"] == n_inputs and len(rejects) == sp["rejected"]
    reasons = {r["path"].split(":", 1)[1]: r["reason"] for r in rejects}
    for rel, outcome in expect.items():
        if outcome == "ok":
            assert f"data/{rel}" not in reasons, (rel, reasons.get(f"data/{rel}"))
        else:
            assert outcome in reasons[f"data/{rel}"], (rel, reasons.get(f"data/{rel}"))
    assert "traversal" in reasons["../escape.jpg"] and "absolute" in reasons["/abs/evil.jpg"]
    assert "class folder" in reasons["data/README.txt"] and "hidden" in reasons["data/plain/.DS_Store"]
    assert not (tmp_path / "escape.jpg").exists()
    assert sp["samples"] == 3 + sum(1 for o in expect.values() if o == "ok")
    from PIL import Image
    import io
    sizes = set()
    for s in samples_of(out, "train"):
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB"
        im.load()
        sizes.add(im.size)
    assert (48, 64) in sizes  # EXIF orientation 6 applied: 64x48 became upright 48x64


def test_split_merge_and_class_mismatch(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "m"
    for split in ("train", "val"):
        assert main(["imagefolder", str(root), str(out), "--split", split, "--no-progress"]) == 0
    m = load_manifest(out)
    assert sorted(m["splits"]) == ["train", "val"] and len(m["splits"]["val"]["shards"]) == 1
    other = tmp_path / "other"
    write_imagefolder(other, ["ant", "bee"], per_class=2)
    assert main(["imagefolder", str(other), str(out), "--split", "test", "--no-progress"]) == 2
    assert not list(out.glob("test-*"))  # refused before writing anything
    assert sorted(load_manifest(out)["splits"]) == ["train", "val"]


def test_top_level_source_is_where_every_split_came_from(tmp_path):
    """Train and val from two folders, prepared apart: the top level names their parent, not the last one."""
    data = tmp_path / "photos"
    for split in ("train", "val"):
        write_imagefolder(data / split, ["ant", "bee"], per_class=2)
    out = tmp_path / "out"
    for split in ("train", "val"):
        assert main(["imagefolder", str(data / split), str(out), "--split", split, "--no-progress"]) == 0
        m = load_manifest(out)
        assert m["splits"][split]["source"] == str((data / split).resolve())
    assert m["source"] == str(data.resolve())
    assert main(["finalize", str(out), "--splits", "val"]) == 0  # one split written again: the same
    assert load_manifest(out)["source"] == str(data.resolve())


@pytest.mark.parametrize("args,fragment", [
    (["imagefolder", "/nonexistent/src", "OUT", "--split", "train"], "/nonexistent/src"),
    (["imagefolder", ".", "OUT", "--split", "train", "--shard-size", "12 parsecs"], "--shard-size"),
    (["imagefolder", ".", "OUT", "--split", "a/b"], "--split"),
    (["finalize", "/nonexistent/out"], "/nonexistent/out"),
    (["finalize", "TMP", "--splits", " , "], "--splits ' , ': name the splits to finalize"),
    (["finalize", "TMP", "--splits", "train,../val"], "'../val'"),
    (["finalize", "TMP"], "nothing to finalize"),
    (["imagefolder", ".", "OUT"], "--split"),
    (["imagefolder", "GZ", "OUT", "--split", "train"], "not an uncompressed tar"),
    (["verify", "/nonexistent/out"], "/nonexistent/out/manifest.json"),
    (["imagefolder", ".", "OUT", "--split", "train", "--task-index", "3", "--num-tasks", "3"], "--task-index"),
])
def test_cli_errors_one_line_exit_2(args, fragment, tmp_path):
    import gzip
    (tmp_path / "x.tar.gz").write_bytes(gzip.compress(b"not really a tar"))
    args = [a.replace("OUT", str(tmp_path / "o")).replace("GZ", str(tmp_path / "x.tar.gz"))
            .replace("TMP", str(tmp_path)) for a in args]
    r = subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert not (tmp_path / ".work").exists()  # a finalize of a folder that is no OUT leaves nothing there
    assert fragment in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("300KB") == 300_000 and parse_size("2.5MB") == 2_500_000
    assert parse_size("1GiB") == 2**30
    for bad in ("lots", "1", "500"):  # a bare number (1 byte: a shard per image) needs its unit
        with pytest.raises(PrepError, match=r"B, KB, MB, GB, TB \(powers of 1000\) or KiB, MiB, GiB, TiB"):
            parse_size(bad)


def test_progress_line_on_stderr(tree, tmp_path, capsys):
    root, _ = tree
    assert main(["imagefolder", str(root), str(tmp_path / "p"), "--split", "train", "--workers", "2",
                 "--samples-per-shard", "20"]) == 0
    err = capsys.readouterr().err
    assert "42/42" in err and "img/s" in err and "MB/s" in err and "ETA" in err


def test_done_records_map_keys_to_sources(tree, prepared):
    root, files = tree
    recs = [json.loads(p.read_text()) for p in sorted((prepared / ".work" / "train").glob("train-*.tar.json"))]
    mapping = dict(kv for r in recs for kv in r["sources"])
    assert len(mapping) == 42
    for shard in sorted(prepared.glob("train-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers()[::3]:
                key = m.name[: -len(".jpg")]
                src = Path(mapping[key])
                assert tf.extractfile(m).read() == src.read_bytes()
                assert src.relative_to(root).as_posix() in files


def test_source_with_several_split_folders_uses_the_named_one(tmp_path):
    src = tmp_path / "src"
    write_imagefolder(src / "train", ["a", "b"], per_class=3)
    write_imagefolder(src / "val", ["a", "b"], per_class=2, seed=5)
    (src / "val" / "a" / ".hidden").write_bytes(b"x")
    for split, n in (("train", 6), ("val", 2 * 2)):
        assert main(["imagefolder", str(src), str(tmp_path / "o"), "--split", split, "--no-progress"]) == 0
        sp = load_manifest(tmp_path / "o")["splits"][split]
        assert sp["samples"] == n and sp["rejected"] == (1 if split == "val" else 0)
    assert load_manifest(tmp_path / "o")["classes"] == ["a", "b"]


def test_a_tar_member_appended_again_replaces_the_earlier_one(tmp_path):
    """``tar -rf`` with a path already in the archive appends a second member of that name; extracting
    keeps the last, but both became samples (the old picture too, under a second key)."""
    from tests.fixtures_images import jpeg_bytes, photos

    root = tmp_path / "src"
    files = write_imagefolder(root, ["a", "b"], per_class=3)
    tar = tar_tree(root, tmp_path / "src.tar")
    newer = [jpeg_bytes(p) for p in photos(2, (80, 60), seed=7)]
    with tarfile.open(tar, "a") as tf:
        for data in newer:
            add_tar_member(tf, "a/a_1.jpg", data)
    with tarfile.open(tar) as tf:
        last = [m for m in tf.getmembers() if m.name == "a/a_1.jpg"][-1]
        assert tf.extractfile("a/a_1.jpg").read() == newer[1]  # what extracting the archive gives
    out = tmp_path / "out"
    assert main(["imagefolder", str(tar), str(out), "--split", "train", "--no-progress"]) == 0
    sp = load_manifest(out)["splits"]["train"]
    assert sp["samples"] == 6 and sp["rejected"] == 2
    got = sorted(s["jpg"] for s in samples_of(out, "train"))
    assert got == sorted([d for rel, d in files.items() if rel != "a/a_1.jpg"] + [newer[1]])
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["path"], r["reason"]) for r in rejects] == \
        [(f"{tar}:a/a_1.jpg", f"replaced by a later member of the same name at byte {last.offset}")] * 2


def test_a_class_folder_name_that_is_not_utf8_is_an_error(tmp_path):
    """A Latin-1 folder name (``caf\\xe9``) became the class ``caf\\udce9``: an escape stored in manifest.json
    that is no UTF-8 text and does not round-trip. Folder and tar: one line naming the folder's bytes."""
    root = tmp_path / "src"
    write_imagefolder(root, ["cafe", "tea"], per_class=2)
    os.rename(os.fsencode(root / "cafe"), os.fsencode(root) + b"/caf\xe9")
    tar = tar_tree(root, tmp_path / "src.tar", prefix="train/")
    with tarfile.open(tar) as tf:
        assert os.fsencode(tf.getnames()[0]).startswith(b"train/caf\xe9")  # raw bytes, as tar -cf stores them
    for src, where in ((root, f"{root}/caf\\xe9"), (tar, f"{tar}:train/caf\\xe9")):
        out = tmp_path / f"o_{src.name}"
        r = subprocess.run([sys.executable, "-m", "data_prep", "imagefolder", str(src), str(out), "--split", "train",
                            "--no-progress"], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"error: {where}: class folder name b'caf\\xe9' is not valid UTF-8" in r.stderr, r.stderr
        assert "rename" in r.stderr and not out.exists()

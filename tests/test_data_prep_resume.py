"""Resume after SIGKILL, Slurm-style task slices + finalize, verify, and re-encode mode."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from data_prep.cli import main
from data_prep.done_records import FIELDS
from data_prep.format import done_record_path, load_manifest
from data_prep.output_status import describe
from tests.broken_record_checks import array_and_single, finalize_errors, rerun_task_1
from tests.conftest import cifar_tar
from tests.fixtures_images import write_imagefolder
from tests.test_data_prep_imagefolder import samples_of

REPO = Path(__file__).resolve().parents[1]


def outputs(out: Path) -> dict[str, bytes]:
    """Every visible output file (shards, indexes, manifest, rejects) by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    write_imagefolder(root, ["a", "b", "c", "d"], per_class=10)
    return root


def test_kill_midway_then_resume_is_identical(tmp_path):
    args = ["imagefolder", str(cifar_tar()), "SPLIT", "--split", "test", "--samples-per-shard", "500",
            "--max-side", "24", "--workers", "1", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", *[a.replace("SPLIT", str(killed)) for a in args]],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    work = killed / ".work" / "test"
    deadline = time.monotonic() + 60
    while not list(work.glob("test-000000.tar.json")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    done = sorted(p.name for p in work.glob("*.tar.json"))
    assert 1 <= len(done) < 20
    first = killed / "test-000000.tar"
    stamp = first.stat().st_mtime_ns
    assert main([a.replace("SPLIT", str(killed)) for a in args]) == 0
    assert first.stat().st_mtime_ns == stamp  # verified and skipped, not rewritten
    clean = tmp_path / "clean"
    assert main([a.replace("SPLIT", str(clean)) for a in args]) == 0
    assert outputs(killed) == outputs(clean)
    assert not list(killed.glob("*.tmp"))


def _spawned_workers(pid: int) -> list[int]:
    """Pids of the multiprocessing workers that process ``pid`` spawned."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"spawn_main" in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _prep_with_two_workers(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "data_prep", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_a_shard(proc: subprocess.Popen, out: Path) -> None:
    """Until the run has finished a shard of the test split (its workers are at work by then). Generous:
    under a loaded CI machine the 10,000 images' scan and first shard took most of a minute."""
    deadline = time.monotonic() + 240
    while not list((out / ".work" / "test").glob("test-0000*.tar.json")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_killed_worker_ends_the_run_with_an_error_and_the_rerun_resumes(tmp_path):
    """One worker SIGKILLed (as by the out-of-memory killer): ``multiprocessing.Pool`` lost its shard and
    the parent waited for it forever, at 0% CPU, with no message (under Slurm, until the time limit). Now
    the run ends with one line and exit 2, and the same command resumes to a sound dataset."""
    out = tmp_path / "out"
    args = ["imagefolder", str(cifar_tar()), str(out), "--split", "test", "--samples-per-shard", "500",
            "--max-side", "24", "--workers", "2", "--no-progress"]
    proc = _prep_with_two_workers(args)
    try:
        _wait_for_a_shard(proc, out)
        workers = _spawned_workers(proc.pid)
        assert len(workers) == 2, workers
        # both stopped first: a test process descheduled on a loaded machine let the run finish its 20 shards
        # before the kill, which then hit an idle pool (exit 0). With fewer than 16 shards done some are not
        # yet handed out (at most 4 ahead), so the killed worker surely breaks the pool
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        done = len(list((out / ".work" / "test").glob("test-0000*.tar.json")))
        assert proc.poll() is None and done < 16, (done, proc.poll())
        os.kill(workers[0], signal.SIGKILL)
        os.kill(workers[1], signal.SIGCONT)
        _, err = proc.communicate(timeout=240)  # the hang this guards against was forever
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, err[-2000:]
    assert "error: a worker process ended abruptly while building shards" in err, err[-2000:]
    assert "Traceback" not in err
    assert not (out / "manifest.json").exists()
    assert main(args) == 0
    assert main(["verify", str(out)]) == 0
    assert load_manifest(out)["splits"]["test"]["samples"] == 10000


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is no zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_workers_end_with_a_parent_killed_outright(tmp_path):
    """``kill -9`` of the prep command alone (the out-of-memory killer picks the parent, or a user kills its
    pid): its spawned workers stayed, blocked writing a result to the dead parent, holding their memory."""
    out = tmp_path / "out"
    args = ["imagefolder", str(cifar_tar()), str(out), "--split", "test", "--samples-per-shard", "500",
            "--max-side", "24", "--workers", "2", "--no-progress"]
    proc = _prep_with_two_workers(args)
    workers = []
    try:
        _wait_for_a_shard(proc, out)
        workers = _spawned_workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)  # the parent alone, not its process group
        proc.wait()
        deadline = time.monotonic() + 10
        while alive := [w for w in workers if _running(w)]:
            assert time.monotonic() < deadline, f"workers {alive} outlived their parent"
            time.sleep(0.05)
    finally:
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert main(args) == 0  # and the rerun resumes to a sound dataset
    assert main(["verify", str(out)]) == 0


def test_corrupted_done_shard_is_rebuilt(tree, tmp_path, capsys):
    """40 images in 5 shards; one flipped byte: the rerun rebuilds that shard alone, and says so."""
    out = tmp_path / "o"
    argv = ["imagefolder", str(tree), str(out), "--split", "train", "--samples-per-shard", "8", "--no-progress"]
    assert main(argv) == 0
    assert "earlier run" not in capsys.readouterr().err
    before = outputs(out)
    with open(out / "train-000002.tar", "r+b") as f:
        f.seek(700)
        b = f.read(1)
        f.seek(700)
        f.write(bytes([b[0] ^ 0xFF]))
    assert main(argv) == 0
    assert outputs(out) == before
    assert "train: 4 of 5 shards were complete from an earlier run and kept, 1 built" in capsys.readouterr().err


def _broken(good: dict) -> list[tuple[str, str]]:
    """(what the error says, the record's text) for the ways a hand edit breaks a done-record: not JSON, not
    an object, each field the readers take missing or of another type, another shard's name, a bad reject."""
    wrong = {"a string": 7, "a count (an integer >= 0)": "8", "a list": {"path": "x"}}
    cases = [("is not valid JSON", json.dumps(good)[:-1]), ("is not a JSON object", json.dumps([good]))]
    for key, kind in FIELDS.items():
        cases.append((f"has no field {key!r}", json.dumps({k: v for k, v in good.items() if k != key})))
        cases.append((f"field {key!r} is {json.dumps(wrong[kind])}, not {kind}",
                      json.dumps({**good, key: wrong[kind]})))
    return cases + [
        ("field 'samples' is true, not a count (an integer >= 0)", json.dumps({**good, "samples": True})),
        ("field 'samples' is -1, not a count", json.dumps({**good, "samples": -1})),
        ("field 'name' is \"train-000000.tar\", not this shard's 'train-000001.tar'",
         json.dumps({**good, "name": "train-000000.tar"})),
        ("field 'index_sha256' is 7, not a string", json.dumps({**good, "index_sha256": 7})),
        ("field 'rejects' item 0 is not an object", json.dumps({**good, "rejects": [{"path": "x"}]})),
    ]


def test_a_broken_done_record_stops_finalize_in_one_line_and_a_rerun_rebuilds_its_shard(tree, tmp_path, capsys):
    """A done-record edited by hand: finalize ended in a traceback (KeyError: 'name', a TypeError for a
    wrong type) and `launch status` counted the shard as done. Now finalize names the record and the field
    in one line, status counts the shard as not done, and the task's rerun rebuilds it."""
    out, single = array_and_single(tree, tmp_path)
    record = done_record_path(out, "train", "train-000001.tar")
    good = record.read_text()
    assert describe(out)[0] == f"shards       {out}: train 5 of 5 done"
    fix = "rerun the prep command: it rebuilds shard train-000001.tar and writes its record again"
    for says, line in finalize_errors(out, record, "done-record", _broken(json.loads(good)), fix, capsys):
        assert describe(out)[0] == f"shards       {out}: train 4 of 5 done", says
    record.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "name"}))
    err = rerun_task_1(tree, out, capsys)
    assert "train task 1/2: 1 of 2 shards was complete from an earlier run and kept, 1 built" in err, err
    assert record.read_text() == good
    assert main(["finalize", str(out)]) == 0
    assert outputs(out) == outputs(single)


def test_a_rerun_rebuilds_the_shard_of_a_broken_done_record(tree, tmp_path, capsys):
    """With manifest.json there, a rerun reads the done-records to tell whether the manifest still lists its
    plan's shards: a record without `name` was a KeyError traceback there; one whose `samples` was a string
    passed the rerun's own check (size and sha256 match) and failed in finalize's sum, as did a negative one
    (finalize's `32 written + 0 rejected != 40 inputs`, and every rerun kept the shard)."""
    out = tmp_path / "o"
    argv = ["imagefolder", str(tree), str(out), "--split", "train", "--samples-per-shard", "8", "--no-progress"]
    assert main(argv) == 0
    before = outputs(out)
    record = done_record_path(out, "train", "train-000002.tar")
    good = json.loads(record.read_text())
    for broken in ({k: v for k, v in good.items() if k != "name"}, {**good, "samples": "8"}, {**good, "samples": -1},
                   [good]):
        record.write_text(json.dumps(broken))
        capsys.readouterr()
        assert main(argv) == 0, broken
        assert "train: 4 of 5 shards were complete from an earlier run and kept, 1 built" in capsys.readouterr().err
        assert outputs(out) == before and json.loads(record.read_text()) == good


def test_array_tasks_then_finalize_equals_single_run(tree, tmp_path, monkeypatch, capsys):
    single = tmp_path / "single"
    common = ["--split", "train", "--samples-per-shard", "6", "--workers", "1", "--no-progress"]
    assert main(["imagefolder", str(tree), str(single), *common]) == 0
    arr = tmp_path / "array"
    assert main(["imagefolder", str(tree), str(arr), *common, "--task-index", "0", "--num-tasks", "3"]) == 0
    n_shards = len(list(single.glob("train-*.tar")))
    mine = len(range(0, n_shards, 3))
    err = capsys.readouterr().err  # it said "wrote", counting shards kept from a run before, and nothing of --splits
    assert f"train task 0/3: this task's {mine} of the split's {n_shards} shards {'is' if mine == 1 else 'are'} done\n" in err, err
    assert f"after all tasks finish, run `python -m data_prep finalize {arr} --splits train`" in err, err
    assert main(["finalize", str(arr)]) == 2
    assert "not done" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    for i in (2, 1):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
        assert main(["imagefolder", str(tree), str(arr), *common, "--finalize-queued"]) == 0
        err = capsys.readouterr().err  # under `launch submit prep`: the finalize job is queued already
        assert "the queued finalize job writes the manifest once every array task succeeded" in err, err
        assert "data_prep finalize" not in err
    assert not (arr / "manifest.json").exists()
    assert main(["finalize", str(arr)]) == 0
    assert outputs(arr) == outputs(single)
    m = load_manifest(arr)
    assert [s["sha256"] for s in m["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in load_manifest(single)["splits"]["train"]["shards"]]


def test_array_tasks_started_in_other_folders_share_one_plan(tree, tmp_path, monkeypatch, capsys):
    """SRC typed relative in one task and absolute in another (or symlinked): the same plan, so finalize
    lists every shard and a rerun keeps them all. A `cp -a` copy at another path: a later task renames the
    inputs of the shards built from the first (``older_plans.respell_records``). A `cp -r` copy (new times)
    is another plan: finalize says so instead of asking to run the remaining tasks (which never ends it)."""
    common = ["--split", "train", "--samples-per-shard", "6", "--workers", "1", "--no-progress"]
    single = tmp_path / "single"
    assert main(["imagefolder", str(tree), str(single), *common]) == 0
    arr = tmp_path / "array"
    monkeypatch.chdir(tree.parent)
    assert main(["imagefolder", tree.name, str(arr), *common, "--task-index", "0", "--num-tasks", "2"]) == 0
    monkeypatch.chdir(tree)
    assert main(["imagefolder", ".", str(arr), *common, "--task-index", "1", "--num-tasks", "2"]) == 0
    assert main(["finalize", str(arr)]) == 0
    assert outputs(arr) == outputs(single)
    capsys.readouterr()
    assert main(["imagefolder", str(tree) + "/", str(arr), *common]) == 0  # everything kept: nothing rebuilt
    assert "rebuilt" not in capsys.readouterr().err and outputs(arr) == outputs(single)

    for how in ("-a", "-r"):
        copy = tmp_path / f"node-b{how}" / "data"
        copy.parent.mkdir()
        subprocess.run(["cp", how, str(tree), str(copy)], check=True)
        apart = tmp_path / f"apart{how}"
        assert main(["imagefolder", str(tree), str(apart), *common, "--task-index", "0", "--num-tasks", "2"]) == 0
        assert main(["imagefolder", str(copy), str(apart), *common, "--task-index", "1", "--num-tasks", "2"]) == 0
        if how == "-a":
            assert main(["finalize", str(apart)]) == 0
            assert outputs(apart) == {**outputs(single), "manifest.json": outputs(apart)["manifest.json"]}
    capsys.readouterr()
    assert main(["finalize", str(apart)]) == 2
    err = capsys.readouterr().err
    n = len(range(0, len(list(single.glob("train-*.tar"))), 2))
    assert f"{n} of them were built to another plan than {apart}/.work/train/plan.json" in err, err
    assert "every task must read the same SRC path" in err, err


def test_shards_built_when_a_relative_src_was_not_made_absolute_are_kept(tree, tmp_path, monkeypatch, capsys):
    """A data_prep of before 2026-12-07 named inputs by SRC as typed, and the name is in the plan hash: the
    rerun of a relative-SRC command after the upgrade rebuilt every shard and took the split out of the
    manifest. Their records are renamed to the absolute SRC and the shards kept (byte for byte, same files)."""
    common = ["--split", "train", "--samples-per-shard", "6", "--workers", "1", "--no-progress"]
    single = tmp_path / "single"
    assert main(["imagefolder", str(tree), str(single), *common]) == 0
    out = tmp_path / "out"
    monkeypatch.chdir(tree.parent)
    with monkeypatch.context() as before:  # the older data_prep: SRC as typed
        before.setattr("data_prep.cli.os.path.abspath", lambda p: p)
        assert main(["imagefolder", tree.name, str(out), *common]) == 0
    rec = json.loads(done_record_path(out, "train", "train-000000.tar").read_text())
    assert rec["sources"][0][1].startswith(f"{tree.name}/"), rec["sources"][0]
    inodes = {p.name: p.stat().st_ino for p in out.glob("train-*")}
    capsys.readouterr()
    assert main(["imagefolder", tree.name, str(out), *common]) == 0
    err = capsys.readouterr().err
    n = len(inodes) // 2
    assert (f"data_prep: split 'train': {n} of its {n} shards were built from SRC named another way (prefix '' "
            f"where this run's is '{tree.parent}/': a data_prep of before 2026-12-07 named the inputs by SRC as "
            "typed, or a task read a copy at another path); the same inputs (names, sizes, times), kept") in err, err
    assert "no longer lists" not in err and "rebuilt" not in err, err
    assert {p.name: p.stat().st_ino for p in out.glob("train-*")} == inodes  # not one written again
    assert outputs(out) == outputs(single)
    rec = json.loads(done_record_path(out, "train", "train-000000.tar").read_text())
    assert rec["sources"][0][1].startswith(f"{tree}/"), rec["sources"][0]


def test_a_rerun_with_other_settings_unlists_the_split_until_it_is_finalized(tree, tmp_path, capsys):
    """Shards are rebuilt in place: an array task of a rerun with another seed replaced half of them while
    manifest.json still listed the old ones, sizes alike (10 KiB records), so the loaders read a mix (some
    images twice, some never). The split leaves the manifest when its rebuild starts; other splits stay."""
    from pipeline.data.shards import ShardSet
    from pipeline.errors import ConfigError

    out = tmp_path / "o"
    common = ["--samples-per-shard", "6", "--workers", "1", "--no-progress"]
    assert main(["imagefolder", str(tree), str(out), "--split", "train", *common]) == 0
    assert main(["imagefolder", str(tree), str(out), "--split", "val", *common]) == 0
    manifest = (out / "manifest.json").read_bytes()
    assert main(["imagefolder", str(tree), str(out), "--split", "train", *common]) == 0  # same plan: kept
    assert (out / "manifest.json").read_bytes() == manifest
    capsys.readouterr()
    other = ["imagefolder", str(tree), str(out), "--split", "train", *common, "--seed", "5", "--num-tasks", "2"]
    assert main([*other, "--task-index", "0"]) == 0
    assert capsys.readouterr().err.startswith(
        f"data_prep: {out / 'manifest.json'} no longer lists split 'train' until it is finalized again (this run, or "
        f"`python -m data_prep finalize {out}` after array tasks): its shards are being rebuilt with other settings "
        f"or inputs\n")
    assert sorted(load_manifest(out)["splits"]) == ["val"]
    with pytest.raises(ConfigError, match=r"split 'train' is not in .* data_prep has not finished it .* finalize"):
        ShardSet(out, "train")
    assert len(ShardSet(out, "val")) == 40
    assert main([*other, "--task-index", "1"]) == 0
    assert main(["finalize", str(out)]) == 0
    ref = tmp_path / "ref"
    assert main(["imagefolder", str(tree), str(ref), "--split", "train", *common, "--seed", "5"]) == 0
    assert load_manifest(out)["splits"]["train"] == load_manifest(ref)["splits"]["train"]
    images = [s["jpg"] for s in samples_of(out, "train")]
    assert len(images) == len(set(images)) == 40
    assert main(["verify", str(out)]) == 0


def test_verify_catches_a_flipped_byte(tree, tmp_path):
    out = tmp_path / "o"
    assert main(["imagefolder", str(tree), str(out), "--split", "train", "--samples-per-shard", "12",
                 "--no-progress"]) == 0
    ok = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out)], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    path = out / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0x01
    path.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out)], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "train-000001.tar" in bad.stderr and "sha256" in bad.stderr
    assert "train-000000.tar" not in bad.stderr
    # a changed shard has all its samples decoded: the damaged one is named by its position in the shard
    from data_prep.format import read_index
    offset, size = read_index(out / "train-000001.idx")[7]["jpg"]
    data[offset:offset + size] = bytes(size)
    path.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out)], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "train/train-000001.tar: sample 7 does not decode: cannot identify image " \
        "file\n" in bad.stderr, bad.stderr  # without PIL's <_io.BytesIO object at 0x...>
    assert "sample" not in bad.stderr.replace("sample 7 ", "").replace("decoding all its samples", ""), bad.stderr


def test_reencode_mode_bounds_size(tree, tmp_path):
    out = tmp_path / "o"
    assert main(["imagefolder", str(tree), str(out), "--split", "train", "--max-side", "40", "--quality", "75",
                 "--no-progress"]) == 0
    m = load_manifest(out)
    assert m["options"]["mode"] == "reencode" and m["options"]["max_side"] == 40
    # a second split in passthrough mode: the top level keeps only what both share (it said passthrough)
    assert main(["imagefolder", str(tree), str(out), "--split", "val", "--no-progress"]) == 0
    m = load_manifest(out)
    assert m["splits"]["train"]["options"]["mode"] == "reencode" and m["splits"]["val"]["options"]["mode"] == "passthrough"
    assert "mode" not in m["options"] and "max_side" not in m["options"] and m["options"]["seed"] == 0
    got = samples_of(out, "train")
    assert len(got) == 40
    for s in got:
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (40, 30)


def test_verify_catches_an_index_entry_that_points_at_another_sample(tree, tmp_path):
    """Two index lines swapped (the same members, other samples' data): DALI would read sample 3's image
    under sample 4's key and label. verify said OK; it now rebuilds the index from the tar's members."""
    out = tmp_path / "o"
    assert main(["imagefolder", str(tree), str(out), "--split", "train", "--samples-per-shard", "12",
                 "--no-progress"]) == 0
    assert main(["verify", str(out)]) == 0
    idx = out / "train-000002.idx"
    lines = idx.read_text().splitlines(keepends=True)
    lines[4], lines[5] = lines[5], lines[4]  # header is line 1: samples 3 and 4
    idx.write_text("".join(lines))
    bad = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out)], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode == 1, bad.stderr
    assert "train/train-000002.tar: index train-000002.idx does not match the tar's members from line 5" in bad.stderr


@pytest.mark.parametrize("as_tar", [False, True])
def test_an_input_edited_in_place_with_the_same_size_is_rebuilt(tmp_path, as_tar):
    """The plan held each input's size but not its modification time: a photo replaced by another of the
    same byte size kept its old picture in the finished shard on a rerun (resume), silently."""
    from tests.fixtures_images import jpeg_of_size, photos, tar_tree

    root = tmp_path / "src"
    write_imagefolder(root, ["a", "b", "c"], per_class=4)
    edited = root / "b" / "b_2.jpg"
    src = tar_tree(root, tmp_path / "src.tar") if as_tar else root
    out = tmp_path / "o"
    argv = ["imagefolder", str(src), str(out), "--split", "train", "--samples-per-shard", "5", "--no-progress"]
    assert main(argv) == 0
    old = edited.read_bytes()
    new = jpeg_of_size(photos(1, (80, 60), seed=9)[0], len(old))
    assert new != old and len(new) == len(old)
    edited.write_bytes(new)
    st = edited.stat()
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # an edit a second later
    if as_tar:
        tar_tree(root, tmp_path / "src.tar")  # re-created: same member offsets and sizes, new member mtime
    assert main(argv) == 0
    got = [s["jpg"] for s in samples_of(out, "train")]
    assert new in got and old not in got
    clean = tmp_path / "clean"
    assert main([a if a != str(out) else str(clean) for a in argv]) == 0
    assert outputs(out) == outputs(clean)


@pytest.mark.parametrize("finalized", [True, False])
def test_a_rerun_of_shards_built_before_mtimes_were_planned_says_why_they_are_rebuilt(tree, tmp_path, monkeypatch,
                                                                                       capsys, finalized):
    """A data_prep of before 2026-12-03 hashed no input mtimes into the plan: after an upgrade, a rerun of the
    same command rebuilds each of its shards once (to the same bytes). It said 'other settings or inputs' for a
    finalized split, nothing for an unfinished one; now it names the older data_prep, once."""
    out = tmp_path / "o"
    argv = ["imagefolder", str(tree), str(out), "--split", "train", "--samples-per-shard", "8", "--workers", "1",
            "--no-progress"]
    with monkeypatch.context() as old:  # the older version's plan hashes: no mtime in them
        old.setattr("data_prep.plan._mtime", lambda items, i: -1)
        assert main(argv) == 0
    before = outputs(out)
    if not finalized:  # killed before its finalize
        (out / "manifest.json").unlink()
        del before["manifest.json"]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    why = ("5 of its 5 shards were built by a data_prep of before 2026-12-03, which did not record the inputs' "
           "modification times, and are rebuilt once")
    assert err.count(why) == 1, err
    assert "other settings or inputs" not in err
    if finalized:
        assert "no longer lists split 'train' until it is finalized again" in err
    else:
        assert err.startswith(f"data_prep: split 'train': {why}")
    assert {k: v for k, v in outputs(out).items() if k in before} == before  # the same bytes
    assert main(argv) == 0
    assert "built by a data_prep of before" not in capsys.readouterr().err  # once


def test_the_progress_line_of_a_rerun_counts_kept_shards_as_done_not_as_speed(tmp_path, capsys):
    """A rerun that kept every shard printed `50000/50000 (100.0%) 251449.0 img/s 0.0 MB/s`: the kept shards'
    images counted into the rate. They are done (the count and percentage), not built (no rate)."""
    src = tmp_path / "src"
    write_imagefolder(src, ["a", "b"], per_class=6)
    args = ["imagefolder", str(src), str(tmp_path / "out"), "--split", "train", "--samples-per-shard", "4",
            "--workers", "1"]
    assert main(args) == 0
    first = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: 12/12")]
    assert first and " img/s " in first[-1], first
    assert main(args) == 0
    again = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: 12/12")]
    assert again == ["train: 12/12 (100.0%) kept from an earlier run"], again
    (tmp_path / "out" / "train-000001.tar").unlink()  # one shard to build again: a rate of the built ones alone
    assert main(args) == 0
    mixed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: 12/12")]
    assert mixed and " img/s " in mixed[-1], mixed

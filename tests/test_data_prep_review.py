"""data_prep on awkward real-world trees and failing outputs: layout detection, symlinks, disk full, resume."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from data_prep.cli import main
from data_prep.format import load_manifest
from tests.conftest import REPO, unavailable_here
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


def test_disk_full_is_one_line_naming_the_shard(tmp_path):
    """Writing a shard into /dev/full fails with ENOSPC, like a full disk."""
    src, out = tmp_path / "src", tmp_path / "o"
    write_imagefolder(src, ["a", "b"], per_class=3)
    out.mkdir()
    (out / "train-000000.tar.tmp").symlink_to("/dev/full")
    r = run_cli("imagefolder", str(src), str(out), "--split", "train", "--workers", "1", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"{out / 'train-000000.tar'}: cannot write shard: No space left on device" in r.stderr
    assert not (out / "train-000000.tar").exists() and not (out / "manifest.json").exists()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    r = run_cli("imagefolder", str(src), str(blocked / "o"), "--split", "train", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(blocked) in r.stderr


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
    for name in ("train-000007.tar.tmp", "train-000007.idx.tmp"):
        (out / name).write_bytes(b"\0" * 4096)
    (out / "val-000007.tar.tmp").write_bytes(b"other split")
    assert main(["imagefolder", str(src), str(out), "--split", "train", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.tmp")) == ["val-000007.tar.tmp"]
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


def test_class_mismatch_names_the_classes(tmp_path, capsys):
    src, val, out = tmp_path / "src", tmp_path / "val", tmp_path / "o"
    write_imagefolder(src, ["ant", "bee", "cat"], per_class=2)
    write_imagefolder(val, ["ant", "cat"], per_class=1)
    assert main(["imagefolder", str(src), str(out), "--split", "train", "--no-progress"]) == 0
    assert main(["imagefolder", str(val), str(out), "--split", "val", "--no-progress"]) == 2
    assert "only in the existing: ['bee']" in capsys.readouterr().err


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

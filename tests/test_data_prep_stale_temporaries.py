"""Temp files of data_prep's atomic writes left by a ``kill -9`` are removed when the split completes.

``runner.write_bytes_atomic`` writes ``.NAME.<16 hex>.tmp`` beside NAME and renames it into place: a done-record
(``OUT/.work/<split>/.val-000002.tar.json.<hex>.tmp``), plan.json, classes.json, the columns file
(``OUT/.val.columns.npy.<hex>.tmp``, ~31 MB per kill on ImageNet), manifest.json, rejects.jsonl. A kill between
its open and its rename left that file for good: a successful rerun, ``finalize`` and ``verify`` kept it, as the
finalize cleanup swept only the shards' own temporaries. They are now swept with those, and like those only
where no live writer holds them (each writer holds an ``flock`` on its temp file until the rename: another command
writing the same done-record at once keeps its own).
"""
from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.runner import write_bytes_atomic
from tests.prep_fixtures import ARGS, SHARDS, SPLIT, clean_outputs, outputs, photo_folder

REPO = Path(__file__).resolve().parents[1]

# `python -m data_prep ARGS...` that stops at the rename of write_bytes_atomic's temp file of NAME (written,
# fsynced, open, locked): with MODE "kill" it SIGKILLs itself there (what a kill -9 at that moment leaves); with
# "pause" it makes the file PAUSED and waits for the file GO (a live writer of that temp file meanwhile).
STOPPING = """
import os, runpy, signal, sys, time
from pathlib import Path
mode, name, paused, go = sys.argv[1:5]
real = os.replace
def replace(src, dst, *a, **k):
    if os.path.basename(os.fspath(dst)) == name and os.path.basename(os.fspath(src)).startswith("." + name + "."):
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        Path(paused).write_text(os.fspath(src))
        deadline = time.monotonic() + 120
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.02)
    return real(src, dst, *a, **k)
os.replace = replace
sys.argv = ["data_prep", *sys.argv[5:]]
runpy.run_module("data_prep", run_name="__main__", alter_sys=True)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def temporaries(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return photo_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory) -> dict[str, bytes]:
    return clean_outputs(src, tmp_path_factory)


def _cmd(src: Path, out: Path) -> list[str]:
    return ["imagefolder", str(src), str(out), *ARGS]


def _killed_at(name: str, src: Path, out: Path, tmp_path: Path) -> str:
    """Run the command, SIGKILLed at the rename of its temp file of `name`; return the temp file it left."""
    r = subprocess.run([sys.executable, "-c", STOPPING, "kill", name, str(tmp_path / "p"), str(tmp_path / "g"),
                        *_cmd(src, out)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == -9, (name, r.returncode, r.stderr)
    left = [n for n in temporaries(out) if Path(n).name.startswith(f".{name}.")]
    assert len(left) == 1, (name, temporaries(out))
    return left[0]


def test_temporaries_of_killed_writers_are_removed_by_the_rerun(src, clean, tmp_path):
    """Killed (SIGKILL) at the rename of a done-record, then of the columns file, of rejects.jsonl, of
    manifest.json: each left its temp file; the rerun that completes the split removes them all (and a plan.json
    and classes.json temp file a kill left, made here by hand), and OUT is byte-identical to an uninterrupted run."""
    out = tmp_path / "o"
    left = [_killed_at(name, src, out, tmp_path)
            for name in (f"{SPLIT}-000002.tar.json", f"{SPLIT}.columns.npy", "rejects.jsonl", "manifest.json")]
    assert left[0].startswith(f".work/{SPLIT}/.{SPLIT}-000002.tar.json.") and left[1].startswith(f".{SPLIT}.columns")
    work = out / ".work" / SPLIT
    (work / ".plan.json.0123456789abcdef.tmp").write_text('{"half": ')  # killed mid-write: half a file
    (work / ".classes.json.fedcba9876543210.tmp").write_bytes(b"")
    (work / f".{SPLIT}-000004.tar.json.00000000deadbeef.tmp").write_text("{")
    (out / f".{SPLIT}.columns.npy.0123456789abcdef.tmp").write_bytes(b"\x93NUMPY")
    assert len(temporaries(out)) >= 6, temporaries(out)
    assert main(_cmd(src, out)) == 0
    assert temporaries(out) == []
    assert outputs(out) == clean


def test_finalize_removes_them_too(src, clean, tmp_path):
    """`finalize` (after array tasks) sweeps them as the rerun does; `verify` then passes."""
    out = tmp_path / "o"
    assert main(_cmd(src, out)) == 0
    planted = [out / ".work" / SPLIT / f".{SPLIT}-000001.tar.json.1111111111111111.tmp",
               out / f".{SPLIT}.columns.npy.2222222222222222.tmp",
               out / ".manifest.json.3333333333333333.tmp", out / ".rejects.jsonl.4444444444444444.tmp"]
    for p in planted:
        p.write_bytes(b"\0" * 100)
    r = subprocess.run([sys.executable, "-m", "data_prep", "finalize", str(out)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert temporaries(out) == []
    assert outputs(out) == clean
    assert subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out)], cwd=REPO, env=_env(),
                          capture_output=True).returncode == 0


def test_a_temporary_a_live_writer_holds_is_kept(src, clean, tmp_path):
    """A temp file whose writer still holds its flock (held here by the test) is another command's, still
    writing: the cleanup keeps it; the same file abandoned (lock dropped) is removed by the next run."""
    out = tmp_path / "o"
    assert main(_cmd(src, out)) == 0
    held = [out / ".work" / SPLIT / f".{SPLIT}-000003.tar.json.aaaaaaaaaaaaaaaa.tmp",
            out / ".work" / SPLIT / ".plan.json.bbbbbbbbbbbbbbbb.tmp",
            out / f".{SPLIT}.columns.npy.cccccccccccccccc.tmp", out / ".manifest.json.dddddddddddddddd.tmp"]
    abandoned = [out / ".work" / SPLIT / f".{SPLIT}-000000.tar.json.eeeeeeeeeeeeeeee.tmp",
                 out / f".{SPLIT}.columns.npy.ffffffffffffffff.tmp", out / ".rejects.jsonl.0000000000000000.tmp"]
    fds = []
    try:
        for p in held:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, b"{}")
        for p in abandoned:
            p.write_bytes(b"{}")
        assert main(_cmd(src, out)) == 0
        assert temporaries(out) == sorted(str(p.relative_to(out)) for p in held)
        assert outputs(out) == clean
    finally:
        for fd in fds:
            os.close(fd)  # the writer ends: its lock is dropped
    assert main(_cmd(src, out)) == 0
    assert temporaries(out) == []
    assert outputs(out) == clean


def test_a_command_writing_a_done_record_keeps_it_while_another_finalizes(src, clean, tmp_path):
    """A real writer: the first command stops at the rename of a done-record (its temp file written, open); a
    second command, started then, finishes the split and finalizes. The first's temp file is held (its flock),
    so kept; then the first renames it, finalizes and exits 0, and OUT is what a run alone writes."""
    out = tmp_path / "o"
    name = f"{SPLIT}-{SHARDS - 1:06d}.tar.json"
    paused, go = tmp_path / "paused", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", STOPPING, "pause", name, str(paused), str(go), *_cmd(src, out)],
                             cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while not paused.exists() or not paused.read_text():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        live = Path(paused.read_text())
        second = subprocess.run([sys.executable, "-m", "data_prep", *_cmd(src, out)], cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=150)
        kept = live.exists()
    finally:
        go.touch()
        _, err1 = first.communicate(timeout=150)
    assert second.returncode == 0, second.stderr
    assert kept, f"the live writer's {live.name} was removed by the other command's cleanup"
    assert first.returncode == 0, err1
    assert "Traceback" not in err1 + second.stderr
    assert temporaries(out) == []
    assert outputs(out) == clean


def test_a_writer_whose_temp_file_vanished_writes_it_again(tmp_path, monkeypatch):
    """Where the file system has no working locks another command's cleanup may remove a live writer's temp
    file: the writer's rename then finds none, and it writes the file once more rather than failing."""
    real_fsync = os.fsync
    removed = []

    def fsync_then_cleanup(fd):
        real_fsync(fd)
        if not removed:
            for p in tmp_path.glob(".rec.json.*.tmp"):
                p.unlink()
                removed.append(p.name)

    monkeypatch.setattr(os, "fsync", fsync_then_cleanup)
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no locks")))
    write_bytes_atomic(tmp_path / "rec.json", b'{"a": 1}\n')
    assert removed and (tmp_path / "rec.json").read_bytes() == b'{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rec.json"]
